"""``prilora report``: tables and plots from results JSON lines alone.

Everything shown is recomputed from the raw lines (one per finished run): per cell the mean
and standard deviation over seeds (sample std, n - 1) of the headline score x 100, the number
of seeds behind it, and collapsed runs counted apart, never averaged in. Learning-rate grids
(stages scored on a held-out part of train) are shown with the value each method chose. Under
each dev table: the tasks' other metrics, PRILoRA against every other row (Welch's t-test),
because 3 seeds rarely settle a gap of a point and the reader should see how little they do, and,
for a table that crosses two rank patterns with two pruning settings, each idea's effect and
their interaction.
A run made again after its grid grew replaces its earlier line; cells still made at an outdated
choice are marked.
"""

from __future__ import annotations

import io
import os
import statistics
from collections import Counter, defaultdict

from ..glue.tasks import TASKS
from ..run_folder import unwritable
from .lines import (TASK_ORDER, ReportError, _tasks, _value, distinct_runs, grid_axes, group_key, label_unswept,
                    latest, load, placement, row_labels)
from .plots import plot_grid, plot_ranks, plot_scores, plot_sparsity
from .sweep import (Sweep, describe_left, next_edge, read_plan, seconds_left, select_values, stage_grid,
                    study_progress)


def scores(lines: list[dict]) -> list[float]:
    """Headline scores x 100 of the runs that did not collapse (the ones a cell averages)."""
    return [100 * line["metrics"]["score"] for line in lines if not line.get("collapsed") and
            (line.get("metrics") or {}).get("score") is not None]


def cell(lines: list[dict]) -> dict:
    ok = scores(lines)
    collapsed = len(lines) - len(ok)
    return {"mean": statistics.fmean(ok) if ok else None, "std": statistics.stdev(ok) if len(ok) > 1 else None,
            "n": len(ok), "collapsed": collapsed, "seeds": sorted({line.get("seed") for line in lines}),
            "values": ok}


def fmt_cell(c: dict) -> str:
    if c["mean"] is None:
        text = "-"
    elif c["std"] is None:
        text = f"{c['mean']:.2f}"
    else:
        text = f"{c['mean']:.2f} ± {c['std']:.2f}"
    text += f" ({c['n']})"
    if c["collapsed"]:
        text += f" [{c['collapsed']} collapsed]"
    return text


def _params(lines: list[dict]) -> str:
    """One count, or the range of them (AdaLoRA's final ranks differ by run; full FT's heads by task)."""
    full = all(line.get("method") == "full" for line in lines)
    values = sorted({line.get("trainable_params" if full else "lora_params") for line in lines} - {None})
    counts = "" if not values else f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}-{values[-1]:,}"
    return (f"all ({counts})" if counts else "all") if full else counts or "-"


def majority(lines: list[dict], task: str, metric: str = "score") -> str:
    """The score x 100 of always predicting training's commonest label, from the lines that recorded it
    (a range if their splits differ); "" when none did (regression, or lines from before it was kept)."""
    values = {round(100 * x["majority_baseline"][metric], 2) for x in lines if x["task"] == task
              and (x.get("majority_baseline") or {}).get(metric) is not None}
    if not values:
        return ""
    return f"{min(values):.2f}" if len(values) == 1 else f"{min(values):.2f}-{max(values):.2f}"


def _examples(line: dict) -> tuple:
    return (line["task"], line.get("holdout"), line.get("train_examples"),
            tuple(sorted((line.get("eval_examples") or {}).items())), line.get("data_source"))


def fill_majority(lines: list[dict]) -> None:
    """Lines made before ``majority_baseline`` was recorded take it from a line trained and scored on the
    same examples (task, held-out part, split sizes): it depends on nothing else. In memory only."""
    known = {_examples(x): x["majority_baseline"] for x in lines if x.get("majority_baseline")}
    for x in lines:
        if "majority_baseline" not in x and _examples(x) in known:
            x["majority_baseline"] = known[_examples(x)]


def majority_note(lines: list[dict], where: str) -> list[str]:
    floors = {t: majority(lines, t) for t in _tasks(lines)}
    found = [f"{t} {floor}" for t, floor in floors.items() if floor]
    return (["", f"Always predicting the commonest training label scores, {where}: " + ", ".join(found) + "."]
            if found else [])


