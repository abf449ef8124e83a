"""The ``prilora`` command's arguments: the parser of every subcommand, and the translation of
``prilora train`` flags into a validated RunSpec. Kept apart from the commands (``cli.py``) so that
``prilora sweep`` can check a run's flags, and the bench's child process parse its own, without
importing the command line that imports them.
"""

from __future__ import annotations

import argparse

from . import __version__


def _schedule(text: str):
    if "," in text or text.isdigit():
        try:
            return [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a schedule name or comma-separated ranks, got {text!r}")
    return text


def _step_or_fraction(text: str):
    """``500`` is an optimizer step, ``0.9`` a fraction of all steps."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a step (int) or a fraction (float), got {text!r}") from None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sizes(text: str):
    try:
        return [int(float(x)) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 1e5,1e6, got {text!r}") from None


def _modules(text: str):
    return [m for m in text.split(",") if m]


PRILORA_FLAGS = {  # flag: (PriLoraConfig field, type, help)
    "--rank-schedule": ("rank_schedule", _schedule, "linear (default), uniform, inverted, concentrated, or ranks such as 4,6,7,9,10,12"),
    "--r-start": ("r_start", int, "rank of the first layer (default 4)"),
    "--r-end": ("r_end", int, "rank of the last layer (default 12)"),
    "--alpha-policy": ("alpha_policy", str, "constant_scaling (default) or constant_alpha"),
    "--layer-pattern": ("layer_pattern", str, "regex whose first group is a module's layer index"),
    "--prune-ratio": ("prune_ratio", float, "fraction of A zeroed at each event (default 0.5)"),
    "--prune-interval": ("prune_interval", int, "optimizer steps between pruning events (default 10)"),
    "--prune-start": ("prune_start", _step_or_fraction, "first pruning step, or fraction of training (default 0)"),
    "--prune-end": ("prune_end", _step_or_fraction, "step or fraction after which the final mask is held (default 0.9)"),
    "--ema-beta": ("ema_beta", float, "EMA coefficient of the input norms (default 0.9)"),
    "--prune-scope": ("prune_scope", str, "row (each rank component keeps its own inputs; default) or matrix"),
    "--prune-criterion": ("prune_criterion", str, "importance (default), magnitude, random or none"),
    "--prune-matrix": ("prune_matrix", str, "A (default) or B"),
    "--stats-sync": ("stats_sync", str, "multi-process: event (default; combine norms at pruning events) or step "
                                        "(all-reduce every step)"),
}
ADAPTER_FLAGS = {
    "--lora-alpha": ("lora_alpha", float, "LoRA alpha (default: the recipe's)"),
    "--lora-dropout": ("lora_dropout", float, "dropout on the LoRA input (default 0)"),
    "--target-modules": ("target_modules", _modules, "comma-separated module names (default: per architecture)"),
}
LORA_FLAGS = {"--lora-r": ("lora_r", int, "rank of every layer for --method lora (default 8: PRILoRA 4->12's budget)")}
ADALORA_FLAGS = {
    "--adalora-init-r": ("init_r", int, "initial rank (default 12)"),
    "--adalora-target-r": ("target_r", int, "mean final rank, the budget (default 8)"),
    "--adalora-tinit": ("tinit", float, "steps (>= 1) or fraction of steps before allocation starts (default 0.1)"),
    "--adalora-tfinal": ("tfinal", float, "steps or fraction at the end with a fixed allocation (default 0.5)"),
    "--adalora-delta-t": ("deltaT", int, "steps between allocations (default 10)"),
    "--adalora-beta1": ("beta1", float, "EMA of the importance (default 0.85)"),
    "--adalora-beta2": ("beta2", float, "EMA of the uncertainty (default 0.85)"),
    "--adalora-orth-reg-weight": ("orth_reg_weight", float, "orthogonal regularisation weight (default 0.1)"),
}
RECIPE_FLAGS = {
    "--learning-rate": ("learning_rate", float, "peak learning rate (with --method full it replaces the recipe's full fine-tuning rate)"),
    "--epochs": ("epochs", float, "training epochs"),
    "--batch-size": ("batch_size", int, "training batch size"),
    "--max-seq-length": ("max_seq_length", int, "truncate inputs to this many tokens (padding is dynamic)"),
    "--warmup": ("warmup", float, "warm-up: optimizer steps (>= 1) or a fraction of all steps (< 1)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--cls-dropout": ("cls_dropout", float, "dropout before the classifier"),
    "--max-train-samples": ("max_train_samples", int, "use the first N training examples"),
    "--max-eval-samples": ("max_eval_samples", int, "use the first N evaluation examples"),
}
ALLOWED = {  # which option groups each method accepts
    "prilora": (PRILORA_FLAGS, ADAPTER_FLAGS),
    "lora": (LORA_FLAGS, ADAPTER_FLAGS, {"--layer-pattern": PRILORA_FLAGS["--layer-pattern"]}),
    "adalora": (ADALORA_FLAGS, ADAPTER_FLAGS),
    "full": (),
}


class UsageError(Exception):
    """A flag argparse rejected; ``main`` prints it as one line and exits with 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, and where to look), raised so that
    ``prilora sweep`` can check a run's flags without exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _add_group(parser, title, flags):
    group = parser.add_argument_group(title)
    for flag, (dest, kind, help_text) in flags.items():
        group.add_argument(flag, dest=f"opt_{dest}", metavar=dest.upper(), type=kind, default=None, help=help_text)


