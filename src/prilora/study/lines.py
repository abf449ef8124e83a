"""Results lines: reading a results file (a last line cut short by a crash left out, or mended before the
next append), the RunSpec a line was computed with, and, as the report reads them, the files (patterns
expanded), each run once and at its latest choice, and the table and row each line falls in. Shared by
the sweep, the report's tables and its plots."""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

from ..glue.tasks import TASKS
from ..run_folder import RESULTS_FILE, complete_spec
from .spec import SweepError

TASK_ORDER = list(TASKS)


SPEC_FIELDS = ("task", "method", "model", "seed", "recipe_name", "recipe", "prilora", "adalora", "max_steps",
               "data_source", "holdout", "precision")


def placement(record: dict) -> tuple[str, str]:
    """Where the report shows a run, from its line's sweep record: (the spec's table, the stage's table).
    Lines written before stages could name a table have neither: their stage's name it is."""
    return record.get("table") or record["name"], record.get("stage_table") or record["stage"]


def spec_of_result(line: dict) -> dict:
    """The RunSpec a results line was computed with (fields added since filled with their defaults)."""
    from ..glue.runner import RunSpec

    return complete_spec(RunSpec, {k: line[k] for k in SPEC_FIELDS if k in line})


RESULT_KEYS = ("task", "method", "metrics")  # what every reader of a results line relies on


def missing_result_key(line) -> str | None:
    """The first thing a parsed line lacks to be a results line (a key, or ``metrics`` as a dict); None if whole."""
    missing = [k for k in RESULT_KEYS if not isinstance(line, dict) or k not in line]
    return missing[0] if missing else None if isinstance(line["metrics"], dict) else "metrics"


def read_lines(path: str) -> list[dict]:
    """The results lines of ``path``: a JSON-lines file (a sweep's), or one run's own indented results.json.
    A last line with no newline that is not JSON is a write cut short (a sweep appending now, or one killed
    mid-write): it is left out with a warning; the next sweep writing the file mends it (``mend_cut_tail``).
    A bad line anywhere else is an error."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = f.read()
    texts = data.splitlines(keepends=True)
    if len(texts) > 1 and texts[0].strip() == "{":  # one indented JSON document: a run's own results.json
        try:
            line = json.loads(data)
        except json.JSONDecodeError:
            raise SweepError(f"{path} is damaged (not JSON): restore it, or leave it out") from None
        if missing := missing_result_key(line):
            raise SweepError(f"{path} is not a results file of prilora train (no {missing})")
        return [line]
    out = []
    for n, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            if n == len(texts) and not text.endswith("\n"):
                print(f"prilora: warning: {path}:{n}: the last line is cut short (a sweep writing it now, or one "
                      "stopped mid-write): left out; the next prilora sweep writing this file mends it",
                      file=sys.stderr)
                break
            raise SweepError(f"{path}:{n}: not a JSON line (a write cut short?): fix or delete that line")
        if missing := missing_result_key(line):
            raise SweepError(f"{path}:{n}: not a results line of prilora train (no {missing}"
                             "): a results file holds the results.json lines that prilora train and "
                             "prilora sweep write")
        out.append(line)
    return out


def mend_cut_tail(path: str) -> str | None:
    """Make a results file that a crash left mid-append whole again, before a sweep appends to it (an append
    after a cut line would join the two). A cut last line goes to ``PATH.cut``, nothing is lost: its run's
    results.json is still in its folder, and the sweep appends it again from there. A complete last line
    that lacks only its newline gets one. Returns what was done, for the log."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return None
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        try:
            whole = missing_result_key(json.loads(tail)) is None
        except ValueError:
            whole = False
        if whole:
            f.write(b"\n")
        else:
            with open(path + ".cut", "ab") as cut:
                cut.write(tail + b"\n")
                cut.flush()
                os.fsync(cut.fileno())
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    if whole:
        return f"{path}: its last line had no newline (a write stopped by a crash): added"
    return (f"{path}: its last line was cut short (a write stopped by a crash): moved to {path}.cut; "
            "its run is appended again from its folder")


class ReportError(ValueError):
    """Missing or unreadable input; the message names the file."""


def expand(paths: list[str]) -> list[str]:
    """The results files: a pattern that no file matched reaches us as it is (the shell passes it on), so
    a study's one report command (``results/ablation-*.jsonl``) works before its later files exist."""
    found = []
    for path in paths:
        if os.path.exists(path) or not any(c in path for c in "*?["):
            found.append(path)
        elif matches := sorted(glob.glob(path)):
            found += matches
        else:
            print(f"prilora report: no results file matches {path} yet: left out", file=sys.stderr)
    return found