def outdated(line: dict, lines: list[dict]) -> bool:
    """A run made at a value that the stage it selected from no longer chooses (its grid grew since, and
    the sweep is making it again)."""
    sw = line.get("sweep") or {}
    table = placement(sw)[0] if sw else None
    for stage, info in (sw.get("selected") or {}).items():
        source = [x for x in lines if x.get("sweep") and x["task"] == line["task"] and x["sweep"]["stage"] == stage
                  and placement(x["sweep"])[0] == table and x["sweep"]["variant"] == sw["variant"]]
        if source and select_values(source, list(info["chosen"]))[0] != info["chosen"]:
            return True
    return False


def outdated_runs(lines: list[dict]) -> set[int]:
    """The ``id`` of every line made at an outdated choice, judged once against all the lines (the grids
    may sit in another table than the dev runs that chose from them)."""
    return {id(x) for x in lines if outdated(x, lines)}


def result_table(lines: list[dict], stale: set[int] | None = None) -> tuple[list[str], dict]:
    """Rows: variants; columns: tasks, then the average over tasks (when a row has every task). Cells
    with runs in ``stale`` (default: judged against these lines) are marked †."""
    stale = outdated_runs(lines) if stale is None else stale
    tasks = _tasks(lines)
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_variant[group_key(line)[1]].append(line)
    averaged = len(tasks) > 1  # the average of one task would only repeat it
    out = ["| method | " + " | ".join(tasks) + (" | average" if averaged else "") + " | LoRA params | learning rate |",
           "|---|" + "---|" * len(tasks) + ("---|" if averaged else "") + "---|---|"]
    cells = {}
    for variant, vlines in by_variant.items():
        row = {t: cell([x for x in vlines if x["task"] == t]) for t in tasks}
        cells[variant] = row
        means = [row[t]["mean"] for t in tasks]
        average = f"{statistics.fmean(means):.2f}" if all(m is not None for m in means) else "-"
        rates = []
        for t in tasks:
            lrs = sorted({x.get("learning_rate") for x in vlines if x["task"] == t} - {None})
            if lrs:
                rates.append(f"{t} {'/'.join(f'{lr:g}' for lr in lrs)}")
        marks = [" †" if any(id(x) in stale for x in vlines if x["task"] == t) else "" for t in tasks]
        out.append(f"| {variant} | " + " | ".join(fmt_cell(row[t]) + m for t, m in zip(tasks, marks))
                   + (f" | {average}" if averaged else "") + f" | {_params(vlines)} | {'; '.join(rates)} |")
    floors = [majority(lines, t) for t in tasks]
    if any(floors):
        out.append("| majority class | " + " | ".join(f or "-" for f in floors) + " |" + " |" * (2 + averaged))
    if "†" in "".join(out):
        out += ["", "† made at a learning rate that the method's grid, grown since, no longer chooses; the sweep "
                "makes these runs again, and the new lines replace them here."]
    return out, cells


def metrics_table(lines: list[dict]) -> list[str]:
    """The other metrics of each task (MRPC F1, STS-B Pearson and Spearman, CoLA accuracy, ...), mean ± std
    over the same runs as the score table."""
    columns = [(t, m) for t in _tasks(lines) for m in sorted({m for x in lines if x["task"] == t
                                                               for m in (x.get("metrics") or {})})
               if m not in ("score", TASKS[t].score_metric)]
    if not columns:
        return []
    out = ["| method | " + " | ".join(f"{t} {m}" for t, m in columns) + " |", "|---|" + "---|" * len(columns)]
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_variant[group_key(line)[1]].append(line)
    for variant, vlines in by_variant.items():
        cells = []
        for t, m in columns:
            these = [{**x, "metrics": {"score": x["metrics"].get(m)}} for x in vlines
                     if x["task"] == t and m in (x.get("metrics") or {})]
            cells.append(fmt_cell(cell(these)) if these else "")
        out.append(f"| {variant} | " + " | ".join(cells) + " |")
    floors = [majority(lines, t, m) for t, m in columns]
    if any(floors):
        out.append("| majority class | " + " | ".join(f or "-" for f in floors) + " |")
    return out