def _add_run_flags(parser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in --output-dir")
    run.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: every epoch)")
    run.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept (0: all; default 1)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true",
                     help="also the libraries' own load reports (the new task head) and internal deprecation warnings")
    run.add_argument("--json", action="store_true",
                     help="end with one JSON line of the results' summary instead of a sentence (for scripts)")
    run.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                     help="fp32 (default), or bf16 / fp16 autocast (fp16 needs a GPU); statistics stay fp32")
    run.add_argument("--gradient-accumulation", type=int, default=1, metavar="N",
                     help="split each batch into N micro-batches (same optimizer steps, less memory; default 1)")
    run.add_argument("--compile", action="store_true",
                     help="train the model under torch.compile (Trainer's torch_compile; docs/TRAINING.md)")


CLM_RECIPE = {  # flag: (ClmSpec field, type, default, help)
    "--learning-rate": ("learning_rate", float, 2e-4, "peak learning rate (default 2e-4)"),
    "--epochs": ("epochs", float, 1.0, "training epochs (default 1)"),
    "--batch-size": ("batch_size", int, 8, "blocks per batch (default 8)"),
    "--block-size": ("block_size", int, 128, "tokens per training block (default 128)"),
    "--warmup": ("warmup", float, 0.03, "warm-up: steps (>= 1) or a fraction of all steps (default 0.03)"),
    "--weight-decay": ("weight_decay", float, 0.0, "AdamW weight decay (default 0)"),
}


def _add_clm_parser(sub) -> None:
    clm = sub.add_parser(
        "train-clm", help="fine-tune a causal LM (LLaMA, Mistral, Qwen2, GPT-2, OPT, ...) on a local text file",
        description="PRILoRA (or LoRA) fine-tuning of a causal LM on a text file (one example per line) or JSON "
                    "lines. Writes the adapter, prilora.json and results.json (loss and perplexity before and after "
                    "training) to --output-dir. See docs/LLM.md.",
    )
    clm.add_argument("--model", required=True, help="local model folder (or hub id when the hub is reachable)")
    clm.add_argument("--train-file", required=True, help=".txt (one example per non-empty line) or .jsonl/.json")
    clm.add_argument("--eval-file", default=None, help="evaluation text in the same format (default: --holdout)")
    clm.add_argument("--holdout", type=float, default=0.1,
                     help="without --eval-file: blocks (or a fraction) held out from training for evaluation "
                          "(default 0.1)")
    clm.add_argument("--text-field", default="text", help="field of a JSON-lines example (default text)")
    clm.add_argument("--method", default="prilora", choices=["prilora", "lora"], help="(default prilora)")
    clm.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    clm.add_argument("--output-dir", required=True, help="new or empty folder (or an unfinished run, with --resume)")
    clm.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    clm.add_argument("--load-in-4bit", action="store_true",
                     help="QLoRA: load the base in 4-bit NF4 (bitsandbytes; compute in bf16 where the GPU supports "
                          "it, else fp32); needs pip install \"prilora[qlora]\"")
    _add_run_flags(clm)
    group = clm.add_argument_group("recipe")
    for flag, (dest, kind, default, help_text) in CLM_RECIPE.items():
        group.add_argument(flag, dest=f"clm_{dest}", type=kind, default=default, metavar=dest.upper(), help=help_text)
    _add_group(clm, "adapter", ADAPTER_FLAGS)
    _add_group(clm, "PRILoRA (method prilora)", PRILORA_FLAGS)
    _add_group(clm, "LoRA (method lora)", LORA_FLAGS)


