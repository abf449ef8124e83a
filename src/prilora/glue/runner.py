"""One GLUE run: a model, a task, a method (prilora, lora, adalora, full), a seed -> results.json.

Resumable and strict about its output folder: ``run.json`` records what a run was started
with (a resume must ask for the same), checkpoints carry the pruner's (or AdaLoRA's) state,
and ``results.json`` is written atomically only when the run has finished.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .. import packaged_models
from ..callback import KeepCheckpoints, PriLoraCallback, SaveOnInterrupt, TrainingClock
from ..config import PriLoraConfig
from ..manifest import write_manifest
from ..architectures import find_target_modules
from ..model import build_lora_config, get_prilora_model, parameter_counts
from ..run_folder import (RESULTS_FILE, RunError, check_output_dir, finish_distributed, finite_or_none,
                          holding_output_dir, launched_world_size, machine, micro_batch_size, precision_args,
                          prepare_output_dir, quiet_loading, train_stoppably, versions, wait_for_main_process,
                          write_json_atomic)
from .baselines import AdaLoraCallback, adalora_layer_ranks, adalora_ranks, get_adalora_model
from .data import Split, load_split
from .metrics import constant_predictions, glue_metrics, majority_baseline
from .recipes import Recipe
from .tasks import Task, get_task

METHODS = ("prilora", "lora", "adalora", "full")
DEFAULT_MODEL = packaged_models.MINILM


@dataclass
class RunSpec:
    """Everything a run's outcome depends on; stored in run.json and compared on resume."""

    task: str
    method: str
    model: str
    seed: int
    recipe_name: str
    recipe: Recipe
    prilora: dict | None = None  # PriLoraConfig fields (methods prilora and lora)
    adalora: dict | None = None  # AdaLoRA options (method adalora)
    max_steps: int | None = None
    data_source: str = "tsv"
    holdout: float | None = None  # evaluate on this many (or this fraction of) training examples, not dev
    precision: str = "fp32"  # fp32, or bf16 / fp16 autocast (mixed precision)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["recipe"] = self.recipe.to_dict()
        return out


@dataclass
class RunPaths:
    output_dir: str
    data_dir: str | None
    resume: bool = False
    overwrite: bool = False
    save_steps: int | None = None  # None: a checkpoint at the end of every epoch
    keep_checkpoints: int = 1
    eval_batch_size: int = 64
    quiet: bool = False
    gradient_accumulation: int = 1  # micro-batches per optimizer step (the recipe's batch is split)
    compile: bool = False  # torch.compile through Trainer's torch_compile (how a run trains, not what it learns)
    verbose: bool = False  # the libraries' own load reports and internal deprecation warnings too


def resolve_model(model_id: str) -> str:
    """A local folder, a packaged model (MiniLM, MPNet: see prilora.packaged_models) or a hub id."""
    try:
        return packaged_models.resolve_model(model_id)
    except packaged_models.PackagedModelError as e:
        raise RunError(str(e)) from None


HOLDOUT_SEED = 20240101  # fixed: the same held-out examples for every run seed and method


def load_data(task: Task, data_dir: str | None, recipe: Recipe,
              holdout: float | None = None) -> tuple[Split, dict[str, Split]]:
    """The training split and the evaluation splits (dev; or, with ``holdout``, a fixed random part of
    train that is then left out of training, for choosing recipes without looking at dev)."""
    train = load_split(task, "train", data_dir)
    if holdout:
        n = int(holdout) if holdout >= 1 else int(round(holdout * len(train)))
        if not 0 < n < len(train):
            raise RunError(f"--holdout {holdout:g} leaves no training or no held-out examples of {len(train)}")
        held = set(random.Random(HOLDOUT_SEED).sample(range(len(train)), n))
        pick = lambda keep: Split([t for i, t in enumerate(train.texts) if (i in held) == keep],  # noqa: E731
                                  [y for i, y in enumerate(train.labels) if (i in held) == keep])
        train, evals = pick(False), {"holdout": pick(True).head(recipe.max_eval_samples)}
    else:
        evals = {s: load_split(task, s, data_dir).head(recipe.max_eval_samples) for s in task.eval_splits}
    return train.head(recipe.max_train_samples), evals