def _t_test(difference: float, parts: list[tuple[float, int]]) -> tuple[float, float, float, float] | None:
    """t, Welch-Satterthwaite degrees of freedom, two-sided p and the half-width of the 95% confidence
    interval of a difference of independent means, given each mean's (variance of the mean, runs); None
    when there is no spread at all. The interval says how large a gap the seeds leave possible either way,
    which a p-value alone does not."""
    from scipy.stats import t as student_t

    se2 = sum(v for v, _ in parts)
    if se2 == 0:
        return None
    t = difference / se2 ** 0.5
    df = se2 ** 2 / sum(v ** 2 / (n - 1) for v, n in parts)
    return t, df, 2 * student_t.sf(abs(t), df), student_t.ppf(0.975, df) * se2 ** 0.5


def _test_cells(test: tuple | None) -> str:
    """t | df | p | 95% interval, as the comparison tables show them; a p under 0.0005 reads "< 0.001",
    not "0.000", which would claim certainty that three seeds cannot give."""
    if not test:
        return "- | - | - | -"
    p = "< 0.001" if test[2] < 0.0005 else f"{test[2]:.3f}"
    return f"{test[0]:.2f} | {test[1]:.1f} | {p} | ±{test[3]:.2f}"


def welch(a: list[float], b: list[float]) -> tuple[float, float, float, float] | None:
    """Welch's t, its degrees of freedom (Welch-Satterthwaite), the two-sided p and the 95% interval's
    half-width; None when either side has fewer than two runs or both have no spread."""
    if len(a) < 2 or len(b) < 2:
        return None
    return _t_test(statistics.fmean(a) - statistics.fmean(b),
                   [(statistics.variance(x) / len(x), len(x)) for x in (a, b)])


def average_test(pairs: list[tuple[list[float], list[float]]]) -> tuple[float, float, float, float] | None:
    """The same test for the average over tasks (the paper's headline number): the difference of the two
    rows' averages of task means, whose variance is the sum of the tasks' (seeds of different tasks are
    independent runs) over the number of tasks squared; Welch-Satterthwaite degrees of freedom over all.
    With 3 seeds a task it sees a gap that no single task's test can."""
    if any(len(a) < 2 or len(b) < 2 for a, b in pairs):
        return None
    k = len(pairs)
    return _t_test(statistics.fmean(statistics.fmean(a) - statistics.fmean(b) for a, b in pairs),
                   [(statistics.variance(x) / len(x) / k ** 2, len(x)) for pair in pairs for x in pair])