def _add_adapter_tools(sub) -> None:
    export = sub.add_parser(
        "export", help="ship an adapter: merged into its base model, or sparse (pruned zeros not stored)",
        description="merged: the base model with the adapter merged in (merge_and_unload), a plain Transformers "
                    "folder. sparse: the adapter with pruned matrices stored as a bit mask and the kept values. "
                    "dense: a sparse export back to a standard PEFT adapter folder. See docs/EXPORT.md.",
    )
    export.add_argument("kind", choices=["merged", "sparse", "dense"], help="what to write")
    export.add_argument("adapter", help="adapter folder (prilora train's --output-dir, or a sparse export)")
    export.add_argument("--out", required=True, help="new folder to write")
    export.add_argument("--base", default=None,
                        help="merged: base model folder or id (default: the adapter's base_model_name_or_path)")
    inspect = sub.add_parser(
        "inspect", help="ranks, sparsity and parameter counts of an adapter, per layer",
        description="Read an adapter folder (dense or sparse export) and print ranks and A sparsity per layer and "
                    "matrix, and parameter counts.",
    )
    inspect.add_argument("adapter", help="adapter folder")
    inspect.add_argument("--plot", default=None, metavar="FILE.png", help="also write a heatmap (layers x matrices)")
    inspect.add_argument("--json", action="store_true", help="print the full description as JSON instead of a table")
    inspect.add_argument("--layer-pattern", default=None, help="regex whose first group is a module's layer index")
    verify = sub.add_parser(
        "verify", help="check a run, checkpoint or adapter folder byte for byte against its manifest",
        description="Every checkpoint, final adapter and export that prilora writes holds prilora_manifest.json "
                    "(each file's size and SHA-256). This checks a run folder (its final files and each "
                    "checkpoint), one checkpoint, or an adapter or export folder against it. Exit code 0: all "
                    "intact (or, without a manifest, readable); 1: damage found; 2: nothing to verify.",
    )
    verify.add_argument("path", help="run folder (--output-dir), checkpoint folder, or adapter/export folder")
    verify.add_argument("--json", action="store_true", help="print one JSON object per folder checked")


