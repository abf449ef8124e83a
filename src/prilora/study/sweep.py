"""``prilora sweep SPEC``: a grid of ``prilora train`` runs from a committed TOML or YAML file.

A spec names its runs: stages (e.g. a learning-rate grid on a held-out part of train, then
dev runs at the chosen rate) x tasks x variants (named flag sets such as ``method = "lora"``)
x every list-valued flag x seeds. Each run is a ``prilora train`` process in its own folder,
so a sweep can stop at any moment and continue later: finished runs are skipped, unfinished
ones resume from their last checkpoint. Every finished run's ``results.json`` is appended to
one JSON-lines file with a ``sweep`` record (stage, variant, run id, the exact command).

Runs are identified by what decides their outcome (the RunSpec that ``prilora train`` builds),
so a finished run is never redone, a changed spec is caught instead of mixed in, and runs
finished elsewhere with the same settings (``reuse = [...]``) count as done. The changes
allowed under recorded runs: a grid that grows (by hand, or by ``grow-edges`` when the best
value sits at an end), and the runs that select from it then follow the new choice; and a
stage or spec that moves to another report table, whose recorded lines are written again.

The spec file and the runs it plans are ``spec.py``; reading (and mending) results files is ``lines.py``.
Here: which runs are done, choosing from grids, starting and watching the processes, progress.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from ..run_folder import RESULTS_FILE, RUN_FILE, STOP_WITH_ENV, finite_or_none, read_json, unwritable
from .lines import SPEC_FIELDS, mend_cut_tail, placement, read_lines, spec_of_result
from .spec import (PlannedRun, SweepError, _fmt, _fmt_choice, load_spec_file, plan, run_id, run_spec_of,
                   train_argv)

def next_edge(grid: list, chosen, grown: int, seeds: int, limit: int):
    """The value ``grow-edges = limit`` adds to a sorted grid whose best value is ``chosen``: twice (half) the
    largest (smallest) when that one is chosen, while fewer than ``limit`` values were added; else None."""
    if not limit or grown >= limit * seeds or len(grid) < 2 or chosen not in (grid[0], grid[-1]):
        return None
    return grid[-1] * 2 if chosen == grid[-1] else grid[0] / 2


def read_plan(spec_path: str) -> tuple[dict, list[PlannedRun]] | None:
    """A spec's settings and runs, or None where it cannot be read (a report from results alone)."""
    try:
        return plan(load_spec_file(spec_path), spec_path)
    except SweepError:
        return None


def stage_grid(spec_plan: tuple[dict, list[PlannedRun]] | None, stage: str, task: str, variant: str,
               key: str) -> tuple[int, set]:
    """A stage's ``grow-edges`` in its spec's plan (from ``read_plan``), and the values of axis ``key`` it plans
    for one task and variant (before any growth): a grid whose runs have not all finished is then known to be
    unfinished. ``(0, set())`` without a plan."""
    if spec_plan is None:
        return 0, set()
    settings, runs = spec_plan
    return settings["grow"].get(stage, 0), {r.axes[key] for r in runs if (r.stage, r.task, r.variant) == (
        stage, task, variant) and key in r.axes}


def score_of(line: dict) -> float:
    """Collapsed runs and missing scores rank below everything."""
    s = (line.get("metrics") or {}).get("score")
    return float("-inf") if line.get("collapsed") or s is None else s


def select_values(candidates: list[dict], keys: list[str]) -> tuple[dict, dict]:
    """Pick the values of ``keys`` whose runs score best on average (ties: the first in the grid).
    Returns the choice and the mean score of every candidate value."""
    groups: dict[tuple, list[float]] = {}
    for line in candidates:
        axes = line["sweep"]["axes"]
        groups.setdefault(tuple(json.dumps(axes.get(k)) for k in keys), []).append(score_of(line))
    means = {g: sum(v) / len(v) for g, v in groups.items()}
    best = max(means, key=lambda g: means[g])  # max keeps the first of equal values
    return dict(zip(keys, (json.loads(v) for v in best))), {",".join(g): m for g, m in means.items()}


