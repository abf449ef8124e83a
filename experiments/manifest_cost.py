"""What the checkpoint manifest costs (issue 31): hashing a checkpoint (SHA-256 of every file) next to
writing it, on the packaged MiniLM and on the 0.27B LLaMA-style decoder (random weights), PRILoRA with
its defaults after one optimizer step (so AdamW's state is in the checkpoint).

    python experiments/manifest_cost.py --out results/manifest-cost.jsonl

For each model: Trainer writes the checkpoint as a run does (``_save_checkpoint``: adapter, optimizer,
scheduler, RNG and trainer state; then the pruner's state, as PriLoraCallback does) into a fresh folder,
``--repeats`` times; then the manifest is written, and verified, on each of those folders. The files are
hashed right after they were written (in the page cache), as the runners do; a verification at resume
may read them from disk. Medians of the repeats; one JSON line per model. Stop other heavy jobs first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from prilora import PriLoraConfig, get_prilora_model
from prilora.bench import load_base, make_batch
from prilora.manifest import verify, write_manifest
from prilora.run_folder import machine, versions


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def measure(name: str, repeats: int, root: str) -> dict:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    base, task_type, vocab = load_base(name)
    model, pruner = get_prilora_model(base, PriLoraConfig(task_type=task_type))
    batch = make_batch(task_type, vocab, 2, 16, torch.device("cpu"))
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    args = TrainingArguments(output_dir=os.path.join(root, name), max_steps=1, per_device_train_batch_size=2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    save, manifest, check, sizes = [], [], [], []
    for i in range(repeats):
        trainer.state.global_step = i + 1  # a new checkpoint-<i+1> folder each time
        folder = os.path.join(args.output_dir, f"checkpoint-{i + 1}")
        t0 = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)
        pruner.save(folder)
        t1 = time.perf_counter()
        write_manifest(folder)
        t2 = time.perf_counter()
        problems = verify(folder)[0]
        t3 = time.perf_counter()
        assert not problems, problems
        save.append(t1 - t0)
        manifest.append(t2 - t1)
        check.append(t3 - t2)
        sizes.append(folder_bytes(folder))
    med = {k: statistics.median(v) for k, v in (("save", save), ("manifest", manifest), ("verify", check))}
    return {"model": name, "checkpoint_bytes": sizes[0], "repeats": repeats,
            "save_ms": round(1000 * med["save"], 1), "manifest_ms": round(1000 * med["manifest"], 1),
            "verify_ms": round(1000 * med["verify"], 1),
            "manifest_over_save": round(med["manifest"] / med["save"], 4),
            "hash_mb_per_s": round(sizes[0] / med["manifest"] / 1e6, 1),
            "save_ms_all": [round(1000 * x, 1) for x in save], "manifest_ms_all": [round(1000 * x, 1) for x in manifest],
            "verify_ms_all": [round(1000 * x, 1) for x in check], "machine": machine(), "versions": versions(),
            "command": "python experiments/manifest_cost.py " + " ".join(sys.argv[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,llama-0.27b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON lines file to append to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            row = measure(name, args.repeats, root)
            line = json.dumps(row)
            print(line)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