def build_parser() -> argparse.ArgumentParser:
    from .glue.recipes import RECIPES
    from .glue.runner import DEFAULT_MODEL, METHODS
    from .glue.tasks import TASKS

    parser = OneLineParser(prog="prilora", description="PRILoRA fine-tuning (Benedek & Wolf, EACL 2024).")
    parser.add_argument("--version", action="version", version=f"prilora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = sub.add_parser(
        "train", help="fine-tune one model on one GLUE task with one method",
        description="Fine-tune one model on one GLUE task with one method and write OUTPUT/results.json, "
                    "the adapter (or model) and prilora.json. Recipe values come from the per-task table "
                    "(docs/RECIPES.md); every one can be overridden.",
    )
    train.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    train.add_argument("--method", default="prilora", help=f"{', '.join(METHODS)} (default prilora)")
    train.add_argument("--model", default=DEFAULT_MODEL,
                       help="hub id or local folder (default: all-MiniLM-L6-v2, the packaged copy when installed)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and dropout (default 0)")
    train.add_argument("--data-dir", default=None,
                       help="GLUE TSV folders (CoLA/, SST-2/, ...); without it nyu-mll/glue is loaded from the hub")
    train.add_argument("--output-dir", required=True,
                       help="new or empty folder (or one of an unfinished run, with --resume)")
    train.add_argument("--recipe", default="auto",
                       help=f"recipe table: {', '.join(RECIPES)} (default auto: deberta-v3-base for DeBERTa models)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    train.add_argument("--holdout", type=float, default=None,
                       help="evaluate on N (or a fraction of) training examples held out from training, not on dev "
                            "(for choosing learning rates without looking at dev)")
    _add_run_flags(train)
    _add_group(train, "recipe (override the task's preset)", RECIPE_FLAGS)
    _add_group(train, "adapter (prilora, lora, adalora)", ADAPTER_FLAGS)
    _add_group(train, "PRILoRA (method prilora)", PRILORA_FLAGS)
    _add_group(train, "LoRA (method lora)", LORA_FLAGS)
    _add_group(train, "AdaLoRA (method adalora)", ADALORA_FLAGS)

    _add_clm_parser(sub)
    _add_adapter_tools(sub)
    sweep = sub.add_parser(
        "sweep", help="run a grid of prilora train runs from a TOML or YAML spec (resumable)",
        description="Run every prilora train run a spec describes (stages x tasks x variants x grid values x "
                    "seeds; values chosen from an earlier stage's grid, which may grow where its best value sits "
                    "at an end), skipping finished runs and resuming unfinished ones, and append each finished "
                    "run's results.json to the spec's JSON-lines file. See docs/SWEEPS.md.",
    )
    sweep.add_argument("spec", nargs="+",
                       help="a .toml, .yaml or .yml file (e.g. experiments/main-table.toml); several run in order as "
                            "one queue (a slot the current spec cannot fill takes a later spec's ready run), all "
                            "checked before the first starts")
    sweep.add_argument("--jobs", type=int, default=None,
                       help="runs at a time, each with CPU cores / jobs threads (default: the spec's jobs, or 1)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done; run nothing")

    bench = sub.add_parser(
        "bench", help="training step time and memory of PRILoRA vs LoRA vs AdaLoRA, side by side",
        description="Time a full training step of each method on its own copy of one model, methods interleaved "
                    "round by round, and count its operations and host reads (the CPU proxy of GPU overhead); "
                    "optionally peak memory (a child process per method), the cost of one pruning event against "
                    "adapter size, and merged-model inference. See docs/BENCHMARKS.md.",
    )
    bench.add_argument("--model", default="minilm",
                       help="minilm (packaged weights), deberta-v3-base or llama-0.27b (random weights from configs), "
                            "or a local model folder (default minilm)")
    bench.add_argument("--methods", type=_modules, default=["lora", "linear", "prilora", "prilora-every-step", "adalora"],
                       help="comma-separated: lora, linear, prilora, prilora-every-step, adalora (default: all)")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--seq-len", type=int, default=128)
    bench.add_argument("--steps", type=int, default=5, help="timed steps per method per round (default 5)")
    bench.add_argument("--rounds", type=int, default=4, help="rounds over the methods (default 4)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default 2)")
    bench.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    bench.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    bench.add_argument("--memory", action="store_true", help="also peak memory, one child process per method")
    bench.add_argument("--compile", action="store_true",
                       help="also time every method under torch.compile (reported beside the eager times)")
    bench.add_argument("--no-timing", action="store_true",
                       help="skip the step timing (memory needs no quiet machine; step times do)")
    bench.add_argument("--ops", action="store_true",
                       help="count the operations and host reads of a step per method, eager, phase by phase (done "
                            "with every timing run; with --no-timing, on its own: counts need no quiet machine)")
    bench.add_argument("--no-dropout", action="store_true",
                       help="every dropout of the model at 0 (default: the model's own)")
    bench.add_argument("--event-sizes", type=_sizes, default=[],
                       help="also time one pruning event at these A sizes, e.g. 1e5,1e6,1e7,1e8")
    bench.add_argument("--inference", action="store_true", help="also base vs unmerged vs merged forward passes")
    bench.add_argument("--json", default=None, help="write the raw numbers here (JSON)")
    bench.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)

    report = sub.add_parser(
        "report", help="tables and plots (Markdown + PNG) from results JSON lines",
        description="Build a Markdown report from results JSON lines alone (prilora sweep's output, or any file of "
                    "results.json lines): per table mean ± std over seeds with the seed count, collapsed runs "
                    "counted apart, learning-rate grids with the chosen value, a reference row against the others "
                    "(Welch's t-test, per task and over the average of the tasks), schedule x pruning effects "
                    "where a table crosses them, and PNG plots (scores, ranks per layer, sparsity over training); "
                    "with --progress, how far the study's specs have got.",
    )
    report.add_argument("results", nargs="+", help="JSON-lines files, e.g. results/main-table.jsonl, or runs' own "
                        "results.json (runs/*/results.json); a pattern no file matches yet "
                        "(results/ablation-*.jsonl) is left out with a note")
    report.add_argument("--out", required=True, help="Markdown file to write, e.g. docs/RESULTS.md")
    report.add_argument("--plots", default=None, help="folder for the PNGs (default: results/ beside --out)")
    report.add_argument("--notes", default=None, help="Markdown placed after the introduction (e.g. verdicts); a line "
                        "'<!-- generated -->' in it places the introduction there instead, so a summary can lead")
    report.add_argument("--reference", default=None,
                        help="row that every other row of a dev table is tested against, as the tables name it, "
                             "e.g. lora or 'prilora (rank_schedule=linear)' (default: the row named prilora, where "
                             "a table has one)")
    report.add_argument("--progress", nargs="+", default=None, metavar="SPEC",
                        help="sweep specs of the study: a table of runs planned, done and left per spec, with a time "
                             "estimate, counted as --dry-run counts them; placed at a line '<!-- progress -->' of "
                             "--notes, else after the notes")
    return parser


