"""What an adapter holds, layer by layer: ranks, sparsity of A and B, parameter counts.

Works on any PEFT LoRA adapter folder (dense or prilora's sparse export), read from the saved
weights alone, so it also checks what a file really contains rather than what a run reported.
"""

from __future__ import annotations

import os
import re

from .architectures import compile_layer_pattern, layer_index
from .export import AdapterError, read_adapter


def describe(adapter: str, layer_pattern: str | None = None) -> dict:
    config, tensors, sparse = read_adapter(adapter)
    pattern = compile_layer_pattern(layer_pattern)
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        m = re.search(r"^(.*)\.lora_([AB])\.(?:[^.]+\.)?weight$", key)
        if not m:
            continue
        name, which = m.group(1).removeprefix("base_model.model."), m.group(2)
        hit = pattern.search(name + ".")
        layer = layer_index(pattern, name, hit.group(1)) if hit else None
        entry = modules.setdefault(name, {"name": name, "layer": layer, "kind": name[hit.end():] if hit else name})
        entry[which] = {"shape": list(t.shape), "zeros": int((t == 0).sum()), "numel": t.numel()}
    if not modules:
        raise AdapterError(f"{adapter} holds no LoRA matrices (lora_A / lora_B weights)")
    rows = []
    for entry in sorted(modules.values(), key=lambda e: (e["layer"] if e["layer"] is not None else -1, e["name"])):
        a, b = entry.get("A"), entry.get("B")
        rows.append({
            "name": entry["name"], "layer": entry["layer"], "kind": entry["kind"],
            "r": a["shape"][0] if a else None, "in": a["shape"][1] if a else None, "out": b["shape"][0] if b else None,
            "params": (a["numel"] if a else 0) + (b["numel"] if b else 0),
            "a_sparsity": a["zeros"] / a["numel"] if a else None, "b_sparsity": b["zeros"] / b["numel"] if b else None,
        })
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    per_layer = []
    for layer in layers:
        these = [r for r in rows if r["layer"] == layer]
        a_n = sum(r["r"] * r["in"] for r in these)
        per_layer.append({"layer": layer, "ranks": sorted({r["r"] for r in these}), "modules": len(these),
                          "params": sum(r["params"] for r in these),
                          "a_sparsity": sum(r["a_sparsity"] * r["r"] * r["in"] for r in these) / a_n})
    a_total = sum(r["r"] * r["in"] for r in rows)
    a_zero = sum(r["a_sparsity"] * r["r"] * r["in"] for r in rows)
    b_total = sum(r["r"] * r["out"] for r in rows)
    b_zero = sum(r["b_sparsity"] * r["r"] * r["out"] for r in rows)
    other = sum(t.numel() for k, t in tensors.items() if ".lora_" not in k)
    return {"adapter": adapter, "sparse_file": sparse, "task_type": config.get("task_type"),
            "base_model": config.get("base_model_name_or_path"), "modules": rows, "layers": per_layer,
            "lora_params": sum(r["params"] for r in rows), "nonzero_lora_params": round(a_total + b_total - a_zero - b_zero),
            "other_params": other, "a_sparsity": a_zero / a_total, "b_sparsity": b_zero / b_total}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(info: dict) -> str:
    kinds = sorted({r["kind"] for r in info["modules"]}, key=lambda k: [r["kind"] for r in info["modules"]].index(k))
    lines = [f"adapter {info['adapter']} ({'sparse file' if info['sparse_file'] else 'PEFT LoRA'}, "
             f"task {info['task_type']}, base {info['base_model']})", "",
             "layer | rank | " + " | ".join(f"{k} A zeros" for k in kinds) + " | params",
             "---|---|" + "---|" * len(kinds) + "---"]
    for layer in info["layers"]:
        by_kind = {r["kind"]: r for r in info["modules"] if r["layer"] == layer["layer"]}
        cells = [_pct(by_kind[k]["a_sparsity"]) if k in by_kind else "" for k in kinds]
        ranks = ",".join(str(r) for r in layer["ranks"])
        lines.append(f"{layer['layer']} | {ranks} | " + " | ".join(cells) + f" | {layer['params']:,}")
    lines += ["", f"LoRA parameters: {info['lora_params']:,} ({info['nonzero_lora_params']:,} non-zero); "
              f"A sparsity {_pct(info['a_sparsity'])}, B sparsity {_pct(info['b_sparsity'])}; "
              f"other trained parameters (heads): {info['other_params']:,}"]
    return "\n".join(lines)


def plot(info: dict, path: str) -> str:
    """Heatmap: layers x matrices, colour = A sparsity, text = rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = list(dict.fromkeys(r["kind"] for r in info["modules"]))
    layers = [layer["layer"] for layer in info["layers"]]
    grid = np.full((len(layers), len(kinds)), np.nan)
    ranks = {}
    for r in info["modules"]:
        if r["layer"] in layers:
            i, j = layers.index(r["layer"]), kinds.index(r["kind"])
            grid[i, j], ranks[i, j] = r["a_sparsity"], r["r"]
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2.5, 0.4 * len(layers) + 1.8))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), r in ranks.items():
        ax.text(j, i, f"r={r}", ha="center", va="center", color="white" if grid[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    ax.set_title(f"A sparsity and rank per matrix: {os.path.basename(os.path.normpath(info['adapter']))}", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of A that is zero")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
