"""`prilora sweep`: planning, selection from an earlier stage, skipping, reuse, and spec errors."""

import glob
import json
import os
import subprocess
import sys

import pytest

from prilora.cli import main
from prilora.study import sweep as sweep_module
from prilora.study.report import progress_table
from prilora.study.sweep import PlannedRun, Sweep, describe_left, runtimes, seconds_left, select_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_spec(tmp_path, tiny_model_dir, glue_dir, extra_defaults="", stages=None, name="t"):
    stages = stages or """
[[stages]]
name = "lr"
task = "rte"
seed = 0
holdout = 16
learning-rate = { "*" = [1e-3, 3e-2], full = [1e-4] }

[[stages]]
name = "dev"
task = "rte"
seed = [0, 1]
learning-rate = "select:lr"
"""
    spec = tmp_path / f"{name}.toml"
    spec.write_text(f"""
name = "{name}"
output = "{tmp_path / 'results' / name}.jsonl"
runs_dir = "{tmp_path / 'runs'}"
jobs = 2

[defaults]
model = "{tiny_model_dir}"
data-dir = "{glue_dir}"
max-train-samples = 32
max-eval-samples = 16
max-steps = 2
batch-size = 8
{extra_defaults}

[variants.prilora]
method = "prilora"
prune-interval = 1

[variants.lora]
method = "lora"

[variants.full]
method = "full"
{stages}""")
    return spec


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_plan_ids_and_dry_run(tmp_path, tiny_model_dir, glue_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir)
    sweep = Sweep(str(spec))
    assert [r.id for r in sweep.runs] == [
        "lr/rte/prilora/learning-rate=0.001-s0", "lr/rte/prilora/learning-rate=0.03-s0",
        "lr/rte/lora/learning-rate=0.001-s0", "lr/rte/lora/learning-rate=0.03-s0",
        "lr/rte/full/learning-rate=0.0001-s0",
        "dev/rte/prilora/s0", "dev/rte/prilora/s1", "dev/rte/lora/s0", "dev/rte/lora/s1",
        "dev/rte/full/s0", "dev/rte/full/s1"]
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0] == "lr/rte/prilora/learning-rate=0.001-s0\tto run" and out[-1] == "dev/rte/full/s1\twaits for lr"
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()
    assert "sweep t: 11 runs, 0 done, 11 to run" in captured.err and "reuse file" not in captured.err
    spec.write_text(spec.read_text().replace("jobs = 2", f'jobs = 2\nreuse = ["{tmp_path / "typo.jsonl"}"]'))
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert f"sweep t: reuse file {tmp_path / 'typo.jsonl'} not found (yet): the runs it would give are made here, " \
           "unless an earlier spec of the same command writes it\n" in capsys.readouterr().err


def test_sweep_runs_selects_skips_and_reuses(tmp_path, tiny_model_dir, glue_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir)
    assert main(["sweep", str(spec)]) == 0
    # Dev seeds start as soon as their method's grid is done, before the grids left: when a fifth run starts,
    # three of the four prilora/lora grid runs have finished, so one of the two grids is complete.
    err = capsys.readouterr().err
    assert err.index("started dev/rte/") < err.index("started lr/rte/full/")
    out = tmp_path / "results" / "t.jsonl"
    rows = lines(out)
    assert len(rows) == 11 and len({r["sweep"]["run"] for r in rows}) == 11
    by_id = {r["sweep"]["run"]: r for r in rows}
    for variant, rates in (("prilora", [1e-3, 3e-2]), ("lora", [1e-3, 3e-2]), ("full", [1e-4])):
        # Independent choice: best holdout score (collapsed last), first listed on ties.
        lr_rows = [by_id[f"lr/rte/{variant}/learning-rate={lr:g}-s0"] for lr in rates]
        keyed = [(-1e9 if r["collapsed"] else r["metrics"]["score"], -i) for i, r in enumerate(lr_rows)]
        best = rates[keyed.index(max(keyed))]
        for seed in (0, 1):
            dev = by_id[f"dev/rte/{variant}/s{seed}"]
            assert dev["learning_rate"] == best and dev["seed"] == seed and dev["holdout"] is None
            assert dev["sweep"]["selected"]["lr"]["chosen"] == {"learning-rate": best}
            assert dev["eval_examples"] == {"dev": 16}
        assert all(r["eval_examples"] == {"holdout": 16} for r in lr_rows)
    assert by_id["dev/rte/full/s0"]["method"] == "full"
    assert by_id["lr/rte/prilora/learning-rate=0.001-s0"]["sweep"]["command"].startswith(
        "prilora train --model ")
    # Checkpoints of finished runs are gone; the adapter stays.
    run_dir = tmp_path / "runs" / "dev" / "rte" / "lora" / "s0"
    assert (run_dir / "adapter_model.safetensors").exists() and not list(run_dir.glob("checkpoint-*"))
    # Running again does nothing.
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    assert len(lines(out)) == 11 and "11 runs, 11 done, 0 to run" in capsys.readouterr().err
    # Another spec reusing these results: identical runs count as done without running.
    other = write_spec(tmp_path, tiny_model_dir, glue_dir, name="u", stages="""
[[stages]]
name = "again"
task = "rte"
seed = [0, 1]
variants = ["lora"]
holdout = 16
learning-rate = 1e-3
""")
    other.write_text(other.read_text().replace("jobs = 2", f'jobs = 2\nreuse = ["{out}"]'))
    assert main(["sweep", str(other)]) == 0
    again = {r["sweep"]["run"]: r for r in lines(tmp_path / "results" / "u.jsonl")}
    assert again["again/rte/lora/s0"]["sweep"]["reused_from"] == str(out)
    assert again["again/rte/lora/s0"]["metrics"] == by_id["lr/rte/lora/learning-rate=0.001-s0"]["metrics"]
    assert again["again/rte/lora/s1"]["sweep"]["reused_from"] is None  # seed 1 had to run
    assert not (tmp_path / "runs" / "again" / "rte" / "lora" / "s0").exists()
    # A spec changed under recorded results is an error, not a silent mix.
    spec.write_text(spec.read_text().replace("max-steps = 2", "max-steps = 3"))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds run lr/rte/prilora/learning-rate=0.001-s0 with other settings (max_steps)" in err and "\n" not in err