def comparison_table(lines: list[dict], reference: str, stale: set[int] = frozenset()) -> list[str]:
    """The reference variant against every other, per task and over the average of the tasks both have (two or
    more; named when not all of the table's, so that a study part way still compares rows over what they
    share): difference of the mean scores (points) and Welch's t-test over seeds; collapsed runs are left
    out, as in the score table; † as there."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in lines:
        groups[(line["task"], group_key(line)[1])].append(line)
    variants = row_labels(lines)
    if reference not in variants:
        return []
    out = [f"| task | {reference} − | difference | Welch t | df | p (two-sided) | 95% interval | seeds |",
           "|---|---|---|---|---|---|---|---|"]

    def row(task, variant, difference, test, seeds, stale_lines):
        mark = " †" if any(id(x) in stale for x in stale_lines) else ""
        out.append(f"| {task} | {variant}{mark} | {difference:+.2f} | {_test_cells(test)} | {seeds} |")

    tasks = _tasks(lines)
    for task in tasks:
        a = scores(groups.get((task, reference), []))
        for variant in variants:
            b = scores(groups.get((task, variant), []))
            if variant == reference or not a or not b:
                continue
            row(task, variant, statistics.fmean(a) - statistics.fmean(b), welch(a, b), f"{len(a)} vs {len(b)}",
                groups[(task, reference)] + groups[(task, variant)])
    for variant in variants:
        if variant == reference:
            continue
        both = {t: (scores(groups.get((t, reference), [])), scores(groups.get((t, variant), []))) for t in tasks}
        shared = [t for t, (a, b) in both.items() if a and b]
        if len(shared) < 2:
            continue
        pairs = [both[t] for t in shared]
        label = f"average of {len(shared)}" + ("" if len(shared) == len(tasks) else f" ({', '.join(shared)})")
        row(label, variant, statistics.fmean(statistics.fmean(a) - statistics.fmean(b) for a, b in pairs),
            average_test(pairs), " + ".join(str(len(a)) for a, _ in pairs) + " vs " + " + ".join(str(len(b)) for _, b in pairs),
            [x for t in shared for x in groups[(t, reference)] + groups[(t, variant)]])
    return out if len(out) > 2 else []


def hint_reference(lines: list[dict]) -> str | None:
    """A PRILoRA row to suggest as --reference, where runs made by hand with several settings are labelled
    ``prilora (...)`` and so none is named plain prilora."""
    labels = row_labels(lines)
    named = [label for label in labels if label.startswith("prilora (")]
    return named[0] if named and len(labels) > 1 else None


def _factors(line: dict) -> tuple[str, str] | None:
    """(rank pattern, pruning) of a LoRA-type run, as labels; None for AdaLoRA and full fine-tuning."""
    ranks, cfg = line.get("ranks"), line.get("prilora")
    if not ranks or not cfg or line.get("method") not in ("lora", "prilora"):
        return None
    rank = f"uniform r={ranks[0]}" if len(set(ranks)) == 1 else f"{cfg['rank_schedule']} {ranks[0]} -> {ranks[-1]}"
    crit = cfg.get("prune_criterion", "none")
    prune = "no pruning" if crit == "none" else f"{crit} pruning of {cfg['prune_matrix']} at {cfg['prune_ratio']:g}"
    return rank, prune


def factorial_table(lines: list[dict]) -> list[str]:
    """When a table's four variants cross two rank patterns with two pruning settings (ablation-2x2): per
    task, each idea's effect with and without the other, and their interaction with its standard error over
    seeds. An interaction near 0 means the two effects add up; the paper's claim is that both help."""
    levels: dict[str, set] = defaultdict(set)
    for line in lines:
        levels[group_key(line)[1]].add(_factors(line))
    if len(levels) != 4 or any(len(v) != 1 or None in v for v in levels.values()):
        return []
    cell_of = {next(iter(v)): variant for variant, v in levels.items()}
    ranks = sorted({r for r, _ in cell_of}, key=lambda r: (not r.startswith("uniform"), r))
    prunes = sorted({p for _, p in cell_of}, key=lambda p: (p != "no pruning", p))
    if len(ranks) != 2 or len(prunes) != 2 or len(cell_of) != 4:
        return []
    a, b, c, d = (cell_of[(r, p)] for r, p in ((ranks[0], prunes[0]), (ranks[1], prunes[0]),
                                                (ranks[0], prunes[1]), (ranks[1], prunes[1])))
    out = [f"Schedule x pruning, in points: {a} = {ranks[0]}, {prunes[0]}; {b} = {ranks[1]}, {prunes[0]}; "
           f"{c} = {ranks[0]}, {prunes[1]}; {d} = {ranks[1]}, {prunes[1]}. Each idea's effect without and "
           f"with the other; both together against the sum of the two alone; and the interaction, "
           f"{d} − {c} − {b} + {a}, ± its standard error over seeds (near 0: the two add up).", "",
           f"| task | {b} − {a} | {d} − {c} | {c} − {a} | {d} − {b} | {d} − {a} | sum of the two alone | "
           "interaction ± s.e. |", "|---|---|---|---|---|---|---|---|"]
    squares = {}  # task -> variant -> scores, for the tasks with all four cells
    for task in _tasks(lines):
        got = {v: scores([x for x in lines if x["task"] == task and group_key(x)[1] == v]) for v in (a, b, c, d)}
        if not all(got.values()):
            continue
        m = {v: statistics.fmean(x) for v, x in got.items()}
        inter = m[d] - m[c] - m[b] + m[a]
        se = (f" ± {sum(statistics.variance(x) / len(x) for x in got.values()) ** 0.5:.2f}"
              if all(len(x) > 1 for x in got.values()) else "")
        out.append(f"| {task} | {m[b] - m[a]:+.2f} | {m[d] - m[c]:+.2f} | {m[c] - m[a]:+.2f} | {m[d] - m[b]:+.2f} | "
                   f"{m[d] - m[a]:+.2f} | {m[b] + m[c] - 2 * m[a]:+.2f} | {inter:+.2f}{se} |")
        squares[task] = got
    if len(squares) < 2:
        return out if len(out) > 4 else []
    k = len(squares)
    out += ["", f"The same effects averaged over the {k} tasks with all four cells, each tested like the "
            "average rows of the next table (the tasks' variances added; Welch-Satterthwaite degrees of freedom):", "",
            "| effect | average of tasks | t | df | p (two-sided) | 95% interval |", "|---|---|---|---|---|---|"]
    for name, sign in ((f"{b} − {a}", {b: 1, a: -1}), (f"{d} − {c}", {d: 1, c: -1}), (f"{c} − {a}", {c: 1, a: -1}),
                       (f"{d} − {b}", {d: 1, b: -1}), (f"{d} − {a}", {d: 1, a: -1}),
                       ("interaction", {d: 1, c: -1, b: -1, a: 1})):
        effect = statistics.fmean(sum(w * statistics.fmean(got[v]) for v, w in sign.items()) for got in squares.values())
        test = (_t_test(effect, [(statistics.variance(got[v]) / len(got[v]) / k ** 2, len(got[v]))
                                 for got in squares.values() for v in sign])
                if all(len(got[v]) > 1 for got in squares.values() for v in sign) else None)
        out.append(f"| {name} | {effect:+.2f} | {_test_cells(test)} |")
    return out


