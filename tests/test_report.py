"""`prilora report`: every number in the tables recomputed independently from the lines."""

import json
import statistics

from prilora.cli import main


def line(task, variant, seed, score, stage="dev", lr=1e-3, collapsed=False, holdout=None, method=None, **extra):
    return {"task": task, "method": method or variant, "seed": seed, "metrics": {"score": score},
            "collapsed": collapsed, "holdout": holdout, "learning_rate": lr, "lora_params": 331776,
            "ranks": [4, 6, 7, 9, 10, 12] if variant == "prilora" else [8] * 6, "model": "m",
            "machine": {"platform": "test"}, "steps": 100,
            "sweep": {"name": "study", "stage": stage, "variant": variant, "axes": {"learning-rate": lr}}, **extra}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_tables_are_recomputed_from_the_lines(tmp_path, capsys):
    history = [[10, 0.0, 0.5], [20, 0.1, 0.5], [30, 0.12, 0.5]]
    rows = [line("mrpc", "prilora", s, v, pruning_history=history) for s, v in enumerate([0.80, 0.78, 0.79])]
    for row, f in zip(rows, [0.85, 0.84, 0.86]):
        row["metrics"].update(accuracy=row["metrics"]["score"], f1=f)
    rows += [line("mrpc", "lora", s, v) for s, v in enumerate([0.81, 0.77])]
    rows += [line("mrpc", "lora", 2, 0.684, collapsed=True)]
    rows += [line("cola", "prilora", s, v) for s, v in enumerate([0.30, 0.34, 0.29])]
    # A learning-rate grid on held-out examples: lora's best is 5e-4; 2e-3 collapsed and ranks last.
    rows += [line("mrpc", "lora", 0, s, stage="lr", lr=lr, holdout=0.1, collapsed=c)
             for lr, s, c in ((5e-4, 0.82, False), (1e-3, 0.80, False), (2e-3, 0.95, True))]
    out = tmp_path / "docs" / "RESULTS.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    p = [80.0, 78.0, 79.0]
    assert f"| prilora | {statistics.fmean([30, 34, 29]):.2f} ± {statistics.stdev([30, 34, 29]):.2f} (3) | " \
           f"{statistics.fmean(p):.2f} ± {statistics.stdev(p):.2f} (3) | {statistics.fmean([31.0, 79.0]):.2f} |" in text
    # LoRA: the collapsed seed is counted, not averaged in; no average without every task.
    assert f"| lora | - (0) | {statistics.fmean([81, 77]):.2f} ± {statistics.stdev([81, 77]):.2f} (2) [1 collapsed] | - |" in text
    assert ("| mrpc | lora | **0.0005: 82.00 (1)** · 0.001: 80.00 (1) · 0.002: - (0) [1 collapsed] | 0.0005 |"
            in text)
    assert "†" not in text
    assert "(scored on a held-out part of train)" in text
    rows.append(line("cola", "lora", 0, 0.3, stage="lr", lr=5e-4, holdout=0.1))  # one of three grid values
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    assert "| cola | lora | **0.0005: 30.00 (1)** | 0.0005 so far (grid unfinished) |" in out.read_text()
    # A best value at the grid's end, in a stage whose spec grows its grid (grow-edges): not the choice yet.
    spec = tmp_path / "study.toml"
    spec.write_text('name = "study"\n[variants.lora]\nmethod = "lora"\n[[stages]]\nname = "lr"\ntask = "mrpc"\n'
                    'seed = 0\nholdout = 0.1\ngrow-edges = 1\nlearning-rate = [5e-4, 1e-3, 2e-3]\n')
    for row in rows:
        row["sweep"]["spec"] = str(spec)
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    assert ("| mrpc | lora | **0.0005: 82.00 (1)** · 0.001: 80.00 (1) · 0.002: - (0) [1 collapsed] | 0.0005 so far "
            "(at the grid's end: 0.00025 runs next) |") in out.read_text()
    grown = line("mrpc", "lora", 0, 0.81, stage="lr", lr=2.5e-4, holdout=0.1)
    grown["sweep"].update(grown=True, spec=str(spec))
    assert main(["report", str(write(tmp_path / "r.jsonl", rows + [grown])), "--out", str(out)]) == 0
    assert ("| mrpc | lora | 0.00025: 81.00 (1) · **0.0005: 82.00 (1)** · 0.001: 80.00 (1) · 0.002: - (0) "
            "[1 collapsed] | 0.0005 (grid grown by 0.00025) |") in out.read_text()
    # MRPC's F1 beside its accuracy, over the same runs (collapsed ones left out).
    f1 = [0.85, 0.84, 0.86]
    assert f"| prilora | {statistics.fmean(f1) * 100:.2f} ± {statistics.stdev(f1) * 100:.2f} (3) |" in text
    # PRILoRA against LoRA on MRPC: Welch's test as scipy computes it; CoLA has no LoRA row to test.
    from scipy.stats import ttest_ind

    test = ttest_ind(p, [81.0, 77.0], equal_var=False)
    low, high = test.confidence_interval(0.95)
    assert (f"| mrpc | lora | {statistics.fmean(p) - 79.0:+.2f} | {test.statistic:.2f} | {test.df:.1f} | "
            f"{test.pvalue:.3f} | ±{(high - low) / 2:.2f} | 3 vs 2 |") in text
    assert "| cola | lora |" not in text
    for png in ("scores-study---dev.png", "grid-study---lr.png", "ranks.png", "sparsity.png"):
        assert (tmp_path / "docs" / "results" / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"(results/{png})" in text
    # Dev runs that chose 1e-3 when the grid held only 1e-3 and 2e-3: the grid has grown since (5e-4 wins).
    for row in rows:
        if row["task"] == "mrpc" and row["method"] == "lora" and row["sweep"]["stage"] == "dev":
            row["sweep"]["selected"] = {"lr": {"chosen": {"learning-rate": 1e-3}}}
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert "(2) [1 collapsed] † | - |" in text and "† made at a learning rate" in text
    assert "| mrpc | lora † | " in text


def test_the_average_over_tasks_is_tested_with_every_task_s_seeds(tmp_path):
    """Two tasks with the same seeds' scores: the average's difference is the task's, its variance half
    (each task's over 2 squared, twice), so Welch's t grows by sqrt(2) and its degrees of freedom double."""
    from scipy.stats import t as student_t, ttest_ind

    p, q = [0.80, 0.78, 0.79], [0.76, 0.73]
    rows = [line(task, "prilora", s, v) for task in ("mrpc", "cola") for s, v in enumerate(p)]
    rows += [line(task, "lora", s, v) for task in ("mrpc", "cola") for s, v in enumerate(q)]
    rows += [line("mrpc", "adalora", 0, 0.7), line("mrpc", "adalora", 1, 0.72)]  # not on every task: no average
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    one = ttest_ind([x * 100 for x in p], [x * 100 for x in q], equal_var=False)
    t, df = one.statistic * 2 ** 0.5, one.df * 2
    low, high = one.confidence_interval(0.95)
    assert (f"| mrpc | lora | {statistics.fmean(p) * 100 - statistics.fmean(q) * 100:+.2f} | {one.statistic:.2f} | "
            f"{one.df:.1f} | {one.pvalue:.3f} | ±{(high - low) / 2:.2f} | 3 vs 2 |") in text
    # The average's standard error is the task's over sqrt(2): its interval, at twice the df.
    half = student_t.ppf(0.975, df) * (high - low) / 2 / student_t.ppf(0.975, one.df) / 2 ** 0.5
    assert (f"| average of 2 | lora | {statistics.fmean(p) * 100 - statistics.fmean(q) * 100:+.2f} | {t:.2f} | {df:.1f} | "
            f"{2 * student_t.sf(abs(t), df):.3f} | ±{half:.2f} | 3 + 3 vs 2 + 2 |") in text
    assert "| average of 2 | adalora |" not in text and "| mrpc | adalora |" in text


def test_a_row_on_some_of_the_tasks_is_averaged_over_the_tasks_it_shares(tmp_path):
    """A study part way: adalora has two of the three tasks. Its average row covers those two, named, and
    equals the test of those two tasks alone; lora, on all three, keeps the plain label."""
    from scipy.stats import t as student_t

    p, q, r = {"cola": [0.30, 0.34, 0.29], "mrpc": [0.80, 0.78, 0.79], "rte": [0.55, 0.54, 0.53]}, \
        {"cola": [0.31, 0.33, 0.36], "mrpc": [0.77, 0.78, 0.76], "rte": [0.56, 0.58, 0.55]}, \
        {"cola": [0.25, 0.27], "mrpc": [0.74, 0.70, 0.75]}
    rows = [line(task, name, s, v) for name, got in (("prilora", p), ("lora", q), ("adalora", r))
            for task, values in got.items() for s, v in enumerate(values)]
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    # Independently: each task's difference of means, averaged; the variance of that average is the sum of
    # the four groups' var/n over 2 squared; Welch-Satterthwaite degrees of freedom over the same four terms.
    terms = [(statistics.variance([x * 100 for x in xs]) / len(xs) / 4, len(xs))
             for task in ("cola", "mrpc") for xs in (p[task], r[task])]
    se = sum(v for v, _ in terms) ** 0.5
    df = se ** 4 / sum(v ** 2 / (n - 1) for v, n in terms)
    diff = statistics.fmean(100 * (statistics.fmean(p[t]) - statistics.fmean(r[t])) for t in ("cola", "mrpc"))
    t = diff / se
    assert (f"| average of 2 (cola, mrpc) | adalora | {diff:+.2f} | {t:.2f} | {df:.1f} | "
            f"{2 * student_t.sf(abs(t), df):.3f} | ±{student_t.ppf(0.975, df) * se:.2f} | 3 + 3 vs 2 + 3 |") in text
    assert "| average of 3 | lora |" in text and "| average of 3 | adalora |" not in text


def test_a_p_value_under_one_in_a_thousand_is_not_printed_as_zero(tmp_path):
    """Far-apart, tight seeds: scipy's p is about 1e-6, which three decimals would print as 0.000."""
    from scipy.stats import ttest_ind

    p, q = [0.80, 0.81, 0.79], [0.60, 0.61, 0.62]
    rows = [line("mrpc", "prilora", s, v) for s, v in enumerate(p)]
    rows += [line("mrpc", "lora", s, v) for s, v in enumerate(q)]
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    test = ttest_ind([x * 100 for x in p], [x * 100 for x in q], equal_var=False)
    assert test.pvalue < 0.0005
    low, high = test.confidence_interval(0.95)
    assert (f"| mrpc | lora | +19.00 | {test.statistic:.2f} | {test.df:.1f} | < 0.001 | ±{(high - low) / 2:.2f} | "
            "3 vs 3 |") in out.read_text()


def test_sweeps_that_name_one_table_share_it(tmp_path):
    rows = [line("mrpc", "prilora", s, v) for s, v in enumerate([0.80, 0.78])]
    rows += [line("sst2", "prilora", s, v) for s, v in enumerate([0.85, 0.87])]
    for row in rows[2:]:
        row["sweep"].update(name="sst2-subset", table="study")  # a second sweep shown in the first's table
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("## study / dev") == 1 and "sst2-subset" not in text
    assert "| method | sst2 | mrpc | average |" in text  # GLUE's order
    assert "| prilora | 86.00 ± 1.41 (2) | 79.00 ± 1.41 (2) | 82.50 |" in text


def test_stages_that_name_one_table_share_it_where_their_last_lines_place_them(tmp_path):
    """Two stages, one task each (the rate differs per task), naming one table: it holds both tasks and their
    average. A run's line written again after its stage moved counts once, in the table it names now."""
    rows = []
    for task, stage, xs in (("mrpc", "on-mrpc", [0.80, 0.78]), ("cola", "on-cola", [0.30, 0.34])):
        for s, x in enumerate(xs):
            rows.append(line(task, "prilora", s, x, stage=stage, lr=1e-3))
            rows[-1]["sweep"].update(run=f"{stage}/{task}/prilora/s{s}", stage_table="dev")
    before = json.loads(json.dumps(rows[0]))
    del before["sweep"]["stage_table"]  # the same run's line from before its stage named the table
    # A grid in a stage shown as "grid": 5e-4 wins, so MRPC's dev runs, made at 1e-3, are outdated.
    grid = [line("mrpc", "prilora", 0, x, stage="lr", lr=lr, holdout=0.1) for lr, x in ((5e-4, 0.82), (1e-3, 0.80))]
    for row in grid:
        row["sweep"]["stage_table"] = "grid"
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", [before] + rows + grid)), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("## study / dev") == 1 and "on-mrpc" not in text and "on-cola" not in text
    assert "## study / grid (scored on a held-out part of train)" in text
    assert "| method | cola | mrpc | average |" in text
    assert "| prilora | 32.00 ± 2.83 (2) | 79.00 ± 1.41 (2) | 55.50 |" in text
    for row in rows[:2]:
        row["sweep"]["selected"] = {"lr": {"chosen": {"learning-rate": 1e-3}}}
    assert main(["report", str(write(tmp_path / "r.jsonl", [before] + rows + grid)), "--out", str(out)]) == 0
    assert "| prilora | 32.00 ± 2.83 (2) | 79.00 ± 1.41 (2) † | 55.50 |" in out.read_text()
    # All four runs were first written before the grid's runs, then written again after them: their table
    # keeps the place of their first lines, ahead of the grid's.
    first = [json.loads(json.dumps(row)) for row in rows]
    for row in first:
        del row["sweep"]["stage_table"]
    assert main(["report", str(write(tmp_path / "r.jsonl", first + grid + rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert "on-mrpc" not in text and text.index("## study / dev") < text.index("## study / grid")


def test_a_table_of_one_task_has_no_average_column(tmp_path):
    rows = [line("cola", v, s, x) for v, xs in (("prilora", [0.22, 0.25]), ("lora", [0.24, 0.20])) for s, x in enumerate(xs)]
    rows[0]["majority_baseline"] = {"score": 0.0}
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| method | cola | LoRA params | learning rate |\n|---|---|---|---|\n" in text
    assert "| prilora | 23.50 ± 2.12 (2) | 331,776 | cola 0.001 |" in text
    assert "| majority class | 0.00 | | |" in text


def test_runs_made_by_hand_are_reported_from_their_own_results_json(tmp_path, capsys):
    files = []

    def run_folder(name, row):
        del row["sweep"]  # what prilora train writes, indented, into its output folder
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(row, indent=2) + "\n")
        files.append(str(tmp_path / name / "results.json"))

    for method, xs in (("prilora", [0.81, 0.79]), ("lora", [0.78, 0.80])):
        for seed, x in enumerate(xs):
            run_folder(f"{method}-{seed}", line("mrpc", method, seed, x, recipe={"epochs": 3},
                                                **({"prilora": {"rank_schedule": "linear", "seed": seed}}
                                                   if method == "prilora" else {})))
    # Another setting is another row, never a seed of the same cell; a recipe that differs between tasks is not.
    run_folder("inverted", line("mrpc", "prilora", 0, 0.70, recipe={"epochs": 3},
                                prilora={"rank_schedule": "inverted", "seed": 0}))
    run_folder("cola", line("cola", "prilora", 0, 0.20, recipe={"epochs": 5},
                            prilora={"rank_schedule": "linear", "seed": 0}))
    out = tmp_path / "R.md"
    assert main(["report", *files, "--out", str(out)]) == 0
    text = out.read_text()
    assert "## prilora train runs\n" in text
    assert f"| prilora (rank_schedule=linear) | 20.00 (1) | {statistics.fmean([81, 79]):.2f} ± " \
           f"{statistics.stdev([81, 79]):.2f} (2) |" in text
    assert "| prilora (rank_schedule=inverted) | - (0) | 70.00 (1) |" in text
    assert f"| lora | - (0) | {statistics.fmean([78, 80]):.2f} ± {statistics.stdev([78, 80]):.2f} (2) |" in text
    # No row is plain prilora: the report says which name to test against, and the test then runs.
    assert "pass it as --reference, e.g. `--reference 'prilora (rank_schedule=linear)'`" in text
    assert "| mrpc | lora |" not in text
    assert main(["report", *files, "--out", str(out), "--reference", "prilora (rank_schedule=linear)"]) == 0
    text = out.read_text()
    t = (80 - 79) / ((statistics.variance([81, 79]) + statistics.variance([78, 80])) / 2) ** 0.5  # Welch's t
    assert f"| mrpc | lora | +1.00 | {t:.2f} |" in text and "| mrpc | prilora (rank_schedule=inverted) | +10.00 |" in text
    assert "pass it as --reference" not in text
    assert main(["report", *files, "--out", str(out), "--reference", "prilora"]) == 2
    assert capsys.readouterr().err == "prilora report: error: --reference 'prilora' names no row of a dev table: " \
        "pass one of 'prilora (rank_schedule=linear)', 'lora', 'prilora (rank_schedule=inverted)'\n"
    files = files[:4]
    (tmp_path / "lora-1" / "results.json").write_text('{\n  "task": "mrpc",\n  "metr')  # cut short
    assert main(["report", *files, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"prilora report: error: {files[-1]} is damaged (not JSON): restore it, or " \
        "leave it out\n"
    (tmp_path / "lora-1" / "results.json").write_text('{\n  "task": "mrpc"\n}\n')
    assert main(["report", *files, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"prilora report: error: {files[-1]} is not a results file of prilora train " \
        "(no method)\n"


def test_files_of_one_name_share_a_table_and_their_settings_split_its_rows(tmp_path):
    paths = []
    for folder, schedule in (("a", "linear"), ("b", "inverted")):
        row = line("mrpc", "prilora", 0, 0.8, prilora={"rank_schedule": schedule, "seed": 0})
        del row["sweep"]
        (tmp_path / folder).mkdir()
        paths.append(str(write(tmp_path / folder / "r.jsonl", [row])))
    out = tmp_path / "R.md"
    assert main(["report", *paths, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("## r.jsonl") == 1
    assert "| prilora (rank_schedule=linear) | 80.00 (1) |" in text
    assert "| prilora (rank_schedule=inverted) | 80.00 (1) |" in text


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "R.md")]) == 2
    assert capsys.readouterr().err.strip() == f"prilora report: error: results file {tmp_path / 'none.jsonl'} not found"
    (tmp_path / "bad.jsonl").write_text(json.dumps(line("rte", "lora", 0, 0.6)) + '\n{not json\n')
    assert main(["report", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "R.md")]) == 2
    assert "bad.jsonl:2: not a JSON line" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()
    (tmp_path / "other.jsonl").write_text(json.dumps(line("rte", "lora", 0, 0.6)) + '\n\n{"task": "rte", "loss": 1}\n')
    assert main(["report", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "R.md")]) == 2
    assert capsys.readouterr().err.strip() == f"prilora report: error: {tmp_path / 'other.jsonl'}:3: not a results " \
        "line of prilora train (no method): a results file holds the results.json lines that prilora train and " \
        "prilora sweep write"
    good = str(tmp_path / "good.jsonl")
    write(tmp_path / "good.jsonl", [line("rte", "lora", 0, 0.6)])
    (tmp_path / "R.md").write_text("an earlier report\n")
    (tmp_path / "a-file").write_text("")
    for extra, message in ((["--notes", str(tmp_path / "no-notes.md")], f"notes file {tmp_path / 'no-notes.md'} not found"),
                           (["--out", str(tmp_path)], f"--out {tmp_path} is a folder: pass the path of the Markdown "
                                                      "file to write"),
                           (["--out", str(tmp_path / "a-file" / "R.md")], f"cannot write to {tmp_path / 'a-file'} ({tmp_path / 'a-file'} "
                                                                      "is a file): pass --out (or --plots) in a writable folder")):
        args = ["report", good, "--out", str(tmp_path / "R.md")] + extra
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"prilora report: error: {message}") and err.count("\n") == 1, err
    assert (tmp_path / "R.md").read_text() == "an earlier report\n" and not (tmp_path / "results").exists()


def test_schedule_by_pruning_table_gives_each_effect_and_the_interaction(tmp_path):
    def cfg(schedule, criterion):
        return {"rank_schedule": schedule, "prune_criterion": criterion, "prune_matrix": "A", "prune_ratio": 0.5}

    linear = [4, 6, 7, 9, 10, 12]
    variants = {"lora": ("lora", [8] * 6, cfg("uniform", "none")),
                "linear-unpruned": ("prilora", linear, cfg("linear", "none")),
                "uniform-pruned": ("prilora", [8] * 6, cfg("uniform", "importance")),
                "prilora": ("prilora", linear, cfg("linear", "importance"))}
    got = {"lora": [0.70, 0.74, 0.72], "linear-unpruned": [0.75, 0.73], "uniform-pruned": [0.71, 0.69, 0.76],
           "prilora": [0.80, 0.78, 0.77]}
    rows = [line("mrpc", v, s, x, method=variants[v][0], ranks=variants[v][1], prilora=variants[v][2])
            for v, xs in got.items() for s, x in enumerate(xs)]
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    m = {v: statistics.fmean(100 * x for x in xs) for v, xs in got.items()}
    se = sum(statistics.variance([100 * x for x in xs]) / len(xs) for xs in got.values()) ** 0.5
    a, b, c, d = m["lora"], m["linear-unpruned"], m["uniform-pruned"], m["prilora"]
    assert ("lora = uniform r=8, no pruning; linear-unpruned = linear 4 -> 12, no pruning; uniform-pruned = "
            "uniform r=8, importance pruning of A at 0.5; prilora = linear 4 -> 12, importance pruning of A at 0.5"
            in text)
    assert (f"| mrpc | {b - a:+.2f} | {d - c:+.2f} | {c - a:+.2f} | {d - b:+.2f} | {d - a:+.2f} | "
            f"{(b - a) + (c - a):+.2f} | {(d - c) - (b - a):+.2f} ± {se:.2f} |") in text
    assert "averaged over the" not in text  # one task: nothing to average
    # The same square on a second task: every effect's average is the task's, tested with t x sqrt(2) and the
    # degrees of freedom doubled (each task's variance over 2 squared, twice).
    from scipy.stats import t as student_t, ttest_ind

    rows += [dict(row, task="cola") for row in rows]
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert "The same effects averaged over the 2 tasks with all four cells" in text
    alone = ttest_ind([100 * x for x in got["linear-unpruned"]], [100 * x for x in got["lora"]], equal_var=False)
    t, df = alone.statistic * 2 ** 0.5, alone.df * 2
    low, high = alone.confidence_interval(0.95)
    half = student_t.ppf(0.975, df) * (high - low) / 2 / student_t.ppf(0.975, alone.df) / 2 ** 0.5
    assert (f"| linear-unpruned − lora | {b - a:+.2f} | {t:.2f} | {df:.1f} | {2 * student_t.sf(abs(t), df):.3f} | "
            f"±{half:.2f} |") in text
    parts = [statistics.variance([100 * x for x in xs]) / len(xs) for xs in got.values()]  # one task's, per cell
    t1 = (d - c - b + a) / sum(parts) ** 0.5
    df1 = sum(parts) ** 2 / sum(v ** 2 / (len(xs) - 1) for v, xs in zip(parts, got.values()))
    t, df = t1 * 2 ** 0.5, df1 * 2
    assert (f"| interaction | {d - c - b + a:+.2f} | {t:.2f} | {df:.1f} | {2 * student_t.sf(abs(t), df):.3f} | "
            f"±{student_t.ppf(0.975, df) * sum(parts) ** 0.5 / 2 ** 0.5:.2f} |") in text
    # A table whose rows do not cross two rank patterns with two pruning settings gets no such section.
    rows += [line("mrpc", "full", s, 0.8, method="full", ranks=None) for s in range(2)]
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    assert "Schedule x pruning" not in out.read_text()


def test_score_plot_shows_every_seed_per_task_on_the_task_s_own_scale():
    """Bars from 0 would flatten CoLA's 22 against MRPC's 80: each task gets its own panel and scale, every seed
    is a dot, the mean ± std a point with an error bar, a collapsed run a cross on the panel's floor."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    from prilora.study.plots import scores_figure
    from prilora.study.report import result_table

    rows = [line("mrpc", "prilora", s, v) for s, v in enumerate([0.80, 0.78, 0.79])]
    rows += [line("mrpc", "lora", s, v) for s, v in enumerate([0.81, 0.77])] + [line("mrpc", "lora", 2, 0.68, collapsed=True)]
    rows += [line("cola", "prilora", s, v) for s, v in enumerate([0.22, 0.25, 0.20])]
    rows += [line("cola", "lora", s, v) for s, v in enumerate([0.24, 0.21, 0.23])]
    _, cells = result_table(rows)
    fig = scores_figure(cells, ["cola", "mrpc"], "study / dev")
    try:
        cola, mrpc = fig.axes
        assert (cola.get_title(), mrpc.get_title()) == ("cola", "mrpc")
        for ax, seeds in ((cola, {0: [22, 25, 20], 1: [24, 21, 23]}), (mrpc, {0: [80, 78, 79], 1: [81, 77]})):
            dots = sorted((round(float(x), 2), round(float(y), 6)) for c in ax.collections
                          if isinstance(c, PathCollection) for x, y in c.get_offsets())
            expected = [(i - 0.12, float(y)) for i, ys in seeds.items() for y in ys]
            if ax is mrpc:
                expected.append((1.0, 76.0))  # the collapsed run: a cross 1 below the lowest seed
            assert dots == sorted(expected)
            means = sorted((round(float(ln.get_xdata()[0]), 2), round(float(ln.get_ydata()[0]), 6))
                           for ln in ax.lines if ln.get_marker() == "o")
            assert means == [(i + 0.12, round(statistics.fmean(ys), 6)) for i, ys in seeds.items()]
            caps = sorted(round(float(y), 6) for ln in ax.lines if ln.get_marker() == "_" for y in ln.get_ydata())
            assert caps == sorted(round(statistics.fmean(ys) + sign * statistics.stdev(ys), 6)
                                  for ys in seeds.values() for sign in (-1, 1))
            low, high = ax.get_ylim()  # the task's own scale, not from 0
            assert min(min(v) for v in seeds.values()) - 6 < low and high < max(max(v) for v in seeds.values()) + 6
        assert "collapsed runs: red crosses" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_plots_draw_one_curve_per_pattern_named_by_the_variants_sharing_it():
    from prilora.study.lines import _pruned
    from prilora.study.plots import curves

    def run(variant, ranks, matrix="A", ratio=0.5):
        return line("mrpc", variant, 0, 0.8, method="prilora", ranks=ranks, pruning_history=[[10, 0.0, ratio]],
                    prilora={"prune_matrix": matrix, "prune_ratio": ratio})

    linear = [4, 6, 7, 9, 10, 12]
    rows = [run(v, linear) for v in ("prilora", "magnitude", "random", "none", "scope-matrix")]
    rows += [run("prilora", linear), run("prune-b", linear, matrix="B"), run("ratio-0.75", linear, ratio=0.75),
             run("uniform", [8] * 6), line("mrpc", "full", 0, 0.8, method="full", ranks=None)]
    by_ranks = curves(rows, lambda x: tuple(x["ranks"]) if x.get("ranks") else None)
    assert {k: label for k, (_, label) in by_ranks.items()} == {
        tuple(linear): "prilora, magnitude, random (+4)", (8,) * 6: "uniform"}
    by_pruning = curves(rows, _pruned)
    assert {k: label for k, (_, label) in by_pruning.items()} == {
        ("A", 0.5): "prilora, magnitude, random (+3)", ("B", 0.5): "prune-b", ("A", 0.75): "ratio-0.75"}
    assert by_pruning[("A", 0.5)][0] is rows[0]  # the first run stands for the curve


def test_majority_class_row_comes_from_the_lines_that_recorded_it(tmp_path):
    base = {"accuracy": 0.6838, "f1": 0.8122, "score": 0.6838}
    rows = [line("mrpc", "prilora", s, v, majority_baseline=base) for s, v in enumerate([0.80, 0.78])]
    rows += [line("stsb", "prilora", 0, 0.85, majority_baseline=None)]
    rows += [line("rte", "lora", 0, 0.566, stage="lr", holdout=0.1,
                  majority_baseline={"accuracy": 0.5141, "score": 0.5141})]
    for row in rows:
        row["metrics"].update(accuracy=row["metrics"]["score"], f1=0.85)
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| majority class | 68.38 | - | | | |" in text  # mrpc, then stsb (regression: none)
    assert "| majority class | 81.22 |" in text  # MRPC's F1 in the other-metrics table
    assert "Always predicting the commonest training label scores, on the same held-out examples: rte 51.41." in text
    rows.append(line("mrpc", "lora", 1, 0.79, majority_baseline={**base, "score": 0.70}))  # another split
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    assert "| majority class | 68.38-70.00 | - | | | |" in out.read_text()


def test_lines_from_before_the_baseline_take_it_from_a_line_on_the_same_examples(tmp_path):
    def old(task, seed, **extra):  # a line made before majority_baseline was recorded
        row = line(task, "prilora", seed, 0.5, train_examples=3668, eval_examples={"dev": 408}, **extra)
        row["sweep"]["name"] = "old-table"
        return row

    newer = line("mrpc", "prilora", 0, 0.8, train_examples=3668, eval_examples={"dev": 408},
                 majority_baseline={"accuracy": 0.6838, "score": 0.6838})
    rows = [old("mrpc", 0), old("mrpc", 1), old("cola", 0), newer,
            line("mrpc", "lora", 0, 0.7, stage="lr", train_examples=3301, eval_examples={"holdout": 367},
                 holdout=0.1)]
    rows[-1]["sweep"]["name"] = "old-table"
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    old_table = text[text.index("## old-table / dev"):]
    old_table = old_table[:old_table.index("\n## ")]
    assert "| majority class | - | 68.38 |" in old_table  # cola: no line on its examples recorded it
    assert "Always predicting" not in text  # the held-out line has other examples: nothing to take


def test_parameter_counts_show_one_value_or_the_range():
    from prilora.study.report import _params

    ada = [{"method": "adalora", "lora_params": n} for n in (334368, 318240, 348192, 334368)]
    assert _params(ada) == "318,240-348,192"  # AdaLoRA's final ranks differ by run
    assert _params([{"method": "lora", "lora_params": 331776}] * 2) == "331,776"
    full = [{"method": "full", "trainable_params": 22713986, "lora_params": 0},
            {"method": "full", "trainable_params": 22713601, "lora_params": 0}]  # STS-B's head has one output
    assert _params(full) == "all (22,713,601-22,713,986)"
    assert _params([{"method": "full"}]) == "all" and _params([{"method": "lora"}]) == "-"


def test_report_states_the_machines_and_software_with_the_runs_on_each(tmp_path):
    machine = {"platform": "Linux-x", "processor": "x86_64", "cpu_count": 2, "device": "cpu", "torch_threads": 1}
    versions = {"python": "3.11.7", "torch": "2.13.0+cpu", "peft": "0.21.2"}
    rows = [line("mrpc", "lora", s, 0.8, machine=dict(machine), versions=versions) for s in range(3)]
    rows[2]["machine"]["torch_threads"] = 2
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows)), "--out", str(out)]) == 0
    text = out.read_text()
    assert ("Machines: Linux-x, 2 CPUs, cpu, 1 torch thread(s) a run (2 runs); "
            "Linux-x, 2 CPUs, cpu, 2 torch thread(s) a run (1 run). "
            "Software: python 3.11.7, torch 2.13.0+cpu, peft 0.21.2.") in text


def test_notes_can_lead_with_a_summary_before_the_reports_introduction(tmp_path):
    rows = [line("mrpc", m, s, 0.8 + 0.01 * s) for m in ("lora", "prilora") for s in range(3)]
    results = str(write(tmp_path / "r.jsonl", rows))
    for notes, first in (("## At a glance\n\n| claim | verdict |\n\n<!-- generated -->\n\nMore notes.", "## At a glance"),
                         ("Notes without the mark.", "Generated by")):
        (tmp_path / "notes.md").write_text(notes)
        out = tmp_path / "RESULTS.md"
        assert main(["report", results, "--out", str(out), "--notes", str(tmp_path / "notes.md")]) == 0
        text = out.read_text()
        assert text.startswith(f"# Results\n\n{first}") and "<!-- generated -->" not in text
        assert text.count("Generated by `prilora report") == 1
        if first == "## At a glance":
            assert text.index("| claim | verdict |") < text.index("Generated by") < text.index("More notes.")
        else:
            assert text.index("Generated by") < text.index("Notes without the mark.")


def test_committed_results_doc_is_what_its_command_makes_from_the_committed_results(tmp_path, monkeypatch):
    """docs/RESULTS.md names the command that made it: run again on the committed JSON lines (plots into
    a temporary folder), it must give the committed text, so no figure there is edited by hand or stale."""
    import re
    import shlex
    from pathlib import Path

    from prilora.cli import build_parser
    from prilora.study.report import build_report

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    committed = (root / "docs" / "RESULTS.md").read_text()
    command = re.search(r"Generated by `(prilora report [^`]*)`", committed).group(1)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.out == "docs/RESULTS.md" and args.plots is None
    text = build_report(args.results, str(tmp_path / "RESULTS.md"), plots_dir=str(tmp_path / "results"),
                        notes=args.notes, reference=args.reference, progress=args.progress, command=command)
    assert text == committed, "docs/RESULTS.md is out of date: run the command it names ('Generated by') again"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == \
        sorted(p.name for p in (root / "docs" / "results").iterdir())


def test_regrowth_is_counted_from_the_pruning_histories_once_per_run(tmp_path):
    regrew = [[10, 0.0, 0.5], [20, 0.0, 0.5], [30, 0.0, 0.5]]
    rows = [line("mrpc", "prilora", s, 0.8, pruning_history=regrew) for s in range(2)]
    rows += [line("cola", "prilora", 0, 0.3, pruning_history=[[10, 0.0, 0.5], [20, 6e-06, 0.5], [30, 2e-06, 0.5]])]
    rows += [line("stsb", "prilora", 0, 0.8, pruning_history=[[10, 0.3, 0.5]])]  # one event: nothing to compare
    for i, row in enumerate(rows):
        row["finished_at"] = f"2026-01-01T00:00:0{i}"
    copy = json.loads(json.dumps(rows[2]))  # the same run, copied into another file
    copy["sweep"]["reused_from"] = "results/main-table.jsonl"
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows + [copy])), "--out", str(out)]) == 0
    assert ("Zeros left of one pruning event just before the next: none in 2 of the 3 runs with two or more "
            "events (every pruned weight had moved off zero: pruning zeroes without freezing); in the other 1, "
            "at most 0.0006% of the pruned weights.") in out.read_text()


def test_a_pattern_the_shell_left_unexpanded_is_matched_here_or_left_out(tmp_path, capsys):
    write(tmp_path / "main.jsonl", [line("mrpc", "lora", s, v) for s, v in enumerate([0.80, 0.78])])
    out = tmp_path / "R.md"
    pattern = str(tmp_path / "ablation-*.jsonl")
    assert main(["report", str(tmp_path / "main.jsonl"), pattern, "--out", str(out)]) == 0
    assert f"prilora report: no results file matches {pattern} yet: left out" in capsys.readouterr().err
    assert "(2 runs)" in out.read_text()
    write(tmp_path / "ablation-a.jsonl", [line("mrpc", "prilora", 0, 0.81)])
    write(tmp_path / "ablation-b.jsonl", [line("cola", "prilora", 0, 0.30)])
    assert main(["report", str(tmp_path / "main.jsonl"), pattern, "--out", str(out)]) == 0
    assert "(4 runs)" in out.read_text() and "no results file matches" not in capsys.readouterr().err
    assert main(["report", str(tmp_path / "other-*.jsonl"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"prilora report: error: no results in {tmp_path / 'other-*.jsonl'}"


def test_a_grid_is_complete_against_its_own_spec_and_copied_lines_are_not_counted_as_runs(tmp_path):
    def grid_line(spec, task, lr, score, **extra):
        row = line(task, "adalora", 0, score, stage="lr", lr=lr, holdout=0.1, **extra)
        row["sweep"].update(name=spec, table="main")
        return row

    # Two specs share the table "main": the first's grid has 4e-3, the second's ends at 2e-3.
    rows = [grid_line("main", "mrpc", lr, s) for lr, s in ((1e-3, 0.70), (2e-3, 0.72), (4e-3, 0.75))]
    rows += [grid_line("sst2", "sst2", lr, s) for lr, s in ((1e-3, 0.85), (2e-3, 0.86))]
    rows += [grid_line("main", "cola", 1e-3, 0.20)]  # cola's grid still lacks 2e-3 and 4e-3
    copy = grid_line("ablation", "mrpc", 1e-3, 0.70)  # the same run, copied into an ablation's file
    copy["sweep"].update(table="ablation", reused_from="results/main.jsonl")
    # Taken from a file the report is not given: a run of its own here.
    elsewhere = grid_line("main", "mrpc", 5e-4, 0.60, finished_at="2026-01-01T00:00:00")
    elsewhere["sweep"]["reused_from"] = "results/recipes.jsonl"
    out = tmp_path / "R.md"
    assert main(["report", str(write(tmp_path / "r.jsonl", rows + [copy, elsewhere])), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| sst2 | adalora | 0.001: 85.00 (1) · **0.002: 86.00 (1)** | 0.002 |" in text
    assert "| cola | adalora | **0.001: 20.00 (1)** | 0.001 so far (grid unfinished) |" in text
    assert "| mrpc | adalora | 0.0005: 60.00 (1) · 0.001: 70.00 (1) · 0.002: 72.00 (1) · **0.004: 75.00 (1)** | 0.004 |" \
        in text
    assert "from the raw results alone (7 runs; and 1 line(s) that copy runs of an earlier file into a later table)" in text


def test_a_grid_value_planned_by_the_spec_without_a_line_yet_leaves_the_choice_open(tmp_path):
    """The one run of 1e-3 has finished; 2e-3 is planned but has no line yet (still training). The spec says so;
    without it (moved away), the report can judge only from the lines."""
    spec = tmp_path / "study.toml"
    spec.write_text('name = "study"\n[variants.prilora]\nmethod = "prilora"\n[[stages]]\nname = "lr"\n'
                    'task = "mrpc"\nseed = 0\nholdout = 0.1\nlearning-rate = [1e-3, 2e-3]\n')
    row = line("mrpc", "prilora", 0, 0.80, stage="lr", lr=1e-3, holdout=0.1)
    row["sweep"]["spec"] = str(spec)
    results, out = write(tmp_path / "r.jsonl", [row]), tmp_path / "R.md"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert "| mrpc | prilora | **0.001: 80.00 (1)** | 0.001 so far (grid unfinished) |" in out.read_text()
    spec.rename(tmp_path / "elsewhere.toml")
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert "| mrpc | prilora | **0.001: 80.00 (1)** | 0.001 |" in out.read_text()


def test_a_grid_table_reads_its_spec_once_and_afresh_on_each_report(tmp_path, monkeypatch):
    """Two methods' grids from one spec: one read of it per report, not one per cell; a spec edited between
    two reports (a value added to lora's grid) is seen by the second."""
    from prilora.study import sweep
    reads = []
    load = sweep.load_spec_file
    monkeypatch.setattr(sweep, "load_spec_file", lambda path: reads.append(path) or load(path))
    spec = tmp_path / "study.toml"
    head = 'name = "study"\n[variants.prilora]\nmethod = "prilora"\n[variants.lora]\nmethod = "lora"\n' \
           '[[stages]]\nname = "lr"\ntask = "mrpc"\nseed = 0\nholdout = 0.1\n'
    spec.write_text(head + 'learning-rate = [1e-3, 2e-3]\n')
    rows = [line("mrpc", v, 0, s, stage="lr", lr=lr, holdout=0.1)
            for v, lr, s in (("prilora", 1e-3, 0.80), ("prilora", 2e-3, 0.78), ("lora", 1e-3, 0.79), ("lora", 2e-3, 0.81))]
    for row in rows:
        row["sweep"]["spec"] = str(spec)
    results, out = write(tmp_path / "r.jsonl", rows), tmp_path / "R.md"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert reads == [str(spec)]
    assert "| mrpc | lora | 0.001: 79.00 (1) · **0.002: 81.00 (1)** | 0.002 |" in out.read_text()
    spec.write_text(head + 'learning-rate = { "*" = [1e-3, 2e-3], lora = [1e-3, 2e-3, 3e-3] }\n')
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert reads == [str(spec)] * 2
    text = out.read_text()
    assert "| mrpc | lora | 0.001: 79.00 (1) · **0.002: 81.00 (1)** | 0.002 so far (grid unfinished) |" in text
    assert "| mrpc | prilora | **0.001: 80.00 (1)** · 0.002: 78.00 (1) | 0.001 |" in text