def encode(tokenizer, split: Split, max_length: int):
    from datasets import Dataset

    columns = [list(c) for c in zip(*split.texts)]
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": split.labels})


def load_model(spec: RunSpec, path: str, task: Task):
    """Config and tokenizer first, then the adapter layout checked on a weightless (meta) copy of the
    model, and only then the weights: a schedule or target that does not fit fails in a second."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_id, cls_dropout = spec.model, spec.recipe.cls_dropout

    try:
        config = AutoConfig.from_pretrained(path, num_labels=task.num_labels)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot load model {model_id!r} ({reason}): without the hub, pass --model with a local "
                       "folder holding config.json, the weights and the tokenizer") from None
    for attr in ("classifier_dropout", "seq_classif_dropout"):
        if hasattr(config, attr):
            setattr(config, attr, cls_dropout)
    if config.model_type.startswith("deberta"):
        config.cls_dropout = cls_dropout
    if task.is_regression:
        config.problem_type = "regression"
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    try:
        if spec.prilora is not None:
            build_lora_config(skeleton, PriLoraConfig.from_dict(spec.prilora))
        elif spec.adalora is not None:
            find_target_modules(skeleton, spec.adalora.get("target_modules"))
    except ValueError as e:  # a schedule, target or layer pattern that does not fit this model
        raise RunError(f"{e} (model {model_id})") from None
    # A checkpoint with a head for another label count gets a new head (transformers reports it).
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    return model, tokenizer


def total_optimizer_steps(num_examples: int, recipe: Recipe, max_steps: int | None, accumulation: int = 1) -> int:
    """What Trainer will compute as max_steps: the recipe's batch is the global batch (all processes and
    micro-batches of one optimizer step together)."""
    if max_steps:
        return max_steps
    per_device = recipe.batch_size // (accumulation * launched_world_size())
    batches = math.ceil(num_examples / (per_device * launched_world_size()))
    return math.ceil(max(1, batches // accumulation) * recipe.epochs)


def build_model(spec: RunSpec, base, num_train: int, accumulation: int = 1):
    """The trainable model, its extra callbacks and the pruner (None for adalora/full)."""
    recipe = spec.recipe
    if spec.method in ("prilora", "lora"):
        model, pruner = get_prilora_model(base, PriLoraConfig.from_dict(spec.prilora))
        return model, [PriLoraCallback(pruner)], pruner
    if spec.method == "adalora":
        a = spec.adalora
        try:
            model = get_adalora_model(base, a, total_optimizer_steps(num_train, recipe, spec.max_steps, accumulation),
                                      lora_alpha=a["lora_alpha"], lora_dropout=a["lora_dropout"],
                                      target_modules=a.get("target_modules"))
        except ValueError as e:
            raise RunError(str(e)) from None
        return model, [AdaLoraCallback(model, a)], None
    return base, [], None


def head_and_adapter_counts(spec: RunSpec, model) -> dict:
    if spec.method == "full":
        head = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "pooler", "score")
                   or ".pooler." in n)
        return {"lora_params": 0, "head_params": head,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    counts = parameter_counts(model)
    out = {"lora_params": counts["lora"], "head_params": counts["head"]}
    if spec.method == "adalora":
        # The budget AdaLoRA ends with: per module, each kept rank costs a row of A, a column of B and E.
        kept = adalora_ranks(model)
        size = {}  # module -> d_in + d_out + 1: what one kept rank costs (a row of A, a column of B, E)
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                module = n.split(".lora_")[0].removeprefix("base_model.model.")
                size[module] = size.get(module, 1) + (p.shape[1] if ".lora_A." in n else p.shape[0])
        out["lora_params_allocated"] = counts["lora"]
        out["lora_params"] = sum(r * size[m] for m, r in kept.items())
    return out


def layer_ranks(spec: RunSpec, model) -> list | None:
    if spec.method in ("prilora", "lora"):
        return list(model.prilora_ranks)
    if spec.method == "adalora":
        return adalora_layer_ranks(model)
    return None


def collapse_reason(log_history: list[dict], train_loss: float, predictions: dict, task: Task) -> str | None:
    """Why a run collapsed (non-finite training loss, constant or non-finite predictions), or None."""
    bad = [h for h in log_history if "loss" in h and not math.isfinite(h["loss"])]
    if bad:
        return f"non-finite training loss ({bad[0]['loss']}) at step {bad[0].get('step')}"
    if not math.isfinite(train_loss):
        return f"non-finite training loss ({train_loss})"
    for split, preds in predictions.items():
        reason = constant_predictions(task, preds)
        if reason:
            return reason.replace("dev", split)
    return None


@holding_output_dir
def run_glue(spec: RunSpec, paths: RunPaths) -> dict:
    """Train, evaluate on dev, save the adapter (or model) and results.json; returns the results."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    task = get_task(spec.task)
    replace, resume_from = check_output_dir(paths, spec)
    train_split, eval_splits = load_data(task, paths.data_dir, spec.recipe, spec.holdout)
    path = resolve_model(spec.model)
    micro = micro_batch_size(spec.recipe.batch_size, paths.gradient_accumulation)
    mixed = precision_args(spec.precision)
    set_seed(spec.seed)
    with quiet_loading(not paths.verbose):
        base, tokenizer = load_model(spec, path, task)
        model, callbacks, pruner = build_model(spec, base, len(train_split), paths.gradient_accumulation)
    main = prepare_output_dir(paths, replace, {"spec": spec.to_dict(), "model_path": path})

    recipe = spec.recipe
    lr = recipe.full_learning_rate if spec.method == "full" else recipe.learning_rate
    warmup = int(recipe.warmup) if recipe.warmup >= 1 else recipe.warmup
    steps_per_epoch = math.ceil(len(train_split) / recipe.batch_size)
    args = TrainingArguments(
        output_dir=paths.output_dir, seed=spec.seed, learning_rate=lr, num_train_epochs=recipe.epochs,
        max_steps=spec.max_steps or -1, per_device_train_batch_size=micro,
        gradient_accumulation_steps=paths.gradient_accumulation, per_device_eval_batch_size=paths.eval_batch_size, warmup_steps=warmup, weight_decay=recipe.weight_decay,
        lr_scheduler_type="linear", eval_strategy="no",
        save_strategy="steps" if paths.save_steps else "epoch", save_steps=paths.save_steps or 500,
        save_total_limit=None,  # KeepCheckpoints deletes old ones, once a new one is complete
        logging_steps=max(1, steps_per_epoch // 5),
        logging_nan_inf_filter=False,  # a non-finite loss must show in the log: it marks a collapsed run
        report_to=[], disable_tqdm=paths.quiet, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, ddp_find_unused_parameters=False, **mixed,
        # Classification losses are per-batch means: Trainer's token averaging would multiply them by the
        # number of processes (the models accept but ignore num_items_in_batch).
        average_tokens_across_devices=False, torch_compile=paths.compile,
    )
    collator = DataCollatorWithPadding(tokenizer)
    world = launched_world_size()
    # In this order: the clock's file completes a checkpoint, then older ones go; the interrupt's checkpoint
    # holds all the others' files.
    clock, keeper, interrupt = TrainingClock(resume_from), KeepCheckpoints(paths.keep_checkpoints), SaveOnInterrupt()
    trainer = Trainer(
        model=model, args=args, train_dataset=encode(tokenizer, train_split, recipe.max_seq_length),
        data_collator=collator, callbacks=callbacks + [clock, keeper, interrupt],
    )
    # The classifiers accept num_items_in_batch but ignore it (their loss is a per-batch mean): without this,
    # Trainer would skip dividing by the micro-batches and scale gradients by --gradient-accumulation.
    trainer.model_accepts_loss_kwargs = False
    wait_for_main_process()  # the output folder exists before any process trains
    evaluated = ", ".join(f"{len(d)} {name}" for name, d in eval_splits.items())
    layout = "" if world == 1 and paths.gradient_accumulation == 1 else \
        f" ({world} process(es) x {paths.gradient_accumulation} micro-batch(es) of {micro})"
    if main:
        print(f"prilora train: {task.name} / {spec.method} / seed {spec.seed} / {spec.model}"
          f"{'' if path == spec.model else f' ({path})'} with a new {task.num_labels}-output head; recipe "
              f"{spec.recipe_name}: lr {lr:g}, {recipe.epochs:g} epochs, batch {recipe.batch_size}{layout}, max length "
              f"{recipe.max_seq_length}, {spec.precision}; {len(train_split)} training examples, evaluated on "
              f"{evaluated}" + (f"; resuming from {resume_from}" if resume_from else ""), file=sys.stderr, flush=True)
    output = train_stoppably(trainer, interrupt, resume_from)
    runtime = clock.elapsed()  # earlier parts of a resumed run included

    predictions, metrics, baseline = {}, {}, {}
    for i, (split, data) in enumerate(eval_splits.items()):
        pred = trainer.predict(encode(tokenizer, data, recipe.max_seq_length))
        predictions[split] = pred.predictions
        for found, into in ((glue_metrics(task, pred.predictions, pred.label_ids), metrics),
                            (majority_baseline(task, train_split.labels, data.labels) or {}, baseline)):
            if i == 0:
                into.update(found)
            else:
                suffix = split.split("_")[-1]
                into.update({f"{k}_{suffix}": v for k, v in found.items() if k != "score"})
    reason = collapse_reason(trainer.state.log_history, output.training_loss, predictions, task)
    replicas = pruner.check_replicas() if pruner is not None else world  # every process must prune alike
    if not main:
        finish_distributed()
        return {}
    if reason:
        print(f"warning: run collapsed: {reason}", file=sys.stderr)

    if spec.method == "full":
        trainer.save_model(paths.output_dir)
    else:
        model.save_pretrained(paths.output_dir)
    tokenizer.save_pretrained(paths.output_dir)
    results = {
        "task": task.name, "method": spec.method, "model": spec.model, "model_path": path, "seed": spec.seed,
        "recipe_name": spec.recipe_name, "recipe": recipe.to_dict(), "learning_rate": lr,
        "prilora": spec.prilora, "adalora": spec.adalora, "max_steps": spec.max_steps,
        "data_source": spec.data_source, "holdout": spec.holdout, "train_examples": len(train_split),
        "eval_examples": {s: len(d) for s, d in eval_splits.items()},
        "metrics": metrics, "collapsed": reason is not None, "collapse_reason": reason,
        "majority_baseline": baseline or None,  # the same metrics for always predicting train's commonest label
        **head_and_adapter_counts(spec, model),
        "ranks": layer_ranks(spec, model),
        "a_sparsity": pruner.sparsity()["A"] if pruner is not None else None,
        # [optimizer step, fraction of the pruned matrix at zero before the event, after it] per event
        "pruning_history": pruner.history if pruner is not None else None,
        "train_loss": output.training_loss, "steps": trainer.state.global_step, "precision": spec.precision,
        "world_size": world, "gradient_accumulation": paths.gradient_accumulation, "micro_batch_size": micro,
        "compiled": paths.compile,
        "replicas_identical": replicas == world if pruner is not None and world > 1 else None,
        "resumed_from": os.path.basename(resume_from) if resume_from else None,
        "train_runtime_s": round(runtime, 2), "versions": versions(), "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results = finite_or_none(results)
    write_json_atomic(os.path.join(paths.output_dir, RESULTS_FILE), results)
    write_manifest(paths.output_dir, recursive=False)  # the adapter, tokenizer, run.json, results.json; last
    finish_distributed()
    return results