def lora_lr_then_dev(grid: str, lr_extra: str = "") -> str:
    """LoRA at every rate of ``grid`` (a TOML list) on 16 held-out examples, then one dev run at the best."""
    return f"""
[[stages]]
name = "lr"
task = "rte"
seed = 0
variants = ["lora"]
holdout = 16
{lr_extra}
learning-rate = {grid}

[[stages]]
name = "dev"
task = "rte"
seed = 0
variants = ["lora"]
learning-rate = "select:lr"
"""


def test_a_grown_grid_that_chooses_otherwise_reruns_the_selecting_runs(tmp_path, tiny_model_dir, glue_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir, stages=lora_lr_then_dev("[1e-3]"))
    assert main(["sweep", str(spec)]) == 0
    out = tmp_path / "results" / "t.jsonl"
    first_lr, first_dev = lines(out)
    assert first_dev["learning_rate"] == 1e-3
    # Scores are set by hand below, so that the choice is known. First the grid grows by 2e-3, whose
    # run must train, and 1e-3 (score 2.0 here) stays the choice: the dev run, which waits for that new
    # run, then finds itself already finished, mid-sweep, and is not made again.
    first_lr["metrics"]["score"], first_lr["collapsed"] = 2.0, False
    out.write_text(json.dumps(first_lr) + "\n" + json.dumps(first_dev) + "\n")
    spec.write_text(spec.read_text().replace("learning-rate = [1e-3]", "learning-rate = [1e-3, 2e-3]"))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    assert "dev/rte/lora/s0: already finished at learning-rate 0.001" in capsys.readouterr().err
    assert [r["sweep"]["run"] for r in lines(out)] == ["lr/rte/lora/learning-rate=0.001-s0", "dev/rte/lora/s0",
                                                       "lr/rte/lora/learning-rate=0.002-s0"]
    # Then it grows by 5e-3, whose run (recorded by hand) beats 1e-3: the dev run is made again.
    spec.write_text(spec.read_text().replace("learning-rate = [1e-3, 2e-3]", "learning-rate = [1e-3, 2e-3, 5e-3]"))
    grown = json.loads(json.dumps(first_lr))
    grown["recipe"]["learning_rate"] = grown["learning_rate"] = 5e-3
    grown["metrics"]["score"] = 3.0
    grown["sweep"].update(run="lr/rte/lora/learning-rate=0.005-s0", axes={"learning-rate": 5e-3})
    with open(out, "a") as f:
        f.write(json.dumps(grown) + "\n")
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    err = capsys.readouterr().err
    assert ("dev/rte/lora/s0 ran at learning-rate 0.001; its stage now chooses learning-rate 0.005: it runs again"
            in err), err
    rows = lines(out)
    assert [r["sweep"]["run"] for r in rows] == ["lr/rte/lora/learning-rate=0.001-s0", "dev/rte/lora/s0",
                                                 "lr/rte/lora/learning-rate=0.002-s0",
                                                 "lr/rte/lora/learning-rate=0.005-s0", "dev/rte/lora/s0"]
    assert rows[1] == first_dev
    rows = rows[:2] + rows[3:]  # the 2e-3 run plays no part from here on
    assert rows[3]["learning_rate"] == 5e-3
    assert rows[3]["sweep"]["selected"]["lr"]["chosen"] == {"learning-rate": 5e-3}
    # The earlier run's folder is kept beside the new one, whole.
    runs = tmp_path / "runs" / "dev" / "rte" / "lora"
    old = json.loads((runs / "s0.superseded-1" / "results.json").read_text())
    assert old["learning_rate"] == 1e-3 and (runs / "s0.superseded-1" / "adapter_model.safetensors").exists()
    assert json.loads((runs / "s0" / "results.json").read_text())["learning_rate"] == 5e-3
    # Nothing more to do; the report shows only the new dev line and says one was left out.
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    assert "4 runs, 4 done, 0 to run" in capsys.readouterr().err
    report = tmp_path / "R.md"
    assert main(["report", str(out), "--out", str(report)]) == 0
    text = report.read_text()
    assert "1 earlier line(s) of runs made again" in text
    new = "- (0) [1 collapsed]" if rows[3]["collapsed"] else f"{100 * rows[3]['metrics']['score']:.2f} (1)"
    assert f"| lora | {new} | {rows[3]['lora_params']:,} | rte 0.005 |" in text  # one run, not two
    # An unfinished run at an earlier choice (run.json only) is set aside too; the run's own is kept.
    sweep = Sweep(str(spec))
    sweep.check()
    sweep.collect_done(write=False)
    dev = next(r for r in sweep.runs if r.stage == "dev")
    for name in ("results.json", "adapter_model.safetensors"):
        (runs / "s0" / name).unlink()
    sweep.set_aside_earlier_choice(dev)
    assert (runs / "s0" / "run.json").exists() and not (runs / "s0.superseded-2").exists()
    (runs / "s0" / "run.json").write_text(json.dumps({"spec": {k: first_dev[k] for k in first_dev if k != "sweep"}}))
    sweep.set_aside_earlier_choice(dev)
    assert not (runs / "s0").exists() and (runs / "s0.superseded-2" / "run.json").exists()