def selection_table(lines: list[dict]) -> list[str]:
    """Rows: task x variant; each value of the grid with its held-out score, the chosen one in bold."""
    axes = grid_axes(lines)
    if len(axes) != 1:
        return result_table(lines)[0]
    key = axes[0]
    out = [f"| task | method | held-out score at each {key} (the chosen one in bold) | chosen |", "|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in lines:
        groups[(line["task"], group_key(line)[1])].append(line)
    plans: dict[str, tuple | None] = {}  # each spec read once per table, and afresh on the next call
    for (task, variant), glines in sorted(groups.items(), key=lambda kv: (TASK_ORDER.index(kv[0][0]), kv[0][1])):
        chosen, _ = select_values(glines, [key])
        values = sorted({x["sweep"]["axes"].get(key) for x in glines})
        cells = []
        for v in values:
            text = f"{_value(v)}: {fmt_cell(cell([x for x in glines if x['sweep']['axes'].get(key) == v]))}"
            cells.append(f"**{text}**" if v == chosen[key] else text)
        specs = {x["sweep"].get("name") for x in glines}  # sweeps sharing a table may have other grids
        grid = {x["sweep"]["axes"].get(key) for x in lines  # this method's grid in its spec, before any growth
                if group_key(x)[1] == variant and x["sweep"].get("name") in specs and not x["sweep"].get("grown")}
        record = glines[0]["sweep"]
        spec = record.get("spec") if len(specs) == 1 else None
        if spec and spec not in plans:
            plans[spec] = read_plan(spec)
        limit, planned = stage_grid(plans.get(spec), record["stage"], task, variant, key)
        complete = grid | planned <= set(values)  # the spec, where readable, knows values no line has yet
        beyond = next_edge(values, chosen[key], sum(bool(x["sweep"].get("grown")) for x in glines),
                           len({x["seed"] for x in glines}), limit)
        choice = _value(chosen[key]) if complete and beyond is None else \
            f"{_value(chosen[key])} so far (grid unfinished)" if beyond is None else \
            f"{_value(chosen[key])} so far (at the grid's end: {_value(beyond)} runs next)"
        grown = [v for v in values if any(x["sweep"].get("grown") for x in glines if x["sweep"]["axes"].get(key) == v)]
        if grown:
            choice += f" (grid grown by {', '.join(_value(v) for v in grown)})"
        out.append(f"| {task} | {variant} | " + " · ".join(cells) + f" | {choice} |")
    return out + majority_note(lines, "on the same held-out examples")


def regrowth(runs: list[dict]) -> str | None:
    """Whether pruned weights stay zero until the next event, from every run's pruning history (``runs``:
    each run once, as ``distinct_runs`` gives them). The zeros just before an event, after the first, are
    what is left of the previous event's."""
    left = [max(before for _, before, _ in line["pruning_history"][1:]) for line in runs
            if len(line.get("pruning_history") or []) > 1]
    if not left:
        return None
    none_left = sum(1 for x in left if x == 0)
    text = (f"Zeros left of one pruning event just before the next: none in {none_left} of the {len(left)} runs "
            "with two or more events (every pruned weight had moved off zero: pruning zeroes without freezing)")
    if none_left < len(left):
        # two significant digits: one weight of a few hundred thousand must not print as 0.0000
        text += f"; in the other {len(left) - none_left}, at most {100 * max(left):.2g}% of the pruned weights"
    return text + "."


GENERATED_MARK = "<!-- generated -->"  # where in --notes the report's introduction goes (default: first)
PROGRESS_MARK = "<!-- progress -->"


def progress_table(specs: list[str]) -> list[str]:
    """Runs planned, done and left per spec, as ``prilora sweep SPEC --dry-run`` counts them now, so that a
    report of an unfinished study says where it stands without a hand-kept count going stale."""
    sweeps = [Sweep(path, stream=io.StringIO()) for path in specs]  # grow() logs; the table says it instead
    study = study_progress(sweeps)
    rows = ["| spec | runs planned | done | left | time left (estimate) |", "|---|---|---|---|---|"]
    for sweep, done, todo in study["specs"]:
        rows.append(f"| `{sweep.path}` | {len(sweep.runs)} | {len(done)} | {len(todo)} | "
                    + (describe_left(*seconds_left(todo, study["times"], sweep.jobs), sweep.jobs) if todo
                       else "finished") + " |")
    rows.append(f"| all, each distinct run once | {study['planned']} | {study['done']} | {len(study['left'])} | "
                + (study["estimate"] if study["left"] else "finished") + " |")
    return rows + ["", "Counted when this report was made. Planned runs include the values that grids grew by so far "
                   "(a grid whose best value sits at an end still grows). A spec counts as done the runs it takes "
                   "from earlier tables once those exist, so a later spec's runs left include some that an earlier "
                   "spec will make; the last row counts each such run once. Time left: the mean recorded training "
                   "time of the same task and method (else task) for each run left, divided by the runs made at a "
                   "time; loading and evaluation are not in it."]


def describe_machine(machine: dict) -> str:
    threads = machine.get("torch_threads")
    return ", ".join(str(part) for part in (
        machine.get("platform", "?"),
        f"{machine['cpu_count']} CPUs" if machine.get("cpu_count") else None,
        machine.get("device"),
        f"{threads} torch thread(s) a run" if threads else None,
    ) if part)


def describe_versions(versions: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items()) or "?"


def setups(lines: list[dict], key: str, describe) -> str:
    """What the runs ran on, with how many runs each, when they did not all run on the same."""
    counts = Counter(describe(line.get(key) or {}) for line in lines)
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{setup} ({n} run{'' if n == 1 else 's'})" for setup, n in sorted(counts.items()))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def build_report(paths: list[str], out: str, plots_dir: str | None = None, notes: str | None = None,
                 command: str | None = None, reference: str | None = None, progress: list[str] | None = None) -> str:
    """The Markdown report of the result files, written to ``out``. ``reference``: the row every other is
    tested against; given, it must name a row; None tests against a row named prilora where a table has one."""
    lines, superseded = latest(load(paths))
    label_unswept(lines)
    tested = reference or "prilora"
    rows = row_labels([line for line in lines if not line.get("holdout")])
    if reference is not None and reference not in rows:
        raise ReportError(f"--reference {reference!r} names no row of a dev table: pass one of "
                          + ", ".join(repr(row) for row in rows))
    if notes and not os.path.isfile(notes):
        raise ReportError(f"notes file {notes} not found")
    plots_dir = plots_dir or os.path.join(os.path.dirname(out) or ".", "results")
    if os.path.isdir(out):
        raise ReportError(f"--out {out} is a folder: pass the path of the Markdown file to write")
    folders = (os.path.dirname(out) or ".", plots_dir)
    for folder in folders:  # all checked before any is made
        if why := unwritable(folder):
            raise ReportError(f"cannot write to {folder} ({why}): pass --out (or --plots) in a writable folder")
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    fill_majority(lines)
    stale = outdated_runs(lines)
    rel = os.path.relpath(plots_dir, os.path.dirname(out) or ".")
    tables: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        tables[group_key(line)[0]].append(line)
    runs = distinct_runs(lines)
    copies = f"; and {len(lines) - len(runs)} line(s) that copy runs of an earlier file into a later table" \
        if len(runs) < len(lines) else ""
    intro = (f"Generated by `{command or 'prilora report ' + ' '.join(paths) + ' --out ' + out}` from the raw "
          f"results alone ({len(runs)} runs{copies}). Cells: headline score x 100 on dev (on held-out training examples "
          "for learning-rate grids; CoLA MCC, STS-B mean of Pearson "
          "and Spearman, MNLI matched accuracy, accuracy elsewhere), mean ± sample standard deviation over seeds, "
          "(number of seeds), and runs that collapsed (constant predictions or a non-finite loss) counted apart, "
          "not averaged in."
          + (f" {superseded} earlier line(s) of runs made again after their learning-rate grid grew and chose "
             "another value are left out (the files keep them)." if superseded else ""))
    md = ["# Results", ""]
    table = progress_table(progress) if progress else []
    if notes:
        with open(notes) as f:
            text = f.read().rstrip()
        if table and PROGRESS_MARK in text:
            text, table = text.replace(PROGRESS_MARK, "\n".join(table)), []
        if GENERATED_MARK in text:  # the notes lead (a summary first), the report's own introduction there
            text, intro = text.replace(GENERATED_MARK, intro), None
        md += ([intro, ""] if intro else []) + [text, ""]
    else:
        md += [intro, ""]
    if table:
        md += ["## Progress", ""] + table + [""]
    models = sorted({line.get("model", "?") for line in lines})
    md += [f"Models: {', '.join(models)}. Machines: {setups(runs, 'machine', describe_machine)}. "
           f"Software: {setups(runs, 'versions', describe_versions)}.", ""]
    for name, tlines in tables.items():
        held_out = any(line.get("holdout") for line in tlines)
        md += [f"## {name}" + (" (scored on a held-out part of train)" if held_out else ""), ""]
        if held_out:
            md += selection_table(tlines)
            png = f"grid-{_slug(name)}.png"
            if plot_grid(tlines, name, os.path.join(plots_dir, png)):
                md += ["", f"![grid: {name}]({rel}/{png})"]
        else:
            table, cells = result_table(tlines, stale)
            md += table
            png = f"scores-{_slug(name)}.png"
            plot_scores(cells, _tasks(tlines), name, os.path.join(plots_dir, png))
            md += ["", f"![scores: {name}]({rel}/{png})"]
            others = metrics_table(tlines)
            if others:
                md += ["", "Other metrics (x 100), over the same runs:", ""] + others
            crossed = factorial_table(tlines)
            if crossed:
                md += [""] + crossed
            compared = comparison_table(tlines, tested, stale)
            if not compared and reference is None and (named := hint_reference(tlines)):
                md += ["", f"No row is named prilora, so none is tested against the others: to test them against "
                       f"one, pass it as --reference, e.g. `--reference '{named}'`."]
            if compared:
                md += ["", f"{tested} against each other row: difference of the mean dev scores in points, and "
                       "Welch's t-test over seeds (two-sided; with 3 seeds a side it detects only large gaps), with the"
                       " 95% confidence interval of the difference (the difference ± this: gaps of that size either"
                       " way are not ruled out)."
                       " The average row tests the average over tasks: each task's mean difference averaged,"
                       " their variances added (seeds of different tasks are independent runs), over the tasks"
                       " both rows have (named when not all). Not corrected for the number of comparisons.", ""] + compared
        md.append("")
    if plot_ranks(lines, os.path.join(plots_dir, "ranks.png")):
        md += ["## Ranks per layer", "", f"![ranks per layer]({rel}/ranks.png)", ""]
    if plot_sparsity(lines, os.path.join(plots_dir, "sparsity.png")):
        md += ["## Sparsity over training", "", f"![sparsity over training]({rel}/sparsity.png)", ""]
        md += [regrown, ""] if (regrown := regrowth(runs)) else []
    text = "\n".join(md).rstrip() + "\n"
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return text
