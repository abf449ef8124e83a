"""A sweep spec and the runs it plans: the file (TOML or YAML) checked key by key, its stages x tasks x
variants x grid values x seeds expanded in order, each run's id, and the ``prilora train`` command and
RunSpec of a run's flags (parsed by the CLI's own parser, so a spec cannot ask for what train refuses).
Nothing here starts a process or reads a result: that is ``sweep.py``."""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field

from ..run_folder import RunError, finite_or_none

SPEC_KEYS = {"name", "description", "table", "output", "runs_dir", "jobs", "reuse", "defaults", "variants", "stages"}
STAGE_KEYS = {"name", "table", "task", "seed", "variants", "grow-edges"}  # besides flags of `prilora train`
FORBIDDEN = {"output-dir", "resume", "overwrite", "quiet", "help"}
SELECT = "select:"
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")  # spec, stage and table names: they name files and folders


class SweepError(RunError):
    """A spec that cannot run; the message names the file and the key."""


@dataclass
class PlannedRun:
    id: str  # stage/task/variant/axis=value,...-s<seed>: also the run's folder under runs_dir
    stage: str
    task: str
    variant: str
    seed: int
    flags: dict  # flag (without --) -> value; values "select:STAGE" are chosen from that stage's results
    spec: dict | None = None  # the RunSpec it computes, once its flags are resolved
    line: dict | None = None  # its finished results line
    axes: dict = field(default_factory=dict)
    selects: dict = field(default_factory=dict)  # flag -> stage its value is chosen from
    selection: dict | None = None  # what was chosen, and the mean score of every candidate
    grown: bool = False  # added to its stage's grid because the best value sat at an end (grow-edges)

    def __post_init__(self):
        self.selects = {k: v[len(SELECT):] for k, v in self.flags.items()
                        if isinstance(v, str) and v.startswith(SELECT)}


def load_spec_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise SweepError(f"sweep spec {path} not found")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                return tomllib.load(f)
        if path.endswith((".yaml", ".yml")):
            import yaml

            with open(path) as f:
                data = yaml.safe_load(f)
            if not isinstance(data, dict):
                raise SweepError(f"{path}: a sweep spec must be a mapping at the top level")
            return data
    except SweepError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError: one line with the position
        raise SweepError(f"{path}: cannot parse: {' '.join(str(e).split())}") from None
    raise SweepError(f"{path}: a sweep spec must be a .toml, .yaml or .yml file")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _flag_names() -> set[str]:
    from ..arguments import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return {s[2:] for a in train._actions for s in a.option_strings if s.startswith("--")}