def runtimes(lines: list[dict]) -> dict[tuple, list[float]]:
    """Recorded training times by (task, method) and by task."""
    times: dict[tuple, list[float]] = {}
    for line in lines:
        t = line.get("train_runtime_s")
        if t:
            times.setdefault((line.get("task"), line.get("method")), []).append(t)
            times.setdefault((line.get("task"),), []).append(t)
    return times


def seconds_left(todo: list[PlannedRun], times: dict[tuple, list[float]], jobs: int) -> tuple[float, int]:
    """Wall time of the runs left at ``jobs`` at a time, each costing the mean recorded time of its task and
    method (else of its task); and how many runs have neither recorded, and so are not counted. Another
    task's times would mislead: SST-2's subset, RTE's 5 epochs and CoLA's short sentences differ by 3x."""
    total, untimed = 0.0, 0
    for r in todo:
        key = next((k for k in ((r.task, r.flags.get("method", "prilora")), (r.task,)) if k in times), None)
        if key is None:
            untimed += 1
        else:
            total += sum(times[key]) / len(times[key])
    return total / jobs, untimed


def describe_left(seconds: float, untimed: int, jobs: int | None) -> str:
    """'about 4.0 h left at 2 run(s) at a time', and the runs not counted; ``jobs`` None leaves it out."""
    if untimed and not seconds:
        return "no estimate yet (no run of its tasks has finished)"
    amount = (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60
              else "under a minute")
    return f"about {amount} left" + (f" at {jobs} run(s) at a time" if jobs else "") + (
        f", besides {untimed} run(s) of tasks not yet timed" if untimed else "")


def _identity(sweep: "Sweep", run: PlannedRun) -> str:
    """What makes a run the same run in two specs: its settings; for a run whose value is still to be
    chosen, its flags and the runs it will choose from (the same flags choosing among the same runs)."""
    if run.spec is not None:
        return json.dumps(run.spec, sort_keys=True)
    sources = sorted(json.dumps(r.spec, sort_keys=True) for r in sweep.runs if r.stage in run.selects.values()
                     and r.task == run.task and r.variant == run.variant)
    return json.dumps([run.flags, sources], sort_keys=True)


def study_progress(sweeps: list["Sweep"], states: list[tuple] | None = None) -> dict:
    """Several specs of one command, as a dry run counts them: each spec's (sweep, done, todo),
    and over all of them each distinct run once (the ablations take PRILoRA's and LoRA's runs from
    earlier tables, so per-spec counts of runs left overlap). Nothing runs and nothing is written.
    ``states``: the specs' (sweep, done, todo) when a dry run has counted them already."""
    states = states or [(sweep, *sweep.progress()) for sweep in sweeps]
    times = runtimes([r.line for _, done, _ in states for r in done.values()]
                     + [line for sweep in sweeps for line in sweep.reusable_lines()])
    planned, finished = {}, set()
    for sweep, done, _ in states:
        for run in sweep.runs:
            key = _identity(sweep, run)
            planned.setdefault(key, run)
            if run.id in done:
                finished.add(key)
    left = [run for key, run in planned.items() if key not in finished]
    jobs = min(sweep.jobs for sweep in sweeps)
    return {"specs": states, "times": times, "planned": len(planned), "done": len(finished), "left": left,
            "estimate": describe_left(*seconds_left(left, times, jobs), jobs)}


LOCK_FILE = ".sweep.lock"