def test_grow_edges_adds_a_value_beyond_the_end_that_wins(tmp_path, tiny_model_dir, glue_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir, stages=lora_lr_then_dev("[1e-3, 3e-2]", "grow-edges = 1"))
    assert main(["sweep", str(spec)]) == 0
    err = capsys.readouterr().err
    rows = {r["sweep"]["run"]: r for r in lines(tmp_path / "results" / "t.jsonl")}
    base = [rows[f"lr/rte/lora/learning-rate={lr:g}-s0"] for lr in (1e-3, 3e-2)]
    # Of two values the best is always at an end: one value is added beyond it (x2 or /2), then no more.
    keyed = [(-1e9 if r["collapsed"] else r["metrics"]["score"], -i) for i, r in enumerate(base)]
    added = 3e-2 * 2 if keyed.index(max(keyed)) == 1 else 1e-3 / 2
    grown = rows[f"lr/rte/lora/learning-rate={added:g}-s0"]
    assert grown["learning_rate"] == added and grown["sweep"]["grown"] and not base[0]["sweep"]["grown"]
    assert f"is at the end of the grid 0.001,0.03: learning-rate {added:g} added (grow-edges = 1)" in err
    assert len(rows) == 4
    grid = [1e-3, 3e-2, added]
    keyed = [(-1e9 if r["collapsed"] else r["metrics"]["score"], -i) for i, r in enumerate(base + [grown])]
    assert rows["dev/rte/lora/s0"]["learning_rate"] == grid[keyed.index(max(keyed))]
    assert rows["dev/rte/lora/s0"]["sweep"]["selected"]["lr"]["runs"] == 3
    # Again: the same growth is planned from the recorded lines, and nothing runs.
    assert main(["sweep", str(spec)]) == 0
    err = capsys.readouterr().err
    assert "4 runs, 4 done, 0 to run" in err
    assert f"learning-rate {added:g} added earlier, its runs are recorded (grow-edges = 1)" in err
    report = tmp_path / "R.md"
    assert main(["report", str(tmp_path / "results" / "t.jsonl"), "--out", str(report)]) == 0
    assert f"(grid grown by {added:g}) |" in report.read_text() and "unfinished" not in report.read_text()


