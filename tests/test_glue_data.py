"""GLUE loading: the real TSV files against their known sizes, the three tasks not shipped here on
small files written by the test, the hub's layout, and bad files by their message."""

import pytest

from prilora.glue import GlueDataError, get_task, load_split
from prilora.glue.data import from_hub_rows, read_tsv

KNOWN = {  # task: (train rows, dev rows, label set)
    "cola": (8551, 1043, {0, 1}),
    "sst2": (67349, 872, {0, 1}),
    "mrpc": (3668, 408, {0, 1}),
    "rte": (2490, 277, {0, 1}),
    "stsb": (5749, 1500, None),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_real_glue_sizes_and_labels(name, glue_dir):
    task = get_task(name)
    n_train, n_dev, labels = KNOWN[name]
    train, dev = load_split(task, "train", str(glue_dir)), load_split(task, "dev", str(glue_dir))
    assert (len(train), len(dev)) == (n_train, n_dev)
    for split in (train, dev):
        assert all(len(t) == len(task.hub_columns) and all(isinstance(s, str) and s for s in t) for t in split.texts)
        if labels is None:
            assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in split.labels)
        else:
            assert set(split.labels) == labels


def test_real_rows_match_the_files(glue_dir):
    # Row contents, not only counts: first rows as they stand in the files.
    mrpc = load_split(get_task("mrpc"), "train", str(glue_dir))  # header starts with a byte-order mark
    assert mrpc.labels[0] == 1 and mrpc.texts[0][0].startswith("Amrozi accused his brother")
    rte = load_split(get_task("rte"), "dev", str(glue_dir))  # labels are strings in the file
    assert rte.labels[0] == 1 and rte.texts[0][0].startswith("Dana Reeve, the widow of the actor Christopher")
    cola = load_split(get_task("cola"), "dev", str(glue_dir))  # no header, no final newline
    assert cola.texts[0] == ("The sailors rode the breeze clear of the rocks.",) and cola.labels[0] == 1
    assert cola.texts[-1] == ("John talked to Bill about himself.",) and cola.labels[-1] == 1
    stsb = load_split(get_task("stsb"), "dev", str(glue_dir))
    assert stsb.labels[0] == 5.0 and stsb.texts[0] == ("A man with a hard hat is dancing.",
                                                       "A man wearing a hard hat is dancing.")


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(row) for row in lines) + "\n", encoding="utf-8")


MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]


def mnli_row(i, s1, s2, label):
    return [str(i), "1", "1e", "fiction", "(x)", "(y)", "(X)", "(Y)", s1, s2, label, label]