@contextlib.contextmanager
def exclusive(sweeps: list["Sweep"]):
    """Hold each runs folder for this process alone: a second ``prilora sweep`` of the same spec would
    start the same runs in the same folders and append them twice. The lock (``flock``) goes with the
    process, so a sweep that was killed leaves nothing to clean up. No lock where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    folders = {}
    for sweep in sweeps:
        folders.setdefault(os.path.realpath(sweep.settings["runs_dir"]), sweep.settings["name"])
    with contextlib.ExitStack() as stack:
        for folder, name in folders.items():
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, LOCK_FILE)
            f = stack.enter_context(open(path, "a+"))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                raise SweepError(f"sweep {name} is already running in process {holder} (it holds {path}): "
                                 f"let it finish, or stop it (kill -INT {holder}) and run this again") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        yield


class Sweep:
    def __init__(self, spec_path: str, jobs: int | None = None, stream=None):
        self.path = spec_path
        self.settings, self.runs = plan(load_spec_file(spec_path), spec_path)
        self.jobs = jobs or self.settings["jobs"]
        self.out = self.settings["output"]
        self.stream = stream
        self.failed: dict[str, str] = {}
        self._recorded: dict[str, dict] = {}
        self._reusable: list[tuple[str, dict]] = []
        self._announced: set[str] = set()  # runs whose changed choice was logged
        self.added: list[PlannedRun] = []  # runs planned by grow(), not yet handed to the run loop
        self.done: dict[str, PlannedRun] = {}  # what run_sweeps() has seen finished, by run id
        self.todo: list[PlannedRun] = []  # and what it has still to start
        self._checked = False

    def log(self, text: str) -> None:
        try:
            print(f"sweep {self.settings['name']}: {text}", file=self.stream or sys.stderr, flush=True)
        except OSError:  # a terminal that closed (SIGHUP): the runs still stop with their checkpoints
            pass

    def folder(self, run: PlannedRun) -> str:
        return os.path.join(self.settings["runs_dir"], run.id)

    def check(self) -> None:
        """Every run's flags must be accepted by `prilora train` before anything starts (once: the CLI checks
        every spec of a multi-spec sweep up front, then run() would check again)."""
        if self._checked:
            return
        for run in self.runs:
            flags = {k: v for k, v in run.flags.items() if k not in run.selects}
            try:
                spec = run_spec_of(flags, self.folder(run))
            except SweepError as e:
                raise SweepError(f"{self.path}: run {run.id}: {e}") from None
            if not run.selects:
                run.spec = spec
        self._checked = True

    def check_paths(self) -> None:
        """The output file and the runs folder must be writable before the first run starts, not found
        unwritable when it finishes hours later. Creates nothing (a dry run writes nothing)."""
        if os.path.isdir(self.out):
            raise SweepError(f"{self.path}: output {self.out} is a folder: name a .jsonl file")
        if os.path.exists(self.out) and not os.access(self.out, os.W_OK):
            raise SweepError(f"{self.path}: output {self.out} is not writable: make it writable or name another file")
        for key, folder in (("output", os.path.dirname(self.out) or "."), ("runs_dir", self.settings["runs_dir"])):
            if why := unwritable(folder):
                raise SweepError(f"{self.path}: {key} {self.out if key == 'output' else folder} cannot be written "
                                 f"({why}): choose another path")

    def resolve(self, run: PlannedRun, done: dict[str, PlannedRun]) -> bool:
        """Fill in values chosen from earlier stages; False while those stages are unfinished."""
        if run.spec is not None:
            return True
        flags, run.selection = dict(run.flags), {}
        for stage in sorted(set(run.selects.values())):
            keys = [k for k, s in run.selects.items() if s == stage]
            source = [r for r in self.runs if r.stage == stage and r.task == run.task and r.variant == run.variant]
            if not source:
                raise SweepError(f"{self.path}: run {run.id} selects {', '.join(keys)} from stage {stage!r}, "
                                 f"which has no {run.task}/{run.variant} runs")
            if any(r.id not in done for r in source):
                return False
            choice, means = select_values([done[r.id].line for r in source], keys)
            if self.grow(stage, source, keys, choice):
                return False
            flags.update(choice)
            run.selection[stage] = {"chosen": choice, "mean_score": means, "runs": len(source)}
        run.flags = flags
        run.spec = run_spec_of(flags, self.folder(run))
        return True

    def grow(self, stage: str, source: list[PlannedRun], keys: list[str], choice: dict) -> bool:
        """With ``grow-edges = N`` on the source stage: when the chosen value is the largest (smallest) of
        the grid so far, plan runs at twice (half) that value, at most N per task and variant. True when
        runs were added, so that the selecting run waits for them."""
        if len(keys) != 1:
            return False
        key, limit = keys[0], self.settings["grow"].get(stage, 0)
        grid = sorted({r.flags[key] for r in source})
        value = next_edge(grid, choice[key], sum(r.grown for r in source), len({r.seed for r in source}), limit)
        if value is None:
            return False
        at = self.runs.index(source[-1]) + 1
        planned_before = at
        for template in {r.seed: r for r in source}.values():
            flags = {**template.flags, key: value}
            axes = {k: flags[k] for k in template.axes}
            new = PlannedRun(run_id(stage, template.task, template.variant, axes, template.seed), stage,
                             template.task, template.variant, template.seed, flags, axes=axes, grown=True)
            new.spec = run_spec_of(flags, self.folder(new))
            self.runs.insert(at, new)
            self.added.append(new)
            at += 1
        again = all(r.id in self._recorded for r in self.runs[planned_before:at])  # re-planned on a restart
        self.log(f"{stage}/{source[0].task}/{source[0].variant}: best {key} {_fmt(choice[key])} is at the end "
                 f"of the grid {_fmt(grid)}: {key} {_fmt(value)} "
                 f"{'added earlier, its runs are recorded' if again else 'added'} (grow-edges = {limit})")
        return True

    def record(self, run: PlannedRun, result: dict, reused_from: str | None = None, write: bool = True) -> None:
        argv = train_argv(run.flags, self.folder(run))
        result["sweep"] = {"spec": self.path, "name": self.settings["name"], "table": self.settings["table"],
                           "stage": run.stage, "stage_table": self.settings["stage_tables"][run.stage],
                           "variant": run.variant, "run": run.id,
                           "axes": {k: run.flags[k] for k in run.axes}, "selected": run.selection or None,
                           "grown": run.grown, "command": "prilora " + " ".join(argv), "reused_from": reused_from}
        run.line = result
        if not write:
            return
        os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(finite_or_none(result), allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def collect_done(self, write: bool = True) -> dict[str, PlannedRun]:
        """Runs already in the output file, in a reuse file, or finished in their folder (appended to the
        output file unless ``write`` is false)."""
        self._recorded = {line["sweep"]["run"]: line for line in read_lines(self.out) if "sweep" in line}
        self._reusable = [(p, line) for p in self.settings["reuse"] for line in read_lines(p)]
        done: dict[str, PlannedRun] = {}
        changed = True
        while changed:  # resolving a selection can make later runs' specs known
            changed = False
            for run in list(self.runs):  # grow() may add runs: the next pass sees them
                if run.id not in done and self.resolve(run, done) and self.finished_already(run, write):
                    done[run.id] = run
                    changed = True
        return done

    def finished_already(self, run: PlannedRun, write: bool = True) -> bool:
        """Whether this run (its spec resolved) is in the output file, a reuse file or its folder; recorded
        in the output file when found elsewhere. Also asked of runs whose selection resolves mid-sweep."""
        line = self._recorded.get(run.id)
        if line is not None and spec_of_result(line) != run.spec:
            earlier = self.other_choice(run, spec_of_result(line))
            if earlier is None:
                diff = [k for k in SPEC_FIELDS if line.get(k) != run.spec.get(k)]
                raise SweepError(f"{self.out} holds run {run.id} with other settings ({', '.join(diff)}): "
                                 "the spec changed; rename the stage, or use a new output file")
            if run.id not in self._announced:
                self._announced.add(run.id)
                self.log(f"{run.id} ran at {_fmt_choice(earlier)}; its stage now chooses "
                         f"{_fmt_choice(self.choice_of(run))}: it runs again (its line stays in {self.out}, "
                         "superseded by the new one)")
            line = None
        here = (self.settings["table"], self.settings["stage_tables"][run.stage])
        if line is not None and placement(line["sweep"]) != here:
            # The spec moved the run to another report table: its line is written again with the new place
            # (the report reads a run's last line); the run and its results are the same.
            self.log(f"{run.id}: now in table {' / '.join(here)} (was {' / '.join(placement(line['sweep']))}): "
                     f"its line {'is' if write else 'will be'} written again")
            moved = {k: v for k, v in line.items() if k != "sweep"}
            self.record(run, moved, reused_from=line["sweep"].get("reused_from"), write=write)
            return True
        if line is not None:
            run.line = line
            return True
        found = next(((p, dict(l)) for p, l in self._reusable if spec_of_result(l) == run.spec), None)
        if found:
            found[1].pop("sweep", None)
            self.record(run, found[1], reused_from=found[0], write=write)
            return True
        results = os.path.join(self.folder(run), RESULTS_FILE)
        if not os.path.isfile(results):
            return False
        line = read_json(results)
        if spec_of_result(line) != run.spec:
            if self.other_choice(run, spec_of_result(line)) is not None:
                return False  # made at an earlier choice: start() sets it aside
            raise SweepError(f"{self.folder(run)} holds a finished run with other settings: "
                             "move it away, or use another runs_dir")
        self.record(run, line, write=write)
        return True

    def choice_of(self, run: PlannedRun) -> dict:
        return {k: run.flags[k] for k in run.selects}

    def other_choice(self, run: PlannedRun, spec: dict) -> dict | None:
        """The values of the selected flags that ``spec`` was made with, when it is this very run at
        another value of its source stage's grid (the stage gained runs, e.g. an extended grid, and
        now chooses otherwise); None when it differs in anything else."""
        if not run.selects:
            return None
        options = [{}]
        for stage in sorted(set(run.selects.values())):
            keys = [k for k, s in run.selects.items() if s == stage]
            grid = {json.dumps({k: r.flags.get(k) for k in keys}, sort_keys=True) for r in self.runs
                    if r.stage == stage and r.task == run.task and r.variant == run.variant}
            options = [{**o, **json.loads(g)} for o in options for g in sorted(grid)]
        for choice in options:
            if choice != self.choice_of(run) and run_spec_of({**run.flags, **choice}, self.folder(run)) == spec:
                return choice
        return None

    def set_aside_earlier_choice(self, run: PlannedRun) -> None:
        """A folder holding this run made at an earlier choice (finished or not) moves to
        ``<folder>.superseded-N``, so the run starts afresh and the old adapter is kept."""
        folder = self.folder(run)
        for name, key in ((RESULTS_FILE, None), (RUN_FILE, "spec")):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                data = read_json(path)
                spec = spec_of_result(data if key is None else data[key])
                if spec == run.spec or self.other_choice(run, spec) is None:
                    return  # this run's own folder, or one that `prilora train` will refuse with its reason
                n = 1
                while os.path.exists(f"{folder}.superseded-{n}"):
                    n += 1
                os.replace(folder, f"{folder}.superseded-{n}")
                self.log(f"{folder} was made at an earlier choice: moved to {folder}.superseded-{n}")
                return

    def estimate(self, todo: list[PlannedRun], done: dict[str, PlannedRun]) -> str:
        times = runtimes([r.line for r in done.values()] + self.reusable_lines())
        return describe_left(*seconds_left(todo, times, self.jobs), self.jobs)

    def reusable_lines(self) -> list[dict]:
        """The lines of the reuse files, as last read by collect_done()."""
        return [line for _, line in self._reusable]

    def progress(self) -> tuple[dict[str, PlannedRun], list[PlannedRun]]:
        """The runs done and those left, as a dry run sees them: nothing runs and nothing is written."""
        self.check()
        done = self.collect_done(write=False)
        return done, [r for r in self.runs if r.id not in done]

    def start(self, run: PlannedRun, threads: int) -> subprocess.Popen:
        folder = self.folder(run)
        self.set_aside_earlier_choice(run)
        argv = train_argv(run.flags, folder) + ["--quiet"]
        if os.path.isfile(os.path.join(folder, RUN_FILE)):
            argv.append("--resume")
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", STOP_WITH_ENV: str(os.getpid())}
        log = open(folder + ".log", "a")
        log.write(f"$ prilora {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "prilora.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        log.close()
        return proc

    def summarize(self, done: dict[str, PlannedRun], todo: list[PlannedRun]) -> None:
        self.log(f"{len(self.runs)} runs, {len(done)} done, {len(todo)} to run -> {self.out}"
                 + (f"; {self.estimate(todo, done)}" if todo else ""))
        missing = [p for p in self.settings["reuse"] if not os.path.exists(p)]
        if missing:  # a typo would silently make hours of runs again
            self.log(f"reuse file {', '.join(missing)} not found (yet): the runs it would give are made here, "
                     "unless an earlier spec of the same command writes it")

    def dry_run(self) -> tuple[dict[str, PlannedRun], list[PlannedRun]]:
        """Log the counts and list every run with its state (stdout); nothing runs and nothing is written.
        Returns what progress() returns, so that several specs' dry runs can be totalled without counting again."""
        done, todo = self.progress()
        self.summarize(done, todo)
        for r in self.runs:
            reused = (r.line or {}).get("sweep", {}).get("reused_from")
            state = (f"done (reused from {reused})" if reused else "done") if r.id in done else \
                "waits for " + ", ".join(sorted(set(r.selects.values()))) if r.spec is None else "to run"
            print(f"{r.id}\t{state}")
        return done, todo

    def run(self) -> int:
        return run_sweeps([self])

    def begin(self) -> None:
        """Count what is done (recording runs found elsewhere) and queue the rest."""
        self.check()
        self.done = self.collect_done()
        self.todo = [r for r in self.runs if r.id not in self.done]
        self.added.clear()
        self.summarize(self.done, self.todo)

    def take(self, blocked) -> PlannedRun | None:
        """The next run to start: the first one whose values are chosen and that ``blocked`` lets through.
        Runs that take a chosen value (the dev seeds) go before the grids still to run, so that a sweep
        stopped part way has as many finished table cells as it can, not grids that no cell uses yet.
        A run found finished meanwhile (its choice resolved to a run made before, or an earlier spec of
        the same command made it) is recorded, not returned."""
        while True:
            order = sorted(self.todo, key=lambda r: not r.selects)  # stable: plan order within each group
            ready = next((r for r in order if self._ready(r, self.done) and not blocked(r)), None)
            if self.added:  # grow() planned runs while looking: they go first among the grids
                self.todo[:0] = self.added
                self.added = []
                continue
            if ready is None:
                return None
            self.todo.remove(ready)
            if not self.finished_already(ready):
                return ready
            self.done[ready.id] = ready
            where = ready.line.get("sweep", {}).get("reused_from") or self.folder(ready)
            self.log(f"{ready.id}: already finished at {_fmt_choice(self.choice_of(ready))}" if ready.selects
                     else f"{ready.id}: finished meanwhile in {where}, taken from it")

    def pending(self) -> set[str]:
        """What this spec still plans to make (runs queued or not yet handed over, less those that wait
        for failed runs), as _identity keys: a later spec waits for these instead of making them too."""
        return {_identity(self, r) for r in self.todo + self.added if not self._waits_for_failed(r)}

    def offer(self, path: str, line: dict) -> None:
        """A line another spec of the same command just wrote to ``path``: usable if this spec reuses it."""
        mine = next((p for p in self.settings["reuse"] if os.path.realpath(p) == os.path.realpath(path)), None)
        if mine is not None:
            self._reusable.append((mine, line))

    def conclude(self, interrupted: bool) -> int:
        if interrupted and len(self.done) < len(self.runs):
            self.log(f"interrupted: {len(self.done)}/{len(self.runs)} done; run the same command again to continue")
            return 130
        blocked = [r.id for r in self.todo]
        for rid, why in self.failed.items():
            self.log(f"FAILED {rid}: {why}")
        if blocked:
            self.log(f"{len(blocked)} runs wait for failed runs of an earlier stage: {', '.join(blocked[:3])}"
                     + (" ..." if len(blocked) > 3 else ""))
        if self.failed or blocked:
            return 1
        self.log(f"finished: {len(self.done)} runs in {self.out}")
        return 0

    def _waits_for_failed(self, run: PlannedRun) -> bool:
        return any(r.id in self.failed for r in self.runs if r.stage in run.selects.values()
                   and r.task == run.task and r.variant == run.variant)

    def _ready(self, run: PlannedRun, done: dict) -> bool:
        return not self._waits_for_failed(run) and self.resolve(run, done)

    def _finish(self, run: PlannedRun, rc: int, seconds: float, done: dict) -> None:
        results = os.path.join(self.folder(run), RESULTS_FILE)
        if rc == 0 and os.path.isfile(results):
            self.record(run, read_json(results))
            done[run.id] = run
            for checkpoint in glob.glob(os.path.join(self.folder(run), "checkpoint-*")):
                shutil.rmtree(checkpoint)  # only needed to resume; the run saved its adapter (or model)
            score = run.line["metrics"].get("score")
            self.log(f"finished {run.id} in {seconds / 60:.1f} min: score "
                     f"{'null' if score is None else f'{100 * score:.2f}'}"
                     + (" (collapsed)" if run.line.get("collapsed") else ""))
            return
        last = ""
        try:
            with open(self.folder(run) + ".log") as f:
                lines = [line.strip() for line in f if line.strip()]
            last = lines[-1] if lines else ""
        except OSError:
            pass
        self.failed[run.id] = f"exit code {rc}: {last} (log: {self.folder(run)}.log)"