def load(paths: list[str]) -> list[dict]:
    lines = []
    for path in expand(paths):
        if not os.path.isfile(path):
            raise ReportError(f"results file {path} not found")
        for line in read_lines(path):
            line["_file"] = path
            lines.append(line)
    if not lines:
        raise ReportError(f"no results in {', '.join(paths)}")
    return lines


def latest(lines: list[dict]) -> tuple[list[dict], int]:
    """The last line of every sweep run: a run made again (its stage's choice changed when the grid it
    selects from grew) supersedes its earlier line, which the file keeps. Returns the lines kept and
    the number left out. A run keeps the place of its first line, so that a run written again (made again, or
    moved to another table) does not move its table, or its row, behind the ones made after it."""
    last = {}  # the run's key -> its last line; a dict keeps the order keys are first seen in
    for i, line in enumerate(lines):
        sw = line.get("sweep")
        last[(line["_file"], sw["name"], sw["run"]) if sw and sw.get("run") else i] = line
    return list(last.values()), len(lines) - len(last)


def group_key(line: dict) -> tuple[str, str]:
    """(table, variant): a sweep's table (its name unless the spec sets ``table``) and its stage's (the stage's
    name unless the stage sets ``table``), and its variant; or, for lines without a sweep record, the file
    (runs' own results.json files together) and the label that :func:`label_unswept` gives (the method, and
    the settings that set its runs apart)."""
    sw = line.get("sweep")
    if sw:
        return " / ".join(placement(sw)), sw["variant"]
    return unswept_table(line), line.get("_label") or line.get("method", "?")


def row_labels(lines: list[dict]) -> list[str]:
    """The rows the lines fall in (their variants, see :func:`group_key`), in the order first seen."""
    return list(dict.fromkeys(group_key(line)[1] for line in lines))


def unswept_table(line: dict) -> str:
    """The table of a line without a sweep record: its file's name; runs' own results.json files share one."""
    name = os.path.basename(line["_file"])
    return "prilora train runs" if name == RESULTS_FILE else name


def _settings(line: dict) -> dict:
    """What a run was asked to do, flat, without its seed (that varies within a cell)."""
    flat = {k: line.get(k) for k in ("model", "recipe_name", "learning_rate", "holdout", "max_steps", "precision")}
    for group in ("recipe", "prilora", "adalora"):
        for k, v in (line.get(group) or {}).items():
            if k not in ("seed", "learning_rate", "full_learning_rate"):
                flat[f"{group}.{k}" if k in flat else k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return flat


def label_unswept(lines: list[dict]) -> None:
    """Runs made by hand carry no variant name, only their method. Two runs of one task and method made
    with other settings (another rank schedule, learning rate, ...) must not be averaged as seeds of one
    cell, so each such run's row is labelled with the settings that differ, e.g.
    ``prilora (rank_schedule=inverted)``. Settings that differ only between tasks (the recipe's epochs) do
    not split rows."""
    groups = defaultdict(list)
    for line in lines:
        if not line.get("sweep"):
            groups[(unswept_table(line), line.get("method", "?"))].append(line)
    for (_, method), members in groups.items():
        settings = [_settings(line) for line in members]
        by_task = defaultdict(list)
        for line, flat in zip(members, settings):
            by_task[line.get("task")].append(flat)
        keys = list(dict.fromkeys(k for flat in settings for k in flat))
        differing = [k for k in keys if any(len({repr(flat.get(k)) for flat in same}) > 1 for same in by_task.values())]
        for line, flat in zip(members, settings):
            line["_label"] = method + (f" ({', '.join(f'{k}={flat.get(k)}' for k in differing)})" if differing else "")


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid_axes(lines: list[dict]) -> list[str]:
    """The flags these lines' sweep runs vary (a learning-rate grid: one)."""
    return sorted({k for line in lines for k in (line.get("sweep") or {}).get("axes", {})})


def _pruned(line: dict) -> tuple | None:
    """What a run's sparsity curve depends on: the pruned matrix and the ratio (None: no history)."""
    if not (line.get("pruning_history") and line.get("steps")):
        return None
    cfg = line.get("prilora") or {}
    return cfg.get("prune_matrix", "A"), cfg.get("prune_ratio")


def distinct_runs(lines: list[dict]) -> list[dict]:
    """Each run once: a sweep that takes a run from an earlier file (``reuse``) copies its line into its
    own file, and both files may be in the report. A copy keeps the run's own record (when it finished,
    how long it took), which tells it apart from another run with the same settings."""
    runs = {}
    for line in lines:
        key = (line.get("task"), line.get("method"), line.get("seed"), line.get("finished_at"),
               line.get("train_runtime_s"), json.dumps(line.get("metrics"), sort_keys=True))
        runs.setdefault(key, line)
    return list(runs.values())


def _tasks(lines: list[dict]) -> list[str]:
    present = {line["task"] for line in lines}
    return [t for t in TASK_ORDER if t in present]