def test_mnli_qqp_qnli_from_small_files(tmp_path):
    write(tmp_path / "MNLI" / "train.tsv", [MNLI_HEADER, mnli_row(0, 'He said "no.', "He spoke.", "entailment"),
                                            mnli_row(1, "A", "B", "contradiction")])
    write(tmp_path / "MNLI" / "dev_matched.tsv", [MNLI_HEADER, mnli_row(0, "C", "D", "neutral")])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv", [MNLI_HEADER, mnli_row(0, "E", "F", "contradiction")])
    write(tmp_path / "QQP" / "train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                           ["0", "1", "2", "Why?", "Why not?", "0"], ["1", "3", "4", "A?", "B?", "1"]])
    write(tmp_path / "QNLI" / "dev.tsv", [["index", "question", "sentence", "label"],
                                          ["0", "Who?", "Me.", "not_entailment"], ["1", "What?", "It.", "entailment"]])
    mnli = get_task("mnli")
    train = load_split(mnli, "train", str(tmp_path))
    assert train.texts == [('He said "no.', "He spoke."), ("A", "B")]  # quotes are literal
    assert train.labels == [0, 2]
    assert load_split(mnli, "dev_matched", str(tmp_path)).labels == [1]
    assert load_split(mnli, "dev_mismatched", str(tmp_path)).labels == [2]
    assert mnli.eval_splits == ("dev_matched", "dev_mismatched")
    qqp = load_split(get_task("qqp"), "train", str(tmp_path))
    assert qqp.texts == [("Why?", "Why not?"), ("A?", "B?")] and qqp.labels == [0, 1]
    qnli = load_split(get_task("QNLI"), "dev", str(tmp_path))
    assert qnli.texts == [("Who?", "Me."), ("What?", "It.")] and qnli.labels == [1, 0]


def test_hub_layout_gives_the_same_examples(glue_dir):
    # nyu-mll/glue's columns and label indices (RTE: 0 entailment, 1 not_entailment), as a datasets.Dataset.
    from datasets import Dataset

    task = get_task("rte")
    tsv = read_tsv(str(glue_dir), task, "dev")
    import csv

    with open(glue_dir / "RTE" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    hub = Dataset.from_dict({
        "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
        "label": [{"entailment": 0, "not_entailment": 1}[r["label"]] for r in rows], "idx": list(range(len(rows))),
    })
    assert from_hub_rows(task, hub) == tsv
    assert task.hub_split("dev") == "validation" and get_task("mnli").hub_split("dev_mismatched") == "validation_mismatched"


def test_hub_unreachable_says_what_to_do():
    with pytest.raises(GlueDataError, match=r"cannot load nyu-mll/glue/rte .*pass --data-dir with the GLUE TSV"):
        load_split(get_task("rte"), "train", None)


def test_bad_files_name_file_and_line(tmp_path):
    rte = get_task("rte")
    write(tmp_path / "RTE" / "train.tsv", [["index", "premise", "hypothesis", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(GlueDataError, match=r"RTE/train.tsv:1: header lacks column\(s\) 'sentence1', 'sentence2'"):
        load_split(rte, "train", str(tmp_path))
    write(tmp_path / "RTE" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"],
                                        ["1", "a", "b", "maybe"]])
    with pytest.raises(GlueDataError, match=r"RTE/dev.tsv:3: label 'maybe' is not one of entailment, not_entailment"):
        load_split(rte, "dev", str(tmp_path))
    write(tmp_path / "RTE" / "test.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a"]])
    with pytest.raises(GlueDataError, match=r"RTE/test.tsv:2: expected at least 4 tab-separated fields, got 2"):
        load_split(rte, "test", str(tmp_path))
    write(tmp_path / "STS-B" / "train.tsv", [["sentence1", "sentence2", "score"], ["a", "b", "high"]])
    with pytest.raises(GlueDataError, match=r"STS-B/train.tsv:2: score 'high' is not a number"):
        load_split(get_task("stsb"), "train", str(tmp_path))


def test_missing_folders_and_files(tmp_path):
    with pytest.raises(GlueDataError, match=r"data folder .*nowhere not found: pass --data-dir"):
        load_split(get_task("rte"), "train", str(tmp_path / "nowhere"))
    with pytest.raises(GlueDataError, match=r"MRPC not found: --data-dir must hold GLUE's MRPC/ folder"):
        load_split(get_task("mrpc"), "train", str(tmp_path))
    (tmp_path / "MRPC").mkdir()
    with pytest.raises(GlueDataError, match=r"MRPC/dev.tsv not found: the MRPC folder must hold dev.tsv"):
        load_split(get_task("mrpc"), "dev", str(tmp_path))


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task 'wnli': choose one of cola, sst2, mrpc, stsb, qqp, mnli"):
        get_task("wnli")
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").folder == "STS-B"


def test_holdout_carves_a_fixed_validation_split_from_train(glue_dir):
    from prilora.glue.recipes import get_recipe
    from prilora.glue.runner import load_data

    task, recipe = get_task("rte"), get_recipe("minilm-cpu", "rte")
    full = load_split(task, "train", str(glue_dir))
    train, evals = load_data(task, str(glue_dir), recipe, holdout=200)
    held = evals["holdout"]
    assert list(evals) == ["holdout"] and (len(train), len(held)) == (2290, 200)
    pairs = sorted(zip(full.texts, full.labels))
    assert sorted(zip(train.texts + held.texts, train.labels + held.labels)) == pairs  # a partition of train
    # training order is the file's order, minus the held-out rows
    positions = [full.texts.index(t) for t in train.texts[:50]]
    assert positions == sorted(positions)
    again_train, again = load_data(task, str(glue_dir), recipe, holdout=0.0803)  # the same 200, as a fraction
    assert again["holdout"] == held and again_train == train
