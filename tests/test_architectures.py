"""Layer detection and default targets per architecture, checked on the modules PEFT built."""

import pytest
import torch.nn as nn
import transformers as tf
from peft.tuners.lora import LoraLayer

from prilora import PriLoraConfig, get_prilora_model, rank_schedule

from conftest import ParallelLayers, tiny_bert

# These tests look at the adapted matrices only; the head warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore:.*classification head stays frozen")

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=100)


def _decoder(config_cls, model_cls, **extra):
    cfg = config_cls(**SMALL, num_hidden_layers=5, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return model_cls(cfg)


BUILDERS = {
    "bert": (lambda: tiny_bert(num_layers=5), ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]),
    "roberta": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**SMALL, num_hidden_layers=5, max_position_embeddings=64)), None),
    "deberta-v2": (
        lambda: tf.DebertaV2ForSequenceClassification(
            tf.DebertaV2Config(**SMALL, num_hidden_layers=5, relative_attention=True, pos_att_type=["p2c", "c2p"])
        ),
        ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    ),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=5, n_head=4, vocab_size=100, n_positions=64)), ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
    "llama": (lambda: _decoder(tf.LlamaConfig, tf.LlamaForCausalLM), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mistral": (lambda: _decoder(tf.MistralConfig, tf.MistralForCausalLM), None),
    "qwen2": (lambda: _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM), None),
    "deberta": (lambda: tf.DebertaForSequenceClassification(tf.DebertaConfig(**SMALL, num_hidden_layers=5)), ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"]),
    "distilbert": (
        lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(dim=32, hidden_dim=64, n_heads=4, n_layers=5, vocab_size=100)),
        ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    ),
    "electra": (lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(**SMALL, num_hidden_layers=5, embedding_size=32)), None),
    "xlm-roberta": (lambda: tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(**SMALL, num_hidden_layers=5, max_position_embeddings=64)), None),
    "qwen3": (lambda: _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8), None),
    "gemma": (lambda: _decoder(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=8), None),
    "opt": (
        lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=5, vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)),
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    ),
}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_layers_found_and_ranks_built(arch):
    build, suffixes = BUILDERS[arch]
    model = build()
    peft_model, pruner = get_prilora_model(model, PriLoraConfig(r_start=2, r_end=10))
    expected = rank_schedule("linear", 5, 2, 10)
    assert peft_model.prilora_ranks == expected == [2, 4, 6, 8, 10]
    lora_modules = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    per_layer = {}
    for name, module in lora_modules.items():
        # Independent reading of the depth from the path, per architecture family.
        parts = name.split(".")
        idx = next(int(parts[i + 1]) for i, p in enumerate(parts) if p in ("layer", "layers", "h") and parts[i + 1].isdigit())
        assert module.lora_A["default"].weight.shape[0] == expected[idx], name
        assert module.lora_B["default"].weight.shape[1] == expected[idx], name
        per_layer.setdefault(idx, set()).add(name)
    assert sorted(per_layer) == list(range(5))
    counts = {len(v) for v in per_layer.values()}
    assert len(counts) == 1  # same matrices in every layer
    if suffixes is not None:
        layer0 = sorted(per_layer[0])
        assert len(layer0) == len(suffixes)
        for s in suffixes:
            assert any(n.endswith("." + s) for n in layer0), (s, layer0)
    assert len(pruner.sites) == len(lora_modules)


def test_unknown_layout_asks_for_layer_pattern():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(8, 8)}) for _ in range(3))

    with pytest.raises(ValueError, match="cannot locate the layers.*pass layer_pattern="):
        get_prilora_model(Blocks(), PriLoraConfig(target_modules=["proj"]))
    peft_model, _ = get_prilora_model(Blocks(), PriLoraConfig(target_modules=["proj"], layer_pattern=r"blocks\.(\d+)\."))
    assert peft_model.prilora_ranks == [4, 8, 12]


def test_unknown_architecture_needs_target_modules():
    with pytest.raises(ValueError, match="no default target modules for model type None: pass target_modules"):
        get_prilora_model(ParallelLayers(), PriLoraConfig())


def test_what_is_not_a_model_or_a_config_is_named():
    with pytest.raises(TypeError, match=r"model must be a loaded torch model \(e.g. AutoModelForSequenceClassification"
                                        r".from_pretrained\(...\)\), got str"):
        get_prilora_model("bert-base-uncased", PriLoraConfig())
    with pytest.raises(TypeError, match=r"config must be a PriLoraConfig \(from a dict: PriLoraConfig.from_dict"
                                        r"\(...\)\), got dict"):
        get_prilora_model(tiny_bert(), {"r_start": 4})


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules=\['nonexistent'\] match no linear layer"):
        get_prilora_model(tiny_bert(), PriLoraConfig(target_modules=["nonexistent"]))


def test_target_outside_layer_stack_is_refused():
    with pytest.raises(ValueError, match="outside the layer stack.*bert.pooler.dense"):
        get_prilora_model(tiny_bert(), PriLoraConfig(target_modules=["query", "pooler.dense"]))


def test_layer_pattern_that_misreads_layers():
    # A pattern that reads one digit maps layers 10 and 11 to 1: must not pass silently.
    with pytest.raises(ValueError, match=r"found layer indices \[0, 1, .*, 9\] but the model has 12 layers"):
        get_prilora_model(tiny_bert(12), PriLoraConfig(target_modules=["query"], layer_pattern=r"layer\.(\d)"))


def test_layer_pattern_that_captures_no_number():
    with pytest.raises(ValueError, match=r"layer_pattern '\(layer\)' captures 'layer' from module "
                                         r"'bert.encoder.layer.0.attention.self.query', not a layer number"):
        get_prilora_model(tiny_bert(), PriLoraConfig(target_modules=["query"], layer_pattern="(layer)"))


def test_concentrated_schedule_leaves_bottom_layers_unadapted():
    peft_model, pruner = get_prilora_model(tiny_bert(4), PriLoraConfig(rank_schedule="concentrated"))
    assert peft_model.prilora_ranks == [0, 0, 16, 16]
    layers = {s.layer for s in pruner.sites}
    assert layers == {2, 3}


def test_regex_target_modules():
    cfg = PriLoraConfig(target_modules=r".*\.attention\.self\.(query|value)")
    peft_model, pruner = get_prilora_model(tiny_bert(4), cfg)
    assert sorted({s.name.split(".")[-1] for s in pruner.sites}) == ["query", "value"]
    assert len(pruner.sites) == 8


def test_layer_11_not_caught_by_layer_1_key():
    # A 12-layer model: layer 1 must get rank 5 and layer 11 rank 12, not the same.
    peft_model, pruner = get_prilora_model(tiny_bert(12), PriLoraConfig(target_modules=["query"]))
    ranks = {s.layer: s.lora_A.shape[0] for s in pruner.sites}
    assert ranks[1] == 5 and ranks[11] == 12


def test_sequence_classifier_without_task_type_warns():
    with pytest.warns(UserWarning, match="with task_type=None: its classification head stays frozen"):
        get_prilora_model(tiny_bert(), PriLoraConfig())
