"""The report's figures (PNG, matplotlib): scores per task, learning-rate grids, ranks per layer and
sparsity over training, each drawn from results lines alone."""

from __future__ import annotations

from collections import defaultdict

from .lines import _pruned, _tasks, grid_axes, group_key, row_labels
from .sweep import score_of, select_values

def scores_figure(cells: dict, tasks: list[str], title: str):
    """One panel per task on its own scale, every seed a dot and the mean ± std beside them, collapsed runs a
    cross on the panel's floor. Bars from 0 would hide what the tables are about: gaps of a point or two
    between methods whose seeds spread as much."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(cells)
    fig, panels = plt.subplots(1, len(tasks), figsize=(len(tasks) * (0.42 * len(variants) + 1.1) + 0.6, 3.4),
                               squeeze=False)
    for ax, task in zip(panels[0], tasks):
        drawn = [x for v in variants for x in cells[v][task]["values"]]
        floor = min(drawn) - 1 if drawn else 0.0
        for i, variant in enumerate(variants):
            c, color = cells[variant][task], f"C{i % 10}"
            if c["values"]:
                ax.scatter([i - 0.12] * len(c["values"]), c["values"], s=12, color=color, alpha=0.6)
            if c["mean"] is not None:
                ax.errorbar([i + 0.12], [c["mean"]], yerr=[c["std"] or 0.0], fmt="o", color=color, capsize=3)
            if c["collapsed"]:
                ax.scatter([i] * c["collapsed"], [floor] * c["collapsed"], marker="x", color="red")
        ax.set_xticks(range(len(variants)), variants, rotation=40, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.set_title(task, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    panels[0][0].set_ylabel("dev score x 100\n(dots: seeds; mean ± std)", fontsize=8)
    fig.suptitle(title + " (collapsed runs: red crosses)" if any(
        cells[v][t]["collapsed"] for v in variants for t in tasks) else title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_scores(cells: dict, tasks: list[str], title: str, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = scores_figure(cells, tasks, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(lines: list[dict], title: str, path: str) -> bool:
    """Held-out score against the grid value, one panel per task and one line per variant; collapsed
    runs are drawn as crosses on the panel's floor, the chosen value as a ring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = grid_axes(lines)
    if len(axes_keys) != 1 or not all(isinstance(line["sweep"]["axes"].get(axes_keys[0]), (int, float))
                                      for line in lines):
        return False
    key, tasks = axes_keys[0], _tasks(lines)
    colors = {v: f"C{i % 10}" for i, v in enumerate(row_labels(lines))}
    fig, panels = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1.6, 3.0), squeeze=False)
    for ax, task in zip(panels[0], tasks):
        groups: dict[str, list[dict]] = defaultdict(list)
        for line in lines:
            if line["task"] == task:
                groups[group_key(line)[1]].append(line)
        ok = [100 * score_of(x) for g in groups.values() for x in g if score_of(x) != float("-inf")]
        floor = min(ok) - 2 if ok else 0.0
        for variant, glines in groups.items():
            glines = sorted(glines, key=lambda x: x["sweep"]["axes"][key])
            xs = [x["sweep"]["axes"][key] for x in glines]
            ys = [100 * score_of(x) if score_of(x) != float("-inf") else None for x in glines]
            color = colors[variant]
            ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None],
                    marker="o", linewidth=1, color=color)
            dead = [x for x, y in zip(xs, ys) if y is None]
            ax.plot(dead, [floor] * len(dead), "x", color=color)
            chosen = select_values(glines, [key])[0][key]
            best = [y for x, y in zip(xs, ys) if x == chosen and y is not None]
            ax.plot([chosen] * len(best), best, "o", markersize=10, fillstyle="none", color=color)
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(key)
    panels[0][0].set_ylabel("held-out score x 100")
    fig.legend([plt.Line2D([], [], color=c, marker="o") for c in colors.values()], list(colors),
               loc="center right", fontsize=7)
    fig.suptitle(f"{title}: ring = chosen, x = collapsed", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.2 / (3.2 * len(tasks) + 1.6), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def curves(lines: list[dict], key) -> dict:
    """One curve per distinct ``key(line)`` (None: not drawn): its first run and the label of the variants
    that share it, so that the ten pruning variants with one rank pattern draw one line, not ten."""
    found: dict = {}
    for line in lines:
        k = key(line)
        if k is not None:
            run, names = found.setdefault(k, (line, []))
            if group_key(line)[1] not in names:
                names.append(group_key(line)[1])
    return {k: (run, ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else ""))
            for k, (run, names) in found.items()}


def plot_ranks(lines: list[dict], path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = curves(lines, lambda x: tuple(x["ranks"]) if x.get("ranks") and x.get("method") in ("prilora", "lora")
                   else None)
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for ranks, (_, label) in shown.items():
        ax.plot(range(len(ranks)), ranks, marker="o", label=f"{label}: {'-'.join(map(str, ranks))}")
    return _save(fig, ax, "layer", "LoRA rank", "ranks per layer", path)


def plot_sparsity(lines: list[dict], path: str) -> bool:
    """A zeros over training (fraction of the run), before and after each pruning event: one run per pruned
    matrix and ratio (criteria and schedules with the same ones have the same sparsity), labelled with the
    variants it stands for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = curves(lines, _pruned)
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for i, ((matrix, ratio), (line, label)) in enumerate(shown.items()):
        # Only what was measured: points just before (open) and just after (filled) each event, no lines
        # between them (when the zeros regrow between events is not recorded); after the last event the
        # mask is held, so its sparsity is drawn on to the end.
        steps, before, after = zip(*line["pruning_history"])
        xs = [s / line["steps"] for s in steps]
        color = f"C{i % 10}"
        what = f"{ratio:g} of {matrix}" if ratio is not None else matrix
        ax.plot(xs, after, "o", markersize=3, color=color,
                label=f"{label}: {what} ({line['task']}, seed {line['seed']})")
        ax.plot(xs, before, "o", markersize=3, fillstyle="none", color=color)
        ax.plot([xs[-1], 1.0], [after[-1]] * 2, color=color, linewidth=1)
    ax.set_xlim(0, 1.02)
    return _save(fig, ax, "fraction of training", "fraction of the pruned matrix at zero",
                 "just before (open) and after (filled) each pruning event; held after the last", path)


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> bool:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