def test_stages_naming_one_table_and_a_stage_moved_to_another(tmp_path, tiny_model_dir, glue_dir, capsys):
    """Per-task rates need a stage per task; naming one table puts them in one report table. A stage moved to
    another table after its runs finished: their lines are written again with the new place, nothing runs."""
    stage = '[[stages]]\nname = "{0}"\ntable = "dev"\ntask = "{0}"\nseed = 0\nvariants = ["lora"]\nlearning-rate = {1}\n'
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir, stages=stage.format("rte", 1e-3) + stage.format("mrpc", 3e-2))
    assert main(["sweep", str(spec)]) == 0
    out = tmp_path / "results" / "t.jsonl"
    first = lines(out)
    # Two runs at a time: they finish, and are written, in either order.
    assert sorted((r["task"], r["learning_rate"], r["sweep"]["stage"], r["sweep"]["stage_table"]) for r in first) == [
        ("mrpc", 3e-2, "mrpc", "dev"), ("rte", 1e-3, "rte", "dev")]
    first_mrpc = next(r for r in first if r["task"] == "mrpc")
    spec.write_text(spec.read_text().replace('name = "mrpc"\ntable = "dev"', 'name = "mrpc"'))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    err = capsys.readouterr().err
    assert "sweep t: mrpc/mrpc/lora/s0: now in table t / mrpc (was t / dev): its line is written again\n" in err
    assert "started" not in err and "rte/rte/lora/s0: now" not in err
    again = lines(out)
    assert len(again) == 3 and again[2]["sweep"]["stage_table"] == "mrpc"
    assert {k: v for k, v in again[2].items() if k != "sweep"} == {k: v for k, v in first_mrpc.items() if k != "sweep"}
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0  # once written, the line is where the spec says
    assert len(lines(out)) == 3 and "now in table" not in capsys.readouterr().err
    report = tmp_path / "R.md"
    assert main(["report", str(out), "--out", str(report)]) == 0
    text = report.read_text()
    assert "## t / dev\n\n| method | rte | LoRA params |" in text and "## t / mrpc\n\n| method | mrpc | LoRA params |" in text


def lora_dev_specs(tmp_path, tiny_model_dir, glue_dir):
    """Spec one makes LoRA's dev seed 0; spec two, which reuses one's file, plans seeds 0 and 1."""
    def lora_dev(name, seeds, extra=""):
        stage = f'[[stages]]\nname = "dev"\ntask = "rte"\nseed = {seeds}\nvariants = ["lora"]\n{extra}\n'
        spec = write_spec(tmp_path, tiny_model_dir, glue_dir, name=name, stages=stage)
        spec.write_text(spec.read_text().replace("runs_dir = ", f"runs_dir = \"{tmp_path / 'runs' / name}\"\n#"))
        return spec

    one, two, bad = lora_dev("one", 0), lora_dev("two", [0, 1]), lora_dev("bad", 0, "prune-ratio = 0.5")
    two.write_text(two.read_text().replace("jobs = 2", f'jobs = 2\nreuse = ["{tmp_path / "results" / "one.jsonl"}"]'))
    return one, two, bad


def test_several_specs_are_all_checked_then_share_the_slots(tmp_path, tiny_model_dir, glue_dir, capsys, monkeypatch):
    one, two, bad = lora_dev_specs(tmp_path, tiny_model_dir, glue_dir)
    assert main(["sweep", str(one), str(bad)]) == 2
    assert "bad.toml: run dev/rte/lora/s0: --prune-ratio does not apply" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    checked, real = [], sweep_module.run_spec_of
    monkeypatch.setattr(sweep_module, "run_spec_of", lambda flags, out: checked.append(out) or real(flags, out))
    assert main(["sweep", str(one), str(two)]) == 0
    assert len(checked) == 3  # each of the 3 planned runs checked once: up front, not again when its spec runs
    err = capsys.readouterr().err
    # One has a single run, so two's seed 1 takes the other slot at once; two's seed 0 is one's run: it waits
    # for it and is taken from one's file, not made twice.
    assert "sweep one: started dev/rte/lora/s0 (1 running)\nsweep two: started dev/rte/lora/s1 (2 running)\n" in err
    assert err.index("sweep one: finished dev/rte/lora/s0") < err.index(
        f"sweep two: dev/rte/lora/s0: finished meanwhile in {tmp_path / 'results' / 'one.jsonl'}, taken from it")
    assert err.count("started ") == 2 and not (tmp_path / "runs" / "two" / "dev" / "rte" / "lora" / "s0").exists()
    made = lines(tmp_path / "results" / "one.jsonl")
    s0, s1 = sorted(lines(tmp_path / "results" / "two.jsonl"), key=lambda r: r["sweep"]["run"])
    assert s0["sweep"]["run"] == "dev/rte/lora/s0" and s0["metrics"] == made[0]["metrics"]
    assert s0["sweep"]["reused_from"] == str(tmp_path / "results" / "one.jsonl") and s0["sweep"]["name"] == "two"
    assert s1["sweep"]["reused_from"] is None and s1["seed"] == 1
    assert "sweep one: finished: 1 runs" in err and "sweep two: finished: 2 runs" in err


