"""``prilora`` command line. Thin: parses flags, builds a RunSpec, hands it to the GLUE runner.

Bad input ends with one line on stderr and exit code 2; an interrupted run with a pointer
to ``--resume`` and exit code 130.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    run = train.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in --output-dir")
    run.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: every epoch)")
    run.add_argument("--keep-checkpoints", type=int, default=1, help="checkpoints kept (0: all; default 1)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_group(train, "recipe (override the task's preset)", RECIPE_FLAGS)
    _add_group(train, "adapter (prilora, lora, adalora)", ADAPTER_FLAGS)
    _add_group(train, "PRILoRA (method prilora)", PRILORA_FLAGS)
    _add_group(train, "LoRA (method lora)", LORA_FLAGS)
    _add_group(train, "AdaLoRA (method adalora)", ADALORA_FLAGS)

    sweep = sub.add_parser(
        "sweep", help="run a grid of prilora train runs from a TOML or YAML spec (resumable)",
        description="Run every prilora train run a spec describes (stages x tasks x variants x grid values x "
                    "seeds), skipping finished runs and resuming unfinished ones, and append each finished "
                    "run's results.json to the spec's JSON-lines file. See docs/SWEEPS.md.",
    )
    sweep.add_argument("spec", help="a .toml, .yaml or .yml file (e.g. experiments/main-table.toml)")
    sweep.add_argument("--jobs", type=int, default=None,
                       help="runs at a time, each with CPU cores / jobs threads (default: the spec's jobs, or 1)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done; run nothing")
    return parser


def _given(args, flags) -> dict:
    return {dest: getattr(args, f"opt_{dest}") for _, (dest, _, _) in flags.items()
            if getattr(args, f"opt_{dest}") is not None}


def build_spec(args):
    """Validate flags against the method and resolve recipe and method options into a RunSpec."""
    from .config import PriLoraConfig
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
    allowed = {flag for group in ALLOWED[args.method] for flag in group}
    for flags in (PRILORA_FLAGS, ADAPTER_FLAGS, LORA_FLAGS, ADALORA_FLAGS):
        for flag, (dest, _, _) in flags.items():
            if getattr(args, f"opt_{dest}") is not None and flag not in allowed:
                owners = [m for m, groups in ALLOWED.items() if any(flag in g for g in groups)]
                raise RunError(f"{flag} does not apply to --method {args.method}: it is an option of "
                               f"--method {' / '.join(owners)}")
    family = recipe_family(args.model) if args.recipe == "auto" else args.recipe
    try:
        recipe = get_recipe(family, task.name)
    except ValueError as e:
        raise RunError(str(e)) from None
    overrides = _given(args, RECIPE_FLAGS)
    if args.method == "full" and "learning_rate" in overrides:
        overrides["full_learning_rate"] = overrides.pop("learning_rate")
    for name, value, rule in (("--max-steps", args.max_steps, 1), ("--save-steps", args.save_steps, 1),
                              ("--keep-checkpoints", args.keep_checkpoints, 0)):
        if value is not None and value < rule:
            raise RunError(f"{name} must be >= {rule}, got {value}")
    if args.holdout is not None and args.holdout <= 0:
        raise RunError(f"--holdout must be > 0 (a count, or a fraction below 1), got {args.holdout:g}")
    try:
        recipe = recipe.override(**overrides)
    except ValueError as e:
        raise RunError(str(e)) from None
    adapter = {"lora_alpha": recipe.lora_alpha, "lora_dropout": 0.0, **_given(args, ADAPTER_FLAGS)}
    spec = RunSpec(task=task.name, method=args.method, model=args.model, seed=args.seed, recipe_name=family,
                   recipe=recipe, max_steps=args.max_steps, data_source="tsv" if args.data_dir else "hub",
                   holdout=args.holdout)
    try:
        if args.method == "prilora":
            given = _given(args, PRILORA_FLAGS)
            config = PriLoraConfig(task_type="SEQ_CLS", seed=args.seed, **adapter, **given)
            _refuse_idle_flags(config, given)
            spec.prilora = config.to_dict()
        elif args.method == "lora":
            options = {**adapter, **_given(args, LORA_FLAGS)}
            r = options.pop("lora_r", 8)
            if "layer_pattern" in _given(args, PRILORA_FLAGS):
                options["layer_pattern"] = args.opt_layer_pattern
            spec.prilora = PriLoraConfig(task_type="SEQ_CLS", seed=args.seed, rank_schedule="uniform", r_start=r,
                                         r_end=r, prune_criterion="none", **options).to_dict()
        elif args.method == "adalora":
            spec.adalora = {**ADALORA_DEFAULTS, **adapter, **_given(args, ADALORA_FLAGS)}
            if spec.adalora["init_r"] < spec.adalora["target_r"]:
                raise ValueError("--adalora-init-r must be at least --adalora-target-r")
    except ValueError as e:
        raise RunError(str(e)) from None
    return spec


PRUNING_FIELDS = ("prune_ratio", "prune_interval", "prune_start", "prune_end", "ema_beta", "prune_scope", "prune_matrix")


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
    elif config.prune_criterion != "importance" and "ema_beta" in given:
        raise ValueError(f"--ema-beta has no effect with --prune-criterion {config.prune_criterion} "
                         "(no input statistics)")


def cmd_train(args) -> int:
    from .glue.runner import RunPaths, run_glue

    spec = build_spec(args)
    paths = RunPaths(output_dir=args.output_dir, data_dir=args.data_dir, resume=args.resume,
                     overwrite=args.overwrite, save_steps=args.save_steps, keep_checkpoints=args.keep_checkpoints,
                     quiet=args.quiet)
    results = run_glue(spec, paths)
    summary = {k: results[k] for k in ("task", "method", "seed", "steps", "lora_params", "a_sparsity",
                                       "collapsed", "train_runtime_s")}
    summary["score"] = results["metrics"]["score"]
    print(json.dumps(summary))
    return 0


def cmd_sweep(args) -> int:
    from .glue.sweep import Sweep, SweepError

    if args.jobs is not None and args.jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
    return Sweep(args.spec, jobs=args.jobs).run(dry_run=args.dry_run)


def main(argv=None) -> int:
    from .glue.data import GlueDataError
    from .glue.runner import RunError

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        return {"train": cmd_train, "sweep": cmd_sweep}[args.command](args)
    except (RunError, GlueDataError) as e:
        print(f"prilora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "output_dir", None)
        print(f"prilora {args.command}: interrupted; checkpoints stay in {out}: rerun with --resume to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