def given_flags(args, flags) -> dict:
    return {dest: getattr(args, f"opt_{dest}") for _, (dest, _, _) in flags.items()
            if getattr(args, f"opt_{dest}") is not None}


def build_spec(args):
    """Validate flags against the method and resolve recipe and method options into a RunSpec."""
    from .glue.baselines import ADALORA_DEFAULTS
    from .glue.recipes import get_recipe, recipe_family
    from .glue.runner import METHODS, RunError, RunSpec
    from .glue.tasks import get_task

    try:
        task = get_task(args.task)
    except ValueError as e:
        raise RunError(str(e)) from None
    if args.method not in METHODS:
        raise RunError(f"unknown method {args.method!r}: choose one of {', '.join(METHODS)}")
    refuse_other_methods_flags(args)
    family = recipe_family(args.model) if args.recipe == "auto" else args.recipe
    try:
        recipe = get_recipe(family, task.name, args.method)
    except ValueError as e:
        raise RunError(str(e)) from None
    overrides = given_flags(args, RECIPE_FLAGS)
    if args.method == "full" and "learning_rate" in overrides:
        overrides["full_learning_rate"] = overrides.pop("learning_rate")
    for name, value, rule in (("--max-steps", args.max_steps, 1), ("--save-steps", args.save_steps, 1),
                              ("--keep-checkpoints", args.keep_checkpoints, 0),
                              ("--gradient-accumulation", args.gradient_accumulation, 1)):
        if value is not None and value < rule:
            raise RunError(f"{name} must be >= {rule}, got {value}")
    if args.holdout is not None and args.holdout <= 0:
        raise RunError(f"--holdout must be > 0 (a count, or a fraction below 1), got {args.holdout:g}")
    check_seed(args.seed)
    try:
        recipe = recipe.override(**overrides)
    except ValueError as e:
        raise RunError(str(e)) from None
    adapter = {"lora_alpha": recipe.lora_alpha, "lora_dropout": 0.0, **given_flags(args, ADAPTER_FLAGS)}
    spec = RunSpec(task=task.name, method=args.method, model=args.model, seed=args.seed, recipe_name=family,
                   recipe=recipe, max_steps=args.max_steps, data_source="tsv" if args.data_dir else "hub",
                   holdout=args.holdout, precision=args.precision)
    try:
        if args.method in ("prilora", "lora"):
            spec.prilora = prilora_config(args, adapter, "SEQ_CLS").to_dict()
        elif args.method == "adalora":
            spec.adalora = {**ADALORA_DEFAULTS, **adapter, **given_flags(args, ADALORA_FLAGS)}
            if spec.adalora["init_r"] < spec.adalora["target_r"]:
                raise ValueError("--adalora-init-r must be at least --adalora-target-r")
    except ValueError as e:
        raise RunError(str(e)) from None
    return spec


def check_seed(seed: int) -> None:
    from .config import SEEDS
    from .run_folder import RunError

    if seed not in SEEDS:
        raise RunError(f"--seed must be in [0, 2**32 - 1], got {seed}")


def refuse_other_methods_flags(args) -> None:
    from .run_folder import RunError

    allowed = {flag for group in ALLOWED[args.method] for flag in group}
    for flags in (PRILORA_FLAGS, ADAPTER_FLAGS, LORA_FLAGS, ADALORA_FLAGS):
        for flag, (dest, _, _) in flags.items():
            if getattr(args, f"opt_{dest}", None) is not None and flag not in allowed:
                owners = [m for m, groups in ALLOWED.items() if any(flag in g for g in groups)]
                raise RunError(f"{flag} does not apply to --method {args.method}: it is an option of "
                               f"--method {' / '.join(owners)}")


