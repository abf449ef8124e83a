"""Dev scores of the shipped minilm-cpu recipes (no flag overrides): `prilora train` per task,
method and seed. One JSON line per finished run goes to results/minilm-dev.jsonl; runs already
there are skipped, so rerunning resumes.

    python experiments/minilm_dev.py --tasks mrpc,rte --methods prilora --seeds 0,1,2
    python experiments/minilm_dev.py --report     # mean ± std over seeds, with the majority class
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "minilm-dev.jsonl")
GLUE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "glue")


def rows():
    if not os.path.isfile(OUT):
        return []
    with open(OUT) as f:
        return [json.loads(line) for line in f]


def majority(task):
    from prilora.glue import get_task, load_split

    t = get_task(task)
    if t.is_regression:
        return None
    labels = load_split(t, t.eval_splits[0], GLUE_DIR).labels
    return max(Counter(labels).values()) / len(labels)


def report():
    cells = {}
    for r in rows():
        cells.setdefault((r["task"], r["method"]), []).append(r)
    print("| task | method | dev score (x100), mean ± std | seeds | per seed | collapsed | majority class | lr | epochs | train s (mean) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (task, method), rs in sorted(cells.items()):
        rs.sort(key=lambda r: r["seed"])
        scores = [100 * r["metrics"]["score"] for r in rs]
        std = f"{statistics.stdev(scores):.2f}" if len(scores) > 1 else "n/a"
        base = majority(task)
        print(f"| {task} | {method} | {statistics.mean(scores):.2f} ± {std} | {len(rs)} | "
              f"{', '.join(f'{x:.2f}' for x in scores)} | {sum(r['collapsed'] for r in rs)} | "
              f"{'-' if base is None else f'{100 * base:.2f}'} | {rs[0]['learning_rate']:g} | "
              f"{rs[0]['recipe']['epochs']:g} | {statistics.mean(r['train_runtime_s'] for r in rs):.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="mrpc")
    ap.add_argument("--methods", default="prilora")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        return report()
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in map(int, args.seeds.split(",")):
                if any((r["task"], r["method"], r["seed"]) == (task, method, seed) for r in rows()):
                    continue
                with tempfile.TemporaryDirectory() as out:
                    cmd = ["prilora", "train", "--task", task, "--method", method, "--seed", str(seed),
                           "--data-dir", GLUE_DIR, "--output-dir", out, "--quiet"]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    with open(os.path.join(out, "results.json")) as f:
                        result = json.load(f)
                result["command"] = " ".join([*cmd[:8], "--data-dir", "../shared/data/glue", "--output-dir", "OUT"])
                os.makedirs(os.path.dirname(OUT), exist_ok=True)
                with open(OUT, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(task, method, seed, result["metrics"]["score"], flush=True)


if __name__ == "__main__":
    main()
