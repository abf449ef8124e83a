"""Configs of the model sizes the docs speak of, for random-weight measurements (sizes, speed).

The hub is not needed: DeBERTaV3-base is the paper's model, and a LLaMA-style decoder of a
few hundred million parameters stands for the causal LMs most users fine-tune today.
"""

from __future__ import annotations


def deberta_v3_base_config(num_labels: int = 2):
    """microsoft/deberta-v3-base's architecture (184M parameters with its 128k vocabulary)."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1, position_biased_input=False, layer_norm_eps=1e-7, num_labels=num_labels,
    )


def llama_style_config():
    """A LLaMA-architecture decoder of about 0.27B parameters (16 layers, width 1024, GQA 16/4 heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )


REFERENCE_CONFIGS = {"deberta-v3-base": deberta_v3_base_config, "llama-0.27b": llama_style_config}