def prilora_config(args, adapter: dict, task_type: str):
    """The PriLoraConfig of --method prilora (every flag) or --method lora (uniform rank, no pruning)."""
    from .config import PriLoraConfig

    if args.method == "prilora":
        given = given_flags(args, PRILORA_FLAGS)
        config = PriLoraConfig(task_type=task_type, seed=args.seed, **adapter, **given)
        _refuse_idle_flags(config, given)
        return config
    options = {**adapter, **given_flags(args, LORA_FLAGS)}
    r = options.pop("lora_r", 8)
    if args.opt_layer_pattern is not None:
        options["layer_pattern"] = args.opt_layer_pattern
    return PriLoraConfig(task_type=task_type, seed=args.seed, rank_schedule="uniform", r_start=r, r_end=r,
                         prune_criterion="none", **options)


PRUNING_FIELDS = ("prune_ratio", "prune_interval", "prune_start", "prune_end", "ema_beta", "prune_scope", "prune_matrix",
                  "stats_sync")


def _refuse_idle_flags(config, given: dict) -> None:
    """Flags that would silently do nothing are contradictions: say so instead."""
    flag = {dest: f for f, (dest, _, _) in PRILORA_FLAGS.items()}
    if isinstance(config.rank_schedule, list):
        idle = [flag[k] for k in ("r_start", "r_end") if k in given]
        if idle:
            raise ValueError(f"{' and '.join(idle)} {'does' if len(idle) == 1 else 'do'} not apply to an explicit "
                             "list of ranks (--rank-schedule)")
    if not config.prunes:
        why = "--prune-criterion none" if config.prune_criterion == "none" else "--prune-ratio 0"
        cause = "prune_criterion" if config.prune_criterion == "none" else "prune_ratio"
        idle = [flag[k] for k in (*PRUNING_FIELDS, "prune_criterion") if k in given and k != cause]
        if idle:
            raise ValueError(f"{', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect with {why} "
                             "(no pruning)")
    elif config.prune_criterion != "importance" and ("ema_beta" in given or "stats_sync" in given):
        idle = "--ema-beta" if "ema_beta" in given else "--stats-sync"
        raise ValueError(f"{idle} has no effect with --prune-criterion {config.prune_criterion} "
                         "(no input statistics)")


def build_clm_spec(args):
    """Validate ``prilora train-clm`` flags into a ClmSpec."""
    from .causal_lm import ClmSpec
    from .run_folder import RunError

    refuse_other_methods_flags(args)
    recipe = {dest: getattr(args, f"clm_{dest}") for dest, *_ in CLM_RECIPE.values()}
    for name, value, rule in (("--max-steps", args.max_steps, 1), ("--save-steps", args.save_steps, 1),
                              ("--keep-checkpoints", args.keep_checkpoints, 0), ("--block-size", recipe["block_size"], 1),
                              ("--batch-size", recipe["batch_size"], 1),
                              ("--gradient-accumulation", args.gradient_accumulation, 1)):
        if value is not None and value < rule:
            raise RunError(f"{name} must be >= {rule}, got {value}")
    if not recipe["learning_rate"] > 0 or not recipe["epochs"] > 0:
        raise RunError("--learning-rate and --epochs must be > 0")
    if args.holdout <= 0:
        raise RunError(f"--holdout must be > 0 (a count, or a fraction below 1), got {args.holdout:g}")
    check_seed(args.seed)
    if args.load_in_4bit:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise RunError('--load-in-4bit needs bitsandbytes, which is not installed: pip install "prilora[qlora]"')
    adapter = {"lora_alpha": 16.0, "lora_dropout": 0.0, **given_flags(args, ADAPTER_FLAGS)}
    try:
        config = prilora_config(args, adapter, "CAUSAL_LM")
    except ValueError as e:
        raise RunError(str(e)) from None
    spec = ClmSpec(model=args.model, train_file=args.train_file, method=args.method, prilora=config.to_dict(),
                   seed=args.seed, eval_file=args.eval_file, text_field=args.text_field, holdout=args.holdout,
                   max_steps=args.max_steps, precision=args.precision, load_in_4bit=args.load_in_4bit, **recipe)
    return spec