def run_sweeps(sweeps: list[Sweep]) -> int:
    """Run several specs' runs as one queue, in the specs' order. A slot the first unfinished spec cannot
    fill (its last runs are running, or the rest wait for a choice) takes a ready run of a later spec, so
    no core idles between specs. A later spec's run waits while an earlier spec still plans the same run
    (same settings, see _identity) or trains in its folder: it is made once, then taken from the earlier
    spec's file when the later spec reuses it. Runs at a time: the first unfinished spec's ``jobs``."""
    for sweep in sweeps:
        sweep.check()
        sweep.check_paths()
    for out, sweep in {s.out: s for s in reversed(sweeps)}.items():  # once per file, logged by its first spec
        if mended := mend_cut_tail(out):
            sweep.log(mended)
    for sweep in sweeps:
        sweep.begin()
    running: dict[str, tuple[Sweep, PlannedRun, subprocess.Popen, float]] = {}  # by folder
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    def blocker(index: int):
        earlier: set[str] | None = None

        def blocked(run: PlannedRun) -> bool:
            nonlocal earlier
            if os.path.realpath(sweeps[index].folder(run)) in running:
                return True
            if earlier is None:
                earlier = set().union(*(s.pending() for s in sweeps[:index]))
                earlier |= {_identity(s, r) for s, r, _, _ in running.values() if sweeps.index(s) < index}
            return bool(earlier) and _identity(sweeps[index], run) in earlier
        return blocked

    def running_of(sweep: Sweep) -> list[PlannedRun]:
        return [r for s, r, _, _ in running.values() if s is sweep]

    # SIGINT even when ignored: `nohup prilora sweep ... &` is stopped by `kill -INT`. A closed terminal
    # (SIGHUP) stops it too, unless nohup ignores that.
    hup = getattr(signal, "SIGHUP", None)
    hangup = [hup] if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN else []
    old = {s: signal.signal(s, on_signal) for s in [signal.SIGINT, signal.SIGTERM] + hangup}
    try:
        while stop["signal"] is None:
            live = [s for s in sweeps if s.todo or running_of(s)]
            if not live:
                break
            jobs = live[0].jobs
            threads = max(1, (os.cpu_count() or 1) // jobs)
            for index, sweep in enumerate(sweeps):
                while len(running) < jobs:
                    run = sweep.take(blocker(index))
                    if run is None:
                        break
                    running[os.path.realpath(sweep.folder(run))] = (sweep, run, sweep.start(run, threads), time.time())
                    sweep.log(f"started {run.id} ({len(running)} running)")
            if not running:
                break
            time.sleep(1)
            for key, (sweep, run, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                sweep._finish(run, proc.returncode, time.time() - t0, sweep.done)
                if run.id in sweep.done:
                    for other in sweeps[sweeps.index(sweep) + 1:]:
                        other.offer(sweep.out, run.line)
                left = sweep.todo + running_of(sweep)
                sweep.log(f"{len(sweep.done)}/{len(sweep.runs)} done, {len(running_of(sweep))} running, "
                          f"{len(sweep.todo)} waiting" + (f"; {sweep.estimate(left, sweep.done)}" if left else ""))
    finally:
        for _, _, proc, _ in running.values():
            proc.send_signal(signal.SIGINT)  # prilora train exits cleanly on SIGINT; checkpoints stay
        for _, _, proc, _ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for s, handler in old.items():
            signal.signal(s, handler)
    return max(sweep.conclude(stop["signal"] is not None) for sweep in sweeps)
