"""Parameter budgets against the arithmetic of method.md: 4*(h+h) + 2*(h+f) per unit of rank."""

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

from prilora import PriLoraConfig, get_prilora_model, parameter_counts, rank_schedule


def per_unit(h, f):
    return 4 * (h + h) + 2 * (h + f)


@pytest.fixture(scope="module")
def deberta_base_config():
    return DebertaV2Config(
        hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12, vocab_size=128100,
        relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=256,
        norm_rel_ebd="layer_norm", share_att_key=True, num_labels=2,
    )


@pytest.mark.parametrize("schedule", ["linear", "uniform"])
def test_deberta_v3_base_budget_is_1327104(deberta_base_config, schedule):
    torch.manual_seed(0)
    model, pruner = get_prilora_model(
        DebertaV2ForSequenceClassification(deberta_base_config), PriLoraConfig(rank_schedule=schedule, task_type="SEQ_CLS")
    )
    counts = parameter_counts(model)
    assert counts["lora"] == 1_327_104 == per_unit(768, 3072) * 96
    assert model.prilora_ranks == rank_schedule(schedule, 12, 4, 12)
    by_layer = {}
    for s in pruner.sites:
        by_layer.setdefault(s.layer, set()).add(s.lora_A.shape[0])
    assert [by_layer[i] for i in range(12)] == [{r} for r in model.prilora_ranks]
    assert len(pruner.sites) == 72
    # the head (pooler + classifier) is reported apart from the budget
    assert counts["head"] == (768 * 768 + 768) + (768 * 2 + 2)


def test_other_schedules_keep_the_budget(deberta_base_config):
    torch.manual_seed(0)
    for schedule in ("inverted", "concentrated"):
        model, _ = get_prilora_model(DebertaV2ForSequenceClassification(deberta_base_config), PriLoraConfig(rank_schedule=schedule, task_type="SEQ_CLS"))
        assert parameter_counts(model)["lora"] == 1_327_104, schedule


@pytest.mark.parametrize("schedule", ["linear", "uniform"])
def test_mpnet_base_budget_is_the_papers(schedule):
    """all-mpnet-base-v2's shapes (the 12-layer model of the depth-12 study): q, k, v, o under attention.attn,
    FFN in and out; the paper's ranks and its 1,327,104 parameters."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                         vocab_size=30527, num_labels=2)
    model, pruner = get_prilora_model(MPNetForSequenceClassification(config),
                                      PriLoraConfig(rank_schedule=schedule, task_type="SEQ_CLS"))
    assert parameter_counts(model)["lora"] == 1_327_104 == per_unit(768, 3072) * 96
    assert model.prilora_ranks == ([4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12] if schedule == "linear" else [8] * 12)
    assert sorted({s.name.split(".", 4)[-1] for s in pruner.sites}) == [
        "attention.attn.k", "attention.attn.o", "attention.attn.q", "attention.attn.v", "intermediate.dense",
        "output.dense"]
    assert len(pruner.sites) == 72
