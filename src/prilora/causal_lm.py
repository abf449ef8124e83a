"""``prilora train-clm``: PRILoRA (or LoRA) fine-tuning of a causal LM on a local text corpus.

The corpus is a plain text file (one example per non-empty line) or JSON lines with a text
field. Examples are tokenized, joined with the end-of-sequence token and cut into blocks of
``block_size`` tokens, the usual recipe for causal-LM fine-tuning. The model is scored by
loss and perplexity on ``--eval-file`` or on a fixed random part of the blocks held out from
training, before and after training. Outputs match ``prilora train``: a PEFT LoRA adapter,
``prilora.json``, ``run.json`` and ``results.json``, with the same resume rules.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .architectures import ENCODER_MODEL_TYPES
from .callback import KeepCheckpoints, PriLoraCallback, SaveOnInterrupt, TrainingClock
from .config import PriLoraConfig
from .manifest import write_manifest
from .model import build_lora_config, get_prilora_model, parameter_counts
from .run_folder import (RESULTS_FILE, RunError, check_output_dir, finish_distributed, holding_output_dir,
                         launched_world_size, machine, micro_batch_size, missing_local_folder, precision_args,
                         prepare_output_dir, quiet_loading, train_stoppably, versions, wait_for_main_process,
                         write_json_atomic)

HOLDOUT_SEED = 20240101


@dataclass
class ClmSpec:
    """Everything the outcome depends on; stored in run.json and compared on resume."""

    model: str
    train_file: str
    method: str
    prilora: dict
    seed: int = 0
    eval_file: str | None = None
    text_field: str = "text"
    holdout: float = 0.1
    block_size: int = 128
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 8
    warmup: float = 0.03
    weight_decay: float = 0.0
    max_steps: int | None = None
    precision: str = "fp32"
    load_in_4bit: bool = False  # QLoRA: the base in 4-bit NF4 (bitsandbytes)

    def to_dict(self) -> dict:
        return asdict(self)


def read_texts(path: str, text_field: str, flag: str) -> list[str]:
    """Examples of a .txt (one per non-empty line) or .jsonl/.json file (one object per line)."""
    if not os.path.isfile(path):
        raise RunError(f"{flag} {path} not found: pass a text file (one example per line) or JSON lines")
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RunError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise RunError(f"{path}:{n}: no string field {text_field!r}: pass --text-field with the "
                                   "name of the text field")
                texts.append(row[text_field])
            else:
                texts.append(line.rstrip("\n"))
    if not texts:
        raise RunError(f"{flag} {path} holds no text")
    return texts


def make_blocks(tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    return [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]


def load_blocks(spec: ClmSpec, tokenizer) -> tuple[list, list, int]:
    """Training blocks, evaluation blocks, and the number of training tokens."""
    train = make_blocks(tokenizer, read_texts(spec.train_file, spec.text_field, "--train-file"), spec.block_size)
    if spec.eval_file:
        evals = make_blocks(tokenizer, read_texts(spec.eval_file, spec.text_field, "--eval-file"), spec.block_size)
        if not evals:
            raise RunError(f"--eval-file {spec.eval_file} has fewer tokens than one block of --block-size "
                           f"{spec.block_size}")
    else:
        n = int(spec.holdout) if spec.holdout >= 1 else int(round(spec.holdout * len(train)))
        if not 0 < n < len(train):
            raise RunError(f"--train-file {spec.train_file} gives {len(train)} blocks of {spec.block_size} tokens: "
                           f"too few to hold out {spec.holdout:g} for evaluation (pass --eval-file, a smaller "
                           "--block-size, or more text)")
        held = set(random.Random(HOLDOUT_SEED).sample(range(len(train)), n))
        evals = [b for i, b in enumerate(train) if i in held]
        train = [b for i, b in enumerate(train) if i not in held]
    if not train:
        raise RunError(f"--train-file {spec.train_file} has fewer tokens than one block of --block-size "
                       f"{spec.block_size}")
    return train, evals, sum(len(b) for b in train)


def load_tokenizer(spec: ClmSpec):
    """Tokenizer and config, and the adapter layout checked on a weightless copy of the model: bad input
    fails before any weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if missing_local_folder(spec.model):
        raise RunError(f"--model {spec.model} not found: pass a local model folder (or a hub id)")
    try:
        config = AutoConfig.from_pretrained(spec.model)
        tokenizer = AutoTokenizer.from_pretrained(spec.model)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot load model {spec.model!r} ({reason}): without the hub, pass --model with a local "
                       "folder holding config.json, the weights and the tokenizer") from None
    if config.model_type in ENCODER_MODEL_TYPES and not getattr(config, "is_decoder", False):
        raise RunError(f"{spec.model} is not a causal LM (a {config.model_type} encoder): train-clm needs a decoder "
                       "such as LLaMA, Mistral, Qwen2, GPT-2 or OPT")
    with torch.device("meta"):
        try:
            skeleton = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise RunError(f"{spec.model} is not a causal LM ({' '.join(str(e).split())[:200]})") from None
    try:
        build_lora_config(skeleton, PriLoraConfig.from_dict(spec.prilora))
    except ValueError as e:
        raise RunError(f"{e} (model {spec.model})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def loss_curve(log_history: list[dict]) -> list[list[float]]:
    return [[h["step"], h["loss"]] for h in log_history if "loss" in h and "step" in h]


def four_bit_kwargs() -> dict:
    """``from_pretrained`` arguments of a 4-bit NF4 base (QLoRA): compute in bf16 on a GPU that supports
    it, else fp32 (bitsandbytes' CPU kernels and older GPUs)."""
    from transformers import BitsAndBytesConfig

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=dtype), "dtype": dtype}


