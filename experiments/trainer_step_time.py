"""Whole `prilora train` runs of LoRA and PRILoRA, alternated, in the GLUE study's regime.

`prilora bench` times one step on a fixed batch. This times what the study's runs do: Trainer,
the PRILoRA callback (statistics, events, the pruner's state in checkpoints), dynamically padded
batches of real GLUE data, one thread. The methods alternate run by run so machine noise hits
both alike; each run's `train_runtime_s` (Trainer's, training only) and its steps are recorded.
Run it on a quiet machine. Appends one JSON line to results/trainer-step-time.jsonl.

    OMP_NUM_THREADS=1 python experiments/trainer_step_time.py --task cola --max-steps 80 --repeats 3
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(method: str, args, folder: str) -> dict:
    out = os.path.join(folder, method)
    cmd = [sys.executable, "-m", "prilora.cli", "train", "--task", args.task, "--method", method,
           "--recipe", "minilm-cpu", "--data-dir", args.data_dir, "--max-steps", str(args.max_steps),
           "--output-dir", out, "--overwrite", "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    return {"method": method, "train_runtime_s": result["train_runtime_s"], "steps": result["steps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cola")
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, alternated")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "glue"))
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for method in ("lora", "prilora"):
                runs.append(one_run(method, args, folder))
                print(runs[-1], flush=True)
    per_step = {m: [r["train_runtime_s"] / r["steps"] for r in runs if r["method"] == m] for m in ("lora", "prilora")}
    medians = {m: statistics.median(v) for m, v in per_step.items()}
    line = {"what": "whole prilora train runs, LoRA and PRILoRA alternated; train_runtime_s / steps",
            "task": args.task, "recipe": "minilm-cpu", "model": "all-MiniLM-L6-v2", "max_steps": args.max_steps,
            "runs": runs, "median_s_per_step": medians, "ratio_prilora_to_lora": medians["prilora"] / medians["lora"],
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(ROOT, "results", "trainer-step-time.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"PRILoRA / LoRA, s per step (median of {args.repeats}): {line['ratio_prilora_to_lora']:.3f} "
          f"({medians['prilora']:.3f} / {medians['lora']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
