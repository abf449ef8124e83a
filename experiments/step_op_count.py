"""Count the tensor operations one training step runs, per method (LoRA, linear, PRILoRA, AdaLoRA).

Why: on an H200 (docs/BENCHMARKS.md) a DeBERTaV3-base-sized LoRA step took 95 ms in bf16, far more
than its matrix work, so the step is bound by per-operation overhead (Python, dispatch, kernel
launch), and a method's extra cost there follows its extra operations rather than its FLOPs. This
counts them, device-independently, on CPU: every aten operation dispatched in one step (forward,
backward, AdamW in its multi-tensor form as on a GPU, the method's after-step work), split into the
step's phases; views are not counted. On a GPU each counted operation is at least one kernel launch.

    python experiments/step_op_count.py --json results/step-op-count-deberta.json
    python experiments/step_op_count.py --no-dropout --json results/step-op-count-deberta-no-dropout.json
"""
import argparse
import json

import torch

from prilora.bench import OpCounter, build, load_base, make_batch


def phases(model, opt, after, batch) -> dict:
    counts = {}
    for phase in ("forward", "backward", "optimizer", "after_step", "zero_grad"):
        with OpCounter() as c:
            if phase == "forward":
                loss = model(**batch).loss
            elif phase == "backward":
                loss.backward()
            elif phase == "optimizer":
                opt.step()
            elif phase == "after_step":
                after()
            else:
                opt.zero_grad(set_to_none=True)
        counts[phase] = {"all": sum(c.ops.values()), "non_view": c.work(), "host_reads": c.host_reads(),
                         "top": dict(c.ops.most_common(8))}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deberta-v3-base")
    parser.add_argument("--methods", default="lora,linear,prilora,prilora-every-step,adalora")
    parser.add_argument("--steps", type=int, default=10,
                        help="steps counted per method, after as many uncounted (default 10: one pruning interval)")
    parser.add_argument("--no-dropout", action="store_true",
                        help="every dropout at 0 (the issue's setting: with dropout, DeBERTa's relative embeddings "
                             "are a new tensor in each layer, one more input to reduce)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    base, task_type, vocab = load_base(args.model)
    if args.no_dropout:
        for module in base.modules():
            for attr in ("p", "drop_prob"):  # nn.Dropout, DeBERTa's StableDropout
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, 0.0)
    batch = make_batch(task_type, vocab, 2, 16, torch.device("cpu"))
    out = {"model": args.model, "batch": [2, 16], "steps": args.steps, "dropout": not args.no_dropout, "methods": {}}
    for method in args.methods.split(","):
        model, opt, after = build(method, base, task_type, 2 * args.steps)
        for group in opt.param_groups:  # AdamW's default on a GPU; on CPU it loops over parameters
            group["foreach"] = True
        model.train()
        # One uncounted interval: PRILoRA's first step records who reads what, its first event builds indices.
        first = [phases(model, opt, after, batch) for _ in range(args.steps)][0]
        steps = [phases(model, opt, after, batch) for _ in range(args.steps)]
        mean = {p: sum(s[p]["non_view"] for s in steps) / len(steps) for p in steps[0]}
        reads = sum(s[p]["host_reads"] for s in steps for p in s) / len(steps)
        out["methods"][method] = {"non_view_per_step_mean": mean, "total_non_view_mean": sum(mean.values()),
                                  "host_reads_per_step_mean": reads, "uncounted_first_step": first,
                                  "first_counted_step": steps[0]}
        print(f"{method:20s} " + "  ".join(f"{p} {v:7.1f}" for p, v in mean.items()) +
              f"  total {sum(mean.values()):8.1f}  host reads {reads:g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