@holding_output_dir
def run_clm(spec: ClmSpec, paths) -> dict:
    """Train, evaluate before and after, save the adapter and results.json; returns the results."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    replace, resume_from = check_output_dir(paths, spec)
    tokenizer = load_tokenizer(spec)
    train_blocks, eval_blocks, train_tokens = load_blocks(spec, tokenizer)
    micro = micro_batch_size(spec.batch_size, paths.gradient_accumulation)
    mixed = precision_args(spec.precision)
    set_seed(spec.seed)
    with quiet_loading(not paths.verbose):
        base = AutoModelForCausalLM.from_pretrained(spec.model, **(four_bit_kwargs() if spec.load_in_4bit else {}))
        model, pruner = get_prilora_model(base, PriLoraConfig.from_dict(spec.prilora))
    main = prepare_output_dir(paths, replace, {"spec": spec.to_dict()})

    steps_per_epoch = math.ceil(len(train_blocks) / spec.batch_size)
    warmup = int(spec.warmup) if spec.warmup >= 1 else spec.warmup
    args = TrainingArguments(
        output_dir=paths.output_dir, seed=spec.seed, learning_rate=spec.learning_rate, num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1, per_device_train_batch_size=micro,
        gradient_accumulation_steps=paths.gradient_accumulation, per_device_eval_batch_size=micro, warmup_steps=warmup, weight_decay=spec.weight_decay,
        lr_scheduler_type="linear", eval_strategy="no",
        save_strategy="steps" if paths.save_steps else "epoch", save_steps=paths.save_steps or 500,
        save_total_limit=None,  # KeepCheckpoints deletes old ones, once a new one is complete
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        logging_nan_inf_filter=False, report_to=[], disable_tqdm=paths.quiet,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, ddp_find_unused_parameters=False, **mixed,
        torch_compile=paths.compile,
    )
    train_ds = Dataset.from_dict({"input_ids": train_blocks})
    eval_ds = Dataset.from_dict({"input_ids": eval_blocks})
    # In this order: the clock's file completes a checkpoint, then older ones go; the interrupt's checkpoint
    # holds all the others' files.
    clock, keeper, interrupt = TrainingClock(resume_from), KeepCheckpoints(paths.keep_checkpoints), SaveOnInterrupt()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                      callbacks=[PriLoraCallback(pruner), clock, keeper, interrupt])
    wait_for_main_process()  # the output folder exists before any process trains
    if main:
        print(f"prilora train-clm: {spec.model} / {spec.method} / seed {spec.seed}; {len(train_blocks)} training blocks "
              f"of {spec.block_size} tokens, {len(eval_blocks)} evaluation blocks; lr {spec.learning_rate:g}, "
              f"{spec.epochs:g} epochs, batch {spec.batch_size}, {spec.precision}"
              + ("; base in 4-bit NF4" if spec.load_in_4bit else "")
              + (f"; resuming from {resume_from}" if resume_from else ""), file=sys.stderr, flush=True)
    before = trainer.evaluate()["eval_loss"]
    output = train_stoppably(trainer, interrupt, resume_from)
    runtime = clock.elapsed()  # earlier parts of a resumed run included
    after = trainer.evaluate()["eval_loss"]
    replicas = pruner.check_replicas()
    if not main:
        finish_distributed()
        return {}
    model.save_pretrained(paths.output_dir)
    tokenizer.save_pretrained(paths.output_dir)
    counts = parameter_counts(model)
    perplexity = lambda loss: math.exp(loss) if loss < 700 else float("inf")  # noqa: E731
    results = {
        "kind": "causal_lm", "model": spec.model, "method": spec.method, "seed": spec.seed,
        "train_file": spec.train_file, "eval_file": spec.eval_file, "holdout": None if spec.eval_file else spec.holdout,
        "block_size": spec.block_size, "train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks),
        "train_tokens": train_tokens, "learning_rate": spec.learning_rate, "epochs": spec.epochs,
        "batch_size": spec.batch_size, "prilora": spec.prilora, "max_steps": spec.max_steps,
        "metrics": {"eval_loss": after, "perplexity": perplexity(after), "initial_eval_loss": before,
                    "initial_perplexity": perplexity(before)},
        "train_loss": output.training_loss, "loss_curve": loss_curve(trainer.state.log_history),
        "lora_params": counts["lora"], "ranks": list(model.prilora_ranks), "a_sparsity": pruner.sparsity()["A"],
        "pruning_history": pruner.history,
        "steps": trainer.state.global_step, "precision": spec.precision, "load_in_4bit": spec.load_in_4bit,
        "world_size": launched_world_size(),
        "gradient_accumulation": paths.gradient_accumulation, "micro_batch_size": micro, "compiled": paths.compile,
        "replicas_identical": True if replicas > 1 else None, "resumed_from": os.path.basename(resume_from) if resume_from else None,
        "train_runtime_s": round(runtime, 2), "versions": versions(), "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(os.path.join(paths.output_dir, RESULTS_FILE), results)
    write_manifest(paths.output_dir, recursive=False)  # the adapter, tokenizer, run.json, results.json; last
    finish_distributed()
    return results