def test_a_results_line_cut_short_by_a_crash_is_left_out_then_mended(tmp_path, tiny_model_dir, glue_dir, capsys):
    one, _, _ = lora_dev_specs(tmp_path, tiny_model_dir, glue_dir)
    one.write_text(one.read_text().replace("seed = 0", "seed = [0, 1]"))
    assert main(["sweep", str(one)]) == 0
    out = tmp_path / "results" / "one.jsonl"
    first, second = out.read_text().splitlines(keepends=True)
    out.write_text(first + second[:60])  # the process died in the middle of appending its second line
    capsys.readouterr()
    # Readers leave the cut line out and say so; they change nothing.
    assert main(["report", str(out), "--out", str(tmp_path / "R.md")]) == 0
    assert f"prilora: warning: {out}:2: the last line is cut short" in capsys.readouterr().err
    assert "| lora | " in (tmp_path / "R.md").read_text() and out.read_text() == first + second[:60]
    # The next sweep moves the fragment aside and appends the run again from its folder: the same line.
    assert main(["sweep", str(one)]) == 0
    err = capsys.readouterr().err
    assert f"sweep one: {out}: its last line was cut short (a write stopped by a crash): moved to {out}.cut" in err
    assert "started" not in err and "warning" not in err
    assert out.read_text() == first + second and (tmp_path / "results" / "one.jsonl.cut").read_text() == second[:60] + "\n"
    # A whole line that lost only its newline keeps its place and gets the newline.
    out.write_text(first + second.rstrip("\n"))
    assert main(["sweep", str(one)]) == 0
    assert "its last line had no newline (a write stopped by a crash): added" in capsys.readouterr().err
    assert out.read_text() == first + second


def test_a_failed_run_of_an_earlier_spec_is_made_by_the_later_spec(tmp_path, tiny_model_dir, glue_dir, capsys,
                                                                  monkeypatch):
    one, two, _ = lora_dev_specs(tmp_path, tiny_model_dir, glue_dir)
    real = Sweep.start

    def start(self, run, threads):
        if self.settings["name"] != "one":
            return real(self, run, threads)
        os.makedirs(os.path.dirname(self.folder(run)), exist_ok=True)
        with open(self.folder(run) + ".log", "w") as f:
            f.write("error: out of disk\n")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(Sweep, "start", start)
    assert main(["sweep", str(one), str(two)]) == 1
    err = capsys.readouterr().err
    assert f"sweep one: FAILED dev/rte/lora/s0: exit code 3: error: out of disk (log: {tmp_path}/runs/one/" in err
    assert err.index("sweep one: FAILED") > err.index("sweep two: started dev/rte/lora/s0")  # reported at the end
    assert not (tmp_path / "results" / "one.jsonl").exists()
    assert [r["sweep"]["reused_from"] for r in lines(tmp_path / "results" / "two.jsonl")] == [None, None]
    assert "sweep two: finished: 2 runs" in err


def long_run_sweep(tmp_path, tiny_model_dir, glue_dir, stderr):
    """A sweep of one LoRA run of 100,000 steps, started as a process and returned once that run has saved
    its first checkpoint (step 20): the run is training, its interrupt handling in place. SIGHUP is not
    ignored in the sweep, as in a terminal, whatever the test runner ignores."""
    import time

    spec = write_spec(tmp_path, tiny_model_dir, glue_dir, name="long",
                      stages='[[stages]]\nname = "dev"\ntask = "rte"\nseed = 0\nvariants = ["lora"]\n')
    spec.write_text(spec.read_text().replace("max-steps = 2", "max-steps = 100000\nsave-steps = 20"))
    run_dir = tmp_path / "runs" / "dev" / "rte" / "lora" / "s0"
    as_in_a_terminal = ("import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                        "from prilora.cli import main; sys.exit(main(sys.argv[1:]))")
    sweep = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, "sweep", str(spec)], cwd=ROOT, stderr=stderr)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint-20").exists():
        if sweep.poll() is not None or time.time() > deadline:
            sweep.kill()
            pytest.fail(f"the sweep exited ({sweep.returncode}) or its run made no checkpoint in 300 s")
        time.sleep(0.2)
    return sweep, run_dir


def assert_stopped_with_a_checkpoint(run_dir):
    text = (run_dir.parent / "s0.log").read_text()
    folders = sorted(p.name for p in run_dir.iterdir())
    why = f"run folder {folders}; run log:\n{text}"  # what a failure needs to be understood
    assert "stopping after this optimizer step, with a checkpoint to resume from" in text, why
    stopped_at = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert stopped_at >= 20 and f"checkpoint-{stopped_at}" in text and "rerun with --resume to continue" in text, why
    assert not (run_dir / "results.json").exists(), why