def plan(data: dict, path: str) -> tuple[dict, list[PlannedRun]]:
    """The settings and the ordered runs of a spec (task by task, so whole cells finish early)."""
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown top-level keys {sorted(unknown)}: allowed are {sorted(SPEC_KEYS)}")
    if not PLAIN_NAME.fullmatch(name):
        raise SweepError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names files)")
    settings = {"name": name, "table": data.get("table", name), "output": data.get("output", f"results/{name}.jsonl"),
                "runs_dir": data.get("runs_dir", f"runs/sweeps/{name}"), "jobs": data.get("jobs", 1),
                "reuse": _as_list(data.get("reuse", [])), "grow": {}, "stage_tables": {}}
    if not isinstance(settings["jobs"], int) or settings["jobs"] < 1:
        raise SweepError(f"{path}: jobs must be an integer >= 1, got {settings['jobs']!r}")
    known = _flag_names() - FORBIDDEN
    defaults = data.get("defaults", {})
    variants = data.get("variants") or {"prilora": {"method": "prilora"}}
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise SweepError(f"{path}: needs at least one [[stages]] entry with task and seed lists")
    where = {"defaults": defaults, **{f"variants.{v}": f for v, f in variants.items()}}
    for label, flags in where.items():
        if not isinstance(flags, dict):
            raise SweepError(f"{path}: {label} must be a table of flags")
        for key, value in flags.items():
            if key not in known:
                raise SweepError(f"{path}: {label}.{key} is not a flag of prilora train (see prilora train --help)")
            if isinstance(value, list) and key not in ("target-modules", "rank-schedule"):
                raise SweepError(f"{path}: {label}.{key} is a list: lists (grid axes) belong in a stage")
    runs: list[PlannedRun] = []
    stage_names = []
    per_task: dict[str, list[PlannedRun]] = {}
    for i, stage in enumerate(stages):
        sname = stage.get("name", f"stage{i + 1}")
        if sname in stage_names or not PLAIN_NAME.fullmatch(sname):
            raise SweepError(f"{path}: stage name {sname!r} is repeated or not a plain name")
        stage_names.append(sname)
        stable = stage.get("table", sname)
        if not isinstance(stable, str) or not PLAIN_NAME.fullmatch(stable):
            raise SweepError(f"{path}: stage {sname!r}: table {stable!r} is not a plain name")
        settings["stage_tables"][sname] = stable
        for key in ("task", "seed"):
            if key not in stage:
                raise SweepError(f"{path}: stage {sname!r} needs {key} (a value or a list)")
        bad = [k for k in stage if k not in STAGE_KEYS and k not in known]
        if bad:
            raise SweepError(f"{path}: stage {sname!r}: {bad[0]} is not a flag of prilora train nor a stage key "
                             f"({', '.join(sorted(STAGE_KEYS))})")
        chosen = _as_list(stage.get("variants", list(variants)))
        missing = [v for v in chosen if v not in variants]
        if missing:
            raise SweepError(f"{path}: stage {sname!r} names variant {missing[0]!r}, which [variants] does not define")
        axes_keys = [k for k in stage if k not in STAGE_KEYS]
        grow = stage.get("grow-edges", 0)
        if grow:
            if not isinstance(grow, int) or grow < 0:
                raise SweepError(f"{path}: stage {sname!r}: grow-edges must be an integer >= 0, got {grow!r}")
            lists = [k for k in axes_keys if isinstance(stage[k], list) or (
                isinstance(stage[k], dict) and any(isinstance(v, list) for v in stage[k].values()))]
            values = [v for k in lists for v in (stage[k].values() if isinstance(stage[k], dict) else [stage[k]])]
            if len(lists) != 1 or not all(isinstance(x, (int, float)) and x > 0 for v in values for x in _as_list(v)):
                raise SweepError(f"{path}: stage {sname!r}: grow-edges needs exactly one grid axis of positive "
                                 f"numbers (e.g. learning-rate), found {lists or 'none'}")
            settings["grow"][sname] = grow
        for key in axes_keys:
            unknown = [v for v in stage[key] if v != "*" and v not in variants] if isinstance(stage[key], dict) else []
            if unknown:
                raise SweepError(f"{path}: stage {sname!r}: {key} is given for variant {unknown[0]!r}, which "
                                 "[variants] does not define (keys are variant names, or \"*\" for the others)")
        for task, variant in itertools.product(_as_list(stage["task"]), chosen):
            fixed = {**defaults, **variants[variant]}
            values = {}
            for key in axes_keys:
                value = stage[key]
                if isinstance(value, dict):  # per variant, "*" for the others
                    if variant not in value and "*" not in value:
                        continue
                    value = value.get(variant, value.get("*"))
                if key in variants[variant]:
                    raise SweepError(f"{path}: {key} is set both by variant {variant!r} and by stage {sname!r}")
                values[key] = value
            for v in values.values():
                if isinstance(v, str) and v.startswith(SELECT) and v[len(SELECT):] not in stage_names[:-1]:
                    raise SweepError(f"{path}: stage {sname!r}: {v!r} must name an earlier stage")
            grid = {k: _as_list(v) for k, v in values.items() if isinstance(v, list)}
            for combo in itertools.product(*grid.values()):
                axes = dict(zip(grid, combo))
                for seed in _as_list(stage["seed"]):
                    flags = {**fixed, **values, **axes, "task": task, "seed": seed}
                    per_task.setdefault(str(task), []).append(PlannedRun(
                        run_id(sname, task, variant, axes, seed), sname, str(task), variant, int(seed), flags,
                        axes=axes))
    for task_runs in per_task.values():
        runs.extend(task_runs)
    check_shared_tables(path, settings["stage_tables"], runs)
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SweepError(f"{path}: run {dup} is planned twice (a list with a repeated value?)")
    return settings, runs


def check_shared_tables(path: str, stage_tables: dict[str, str], runs: list[PlannedRun]) -> None:
    """Stages that name one report table (a dev table over tasks whose runs need per-task flags, such as the
    learning rate) must not put two stages' runs in one cell, where they would be averaged as seeds, nor
    mix runs scored on held-out training examples with runs scored on dev."""
    cells: dict[tuple, str] = {}
    scored_on: dict[str, tuple[bool, str]] = {}
    for run in runs:
        table = stage_tables[run.stage]
        other = cells.setdefault((table, run.task, run.variant), run.stage)
        if other != run.stage:
            raise SweepError(f"{path}: stages {other!r} and {run.stage!r} share table {table!r} and both run "
                             f"{run.variant} on {run.task}: one cell would mix their runs; give one its own table")
        held_out = bool(run.flags.get("holdout"))
        first = scored_on.setdefault(table, (held_out, run.stage))
        if first[0] != held_out:
            raise SweepError(f"{path}: stages {first[1]!r} and {run.stage!r} share table {table!r}, but only one "
                             "scores on a held-out part of train (holdout): give one its own table")


def run_id(stage: str, task, variant: str, axes: dict, seed) -> str:
    """``stage/task/variant/flag=value,...-s<seed>``: a run's id and its folder under runs_dir."""
    tag = ",".join(f"{k}={_fmt(v)}" for k, v in axes.items())
    return f"{stage}/{task}/{variant}/{tag + '-' if tag else ''}s{seed}"


def _fmt_choice(choice: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in choice.items())


def train_argv(flags: dict, output_dir: str) -> list[str]:
    argv = ["train"]
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", _fmt(value)]
    return argv + ["--output-dir", output_dir]


def run_spec_of(flags: dict, output_dir: str) -> dict:
    """The RunSpec `prilora train` would build for these flags, as JSON (raises SweepError)."""
    from ..arguments import UsageError, build_parser, build_spec

    try:
        args = build_parser().parse_args(train_argv(flags, output_dir))
        return json.loads(json.dumps(finite_or_none(build_spec(args).to_dict())))
    except (UsageError, RunError) as e:
        raise SweepError(str(e).removeprefix("prilora train: error: ")) from None
