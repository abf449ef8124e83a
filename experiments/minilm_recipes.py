"""Choose the learning rate of the minilm-cpu recipes without looking at dev.

For each task, plain LoRA (the baseline, so the choice cannot favour PRILoRA) trains with each
learning rate of a small grid on 90% of the training set and is scored on the other 10%
(`prilora train --holdout 0.1`, a fixed random part of train). Epochs, length and the rest are
fixed by the CPU budget (each task in minutes on 2 cores). When the best rate is at an end of
the grid, the grid is extended by one more factor of 2 that way (once). One JSON line per finished run goes
to results/minilm-recipes.jsonl; runs already there are skipped, so rerunning resumes.

    python experiments/minilm_recipes.py            # run (or resume) the grid
    python experiments/minilm_recipes.py --tasks rte # only some tasks (e.g. two processes, one thread each)
    python experiments/minilm_recipes.py --report   # table: holdout score per task and learning rate
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "minilm-recipes.jsonl")
GLUE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "glue")
TASKS = ["cola", "mrpc", "stsb", "rte"]
LEARNING_RATES = ["5e-4", "1e-3", "2e-3"]
SEED = 0


def report():
    with open(OUT) as f:
        rows = [json.loads(line) for line in f]
    print("| task | learning rate | holdout score (x100) | collapsed | epochs | steps | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["task"], r["learning_rate"])):
        print(f"| {r['task']} | {r['learning_rate']:g} | {100 * r['metrics']['score']:.2f} | {r['collapsed']} | "
              f"{r['recipe']['epochs']:g} | {r['steps']} | {r['train_runtime_s']:.0f} |")


def run(task, lr):
    with tempfile.TemporaryDirectory() as out:
        cmd = ["prilora", "train", "--task", task, "--method", "lora", "--seed", str(SEED), "--holdout", "0.1",
               "--learning-rate", lr, "--data-dir", GLUE_DIR, "--output-dir", out, "--quiet"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "results.json")) as f:
            result = json.load(f)
    result["command"] = " ".join([*cmd[:11], "--data-dir", "../shared/data/glue", "--output-dir", "OUT", "--quiet"])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(task, lr, result["metrics"]["score"], flush=True)
    return result


def scores(task):
    if not os.path.isfile(OUT):
        return {}
    with open(OUT) as f:
        rows = [json.loads(line) for line in f]
    return {r["learning_rate"]: r["metrics"]["score"] for r in rows if r["task"] == task}


def main():
    if "--report" in sys.argv:
        return report()
    tasks = sys.argv[sys.argv.index("--tasks") + 1].split(",") if "--tasks" in sys.argv else TASKS
    for task in tasks:
        for lr in LEARNING_RATES:
            if float(lr) not in scores(task):
                run(task, lr)
        got = {lr: (s if s == s else float("-inf")) for lr, s in scores(task).items()}  # NaN counts as worst
        grid = [float(x) for x in LEARNING_RATES]
        best = max(got, key=got.get)
        if best == min(grid) and best / 2 not in got:
            run(task, f"{best / 2:g}")
        elif best == max(grid) and best * 2 not in got:
            run(task, f"{best * 2:g}")


if __name__ == "__main__":
    main()