def test_a_closed_terminal_stops_the_sweep_and_its_runs_with_checkpoints(tmp_path, tiny_model_dir, glue_dir):
    """SIGHUP (the terminal of a sweep started without nohup closed) does what Ctrl-C does: every run
    saves a checkpoint at the step it stops at, and the sweep exits 130; nothing is left training."""
    import signal

    with open(tmp_path / "sweep.log", "w") as log:
        sweep, run_dir = long_run_sweep(tmp_path, tiny_model_dir, glue_dir, stderr=log)
    try:
        sweep.send_signal(signal.SIGHUP)
        assert sweep.wait(timeout=120) == 130
    finally:
        sweep.kill()
    assert "sweep long: interrupted: 0/1 done; run the same command again to continue" in \
        (tmp_path / "sweep.log").read_text()
    assert_stopped_with_a_checkpoint(run_dir)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_sweep_leaves_no_run_training(tmp_path, tiny_model_dir, glue_dir):
    """SIGKILL cannot be handled, so the sweep cannot pass it on: its run gets SIGINT from the kernel as the
    sweep dies, saves a checkpoint and exits, instead of training on alone in the folder a restarted sweep
    would then find locked."""
    import signal
    import time

    sweep, run_dir = long_run_sweep(tmp_path, tiny_model_dir, glue_dir, stderr=subprocess.DEVNULL)
    try:
        sweep.kill()
        deadline = time.time() + 60
        while "rerun with --resume to continue" not in (run_dir.parent / "s0.log").read_text():
            assert time.time() < deadline, (run_dir.parent / "s0.log").read_text()
            time.sleep(0.2)
    finally:
        for pid in os.listdir("/proc"):  # a run left training by a failed check: stopped here
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(run_dir).encode() in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    assert_stopped_with_a_checkpoint(run_dir)


def test_time_left_uses_the_same_task_and_method_else_the_task_and_counts_the_rest_apart():
    times = runtimes([{"task": "rte", "method": "lora", "train_runtime_s": 100},
                      {"task": "rte", "method": "lora", "train_runtime_s": 300},
                      {"task": "rte", "method": "prilora", "train_runtime_s": 50},
                      {"task": "cola", "method": "lora", "train_runtime_s": None}])  # an unfinished line
    todo = [PlannedRun(f"r{i}", "dev", task, "v", 0, {"method": method})
            for i, (task, method) in enumerate([("rte", "lora"), ("rte", "full"), ("cola", "lora")])]
    assert seconds_left(todo, times, 2) == ((200 + 150) / 2, 1)  # lora's own mean; rte's mean for full; cola untimed
    assert describe_left(175.0, 1, 2) == "about 3 min left at 2 run(s) at a time, besides 1 run(s) of tasks not yet timed"
    assert describe_left(2 * 3600 + 360, 0, None) == "about 2.1 h left"
    assert describe_left(0.0, 3, 2) == "no estimate yet (no run of its tasks has finished)"


def test_progress_counts_a_run_planned_by_several_specs_once(tmp_path, tiny_model_dir, glue_dir):
    """Nothing has run: a spec identical to another but for its names adds no run; one whose LoRA grid differs
    adds its new grid value and the LoRA dev runs that will choose from that grid."""
    a = write_spec(tmp_path, tiny_model_dir, glue_dir, name="a")
    b = write_spec(tmp_path, tiny_model_dir, glue_dir, name="b")
    c = write_spec(tmp_path, tiny_model_dir, glue_dir, name="c")
    c.write_text(c.read_text().replace('"*" = [1e-3, 3e-2],', '"*" = [1e-3, 3e-2], lora = [1e-3, 6e-2],')
                 .replace("[variants.lora]", "[variants.lora-again]").replace("lora = [", '"lora-again" = ['))
    rows = progress_table([str(a), str(b), str(c)])
    # per spec: lr 2 + 2 + 1 (full), dev 3 variants x 2 seeds
    assert [r.split(" | ")[1:4] for r in rows[2:5]] == [["11", "0", "11"]] * 3
    assert rows[5].startswith("| all, each distinct run once | 14 | 0 | 14 | no estimate yet")
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()  # counting writes nothing


def test_report_progress_after_a_run_and_where_it_goes(tmp_path, tiny_model_dir, glue_dir, capsys):
    one, two, _ = lora_dev_specs(tmp_path, tiny_model_dir, glue_dir)
    assert main(["sweep", str(one)]) == 0
    out = tmp_path / "results" / "one.jsonl"
    line = lines(out)[0]
    out.write_text(json.dumps({**line, "train_runtime_s": 600.0}) + "\n")  # a known runtime: 600 s / 2 jobs
    capsys.readouterr()
    assert main(["sweep", str(one), str(two), "--dry-run"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "sweep, all 2 specs: 2 distinct runs, 1 done, 1 to run; about 5 min left at 2 run(s) at a time"
    notes, report = tmp_path / "notes.md", tmp_path / "R.md"
    notes.write_text("Where it stands:\n\n<!-- progress -->\n\nThe rest.\n")
    assert main(["report", str(out), "--out", str(report), "--notes", str(notes), "--progress", str(one), str(two)]) == 0
    text = report.read_text()
    assert f"Where it stands:\n\n| spec | runs planned | done | left | time left (estimate) |\n|---|---|---|---|---|\n" \
           f"| `{one}` | 1 | 1 | 0 | finished |\n" \
           f"| `{two}` | 2 | 1 | 1 | about 5 min left at 2 run(s) at a time |\n" \
           "| all, each distinct run once | 2 | 1 | 1 | about 5 min left at 2 run(s) at a time |\n" in text
    assert text.index("Counted when this report was made") < text.index("The rest.") and "## Progress" not in text
    notes.write_text("No mark here.\n")
    assert main(["report", str(out), "--out", str(report), "--notes", str(notes), "--progress", str(one)]) == 0
    text = report.read_text()
    assert text.index("No mark here.") < text.index("## Progress\n\n| spec |")
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(report), "--progress", str(tmp_path / "gone.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"prilora report: error: sweep spec {tmp_path / 'gone.toml'} not found"
    assert report.read_text() == text  # the earlier report stays


def test_selection_ranks_collapsed_last_and_keeps_grid_order():
    def line(lr, score, collapsed=False):
        return {"sweep": {"axes": {"learning-rate": lr}}, "metrics": {"score": score}, "collapsed": collapsed}

    chosen, means = select_values([line(1e-3, 0.5), line(2e-3, 0.9, collapsed=True), line(5e-4, 0.5)],
                                  ["learning-rate"])
    assert chosen == {"learning-rate": 1e-3}
    assert means["0.002"] == float("-inf")
    chosen, _ = select_values([line(1e-3, 0.5), line(1e-3, 0.7), line(5e-4, 0.61)], ["learning-rate"])
    assert chosen == {"learning-rate": 5e-4}  # means 0.6 vs 0.61


def test_grow_edges_needs_one_numeric_axis(tmp_path, tiny_model_dir, glue_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir, stages="""
[[stages]]
name = "lr"
task = "rte"
seed = 0
grow-edges = 1
learning-rate = [1e-3, 2e-3]
prune-ratio = [0.25, 0.5]
variants = ["prilora"]
""")
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage 'lr': grow-edges needs exactly one grid axis of positive numbers (e.g. learning-rate), " \
           "found ['learning-rate', 'prune-ratio']" in err and "\n" not in err


def test_unwritable_output_or_runs_folder_fails_before_running(tmp_path, tiny_model_dir, glue_dir, capsys):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir)
    (tmp_path / "a-file").write_text("")
    text = spec.read_text()
    for old, new, message in (
            (f"{tmp_path / 'results'}/t.jsonl", f"{tmp_path / 'a-file'}/deeper/t.jsonl",
             f"output {tmp_path / 'a-file'}/deeper/t.jsonl cannot be written ({tmp_path / 'a-file'} is a file)"),
            (f"{tmp_path / 'results'}/t.jsonl", str(tmp_path), f"output {tmp_path} is a folder: name a .jsonl file"),
            (f'runs_dir = "{tmp_path / "runs"}"', f'runs_dir = "{tmp_path / "a-file" / "runs"}"',
             f"runs_dir {tmp_path / 'a-file' / 'runs'} cannot be written ({tmp_path / 'a-file'} is a file)")):
        assert old in text
        spec.write_text(text.replace(old, new))
        assert main(["sweep", str(spec)]) == 2
        assert capsys.readouterr().err.strip() == f"prilora sweep: error: {spec}: {message}: choose another path" \
            if "cannot" in message else f"prilora sweep: error: {spec}: {message}"
        assert main(["sweep", str(spec), "--dry-run"]) == 0  # counting writes nothing, so it needs no folder
        capsys.readouterr()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("change, message", [
    ('\n[variants.bad]\nmethod = "lora"\nprune-ratio = 0.5\n',
     "run lr/rte/bad/learning-rate=0.001-s0: --prune-ratio does not apply to --method lora"),
    ('\n[variants.bad]\nmethod = "lora"\nno-such-flag = 1\n', "variants.bad.no-such-flag is not a flag of prilora train"),
    ('\n[variants.bad]\nmethod = "lora"\nholdout = 8\n', "holdout is set both by variant 'bad' and by stage 'lr'"),
    ('\n[variants.bad]\nmethod = "lora"\nepochs = "many"\n', "argument --epochs: invalid float value: 'many'"),
    ('\n[[stages]]\nname = "lr"\ntable = "a b"\n', "stage 'lr': table 'a b' is not a plain name"),
    ('\n[[stages]]\nname = "also"\ntable = "dev"\ntask = "rte"\nseed = 5\nvariants = ["lora"]\n',
     "stages 'also' and 'dev' share table 'dev' and both run lora on rte: one cell would mix their runs"),
    ('\n[[stages]]\nname = "also"\ntable = "dev"\ntask = "mrpc"\nseed = 5\nholdout = 8\n',
     "stages 'also' and 'dev' share table 'dev', but only one scores on a held-out part of train (holdout)"),
])
def test_bad_specs_fail_before_running(tmp_path, tiny_model_dir, glue_dir, capsys, change, message):
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir)
    spec.write_text(spec.read_text().replace("[[stages]]", change + "\n[[stages]]", 1))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


def test_a_per_variant_value_for_an_undefined_variant_fails(tmp_path, tiny_model_dir, glue_dir, capsys):
    """A misspelt variant key would otherwise silently fall back to "*"."""
    spec = write_spec(tmp_path, tiny_model_dir, glue_dir)
    spec.write_text(spec.read_text().replace("full = [1e-4]", "fulll = [1e-4]"))
    assert main(["sweep", str(spec), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"prilora sweep: error: {spec}: stage 'lr': learning-rate is given for variant 'fulll', which [variants] "
        'does not define (keys are variant names, or "*" for the others)')


def test_spec_file_errors(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.toml not found")
    (tmp_path / "s.toml").write_text("name = [\n")
    assert main(["sweep", str(tmp_path / "s.toml")]) == 2
    assert "s.toml: cannot parse:" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("name: x\nstages:\n  - name: later\n    task: rte\n    seed: 0\n"
                                     "    learning-rate: 'select:later'\n")
    assert main(["sweep", str(tmp_path / "s.yaml")]) == 2
    assert "'select:later' must name an earlier stage" in capsys.readouterr().err
    (tmp_path / "n.toml").write_text('name = "x"\n')
    assert main(["sweep", str(tmp_path / "n.toml")]) == 2
    assert "needs at least one [[stages]] entry" in capsys.readouterr().err


@pytest.mark.parametrize("spec", sorted(glob.glob(os.path.join(ROOT, "experiments", "*.toml"))),
                         ids=os.path.basename)
def test_committed_specs_are_valid(spec, monkeypatch):
    """Every spec of the study plans, and every run's flags pass prilora train's checks."""
    monkeypatch.chdir(ROOT)
    sweep = Sweep(os.path.relpath(spec, ROOT))
    sweep.check()
    assert sweep.runs and len({r.id for r in sweep.runs}) == len(sweep.runs)


def test_committed_specs_sharing_a_results_file_plan_distinct_runs(monkeypatch):
    """main-table-rte.toml writes into main-table's file and folders: a run id planned by both would be
    one folder and one line claimed by two specs."""
    monkeypatch.chdir(ROOT)
    by_output: dict[str, dict[str, str]] = {}
    shared = 0
    for spec in sorted(glob.glob(os.path.join("experiments", "*.toml"))):
        sweep = Sweep(spec)
        owners = by_output.setdefault(os.path.normpath(sweep.out), {})
        shared += bool(owners)
        for run in sweep.runs:
            assert run.id not in owners, f"{run.id} is planned by {owners[run.id]} and {spec}"
            owners[run.id] = spec
    assert shared >= 1  # the check above compared something


def test_a_second_sweep_of_a_running_spec_is_refused(tmp_path, tiny_model_dir, glue_dir, capsys):
    import subprocess
    import sys

    spec = write_spec(tmp_path, tiny_model_dir, glue_dir,
                      stages='[[stages]]\nname = "dev"\ntask = "rte"\nseed = 0\nvariants = ["lora"]\n')
    # Another process holds the spec's runs folder, as a sweep in the background would.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from prilora.study.sweep import Sweep, exclusive\n"
        f"with exclusive([Sweep({str(spec)!r})]):\n    print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["sweep", str(spec)]) == 2
        lock = tmp_path / "runs" / ".sweep.lock"
        assert capsys.readouterr().err.strip() == (
            f"prilora sweep: error: sweep t is already running in process {holder.pid} (it holds {lock}): "
            f"let it finish, or stop it (kill -INT {holder.pid}) and run this again")
        assert not (tmp_path / "results").exists() and sorted(os.listdir(tmp_path / "runs")) == [".sweep.lock"]
        assert main(["sweep", str(spec), "--dry-run"]) == 0  # counting needs no lock
    finally:
        holder.kill()  # a killed holder releases the lock with its process
        holder.wait()
    assert main(["sweep", str(spec)]) == 0
    assert len(lines(tmp_path / "results" / "t.jsonl")) == 1
