"""Tiny models built from configs (no download) and shared helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def tiny_bert(num_layers: int = 4, num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=num_layers, intermediate_size=64, num_attention_heads=4,
        vocab_size=100, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


class ParallelLayers(nn.Module):
    """Every layer's `proj` reads the same input, so every adapted input has known statistics."""

    def __init__(self, num_layers: int = 3, d_in: int = 16, d_out: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(d_in, d_out)}) for _ in range(num_layers))

    def forward(self, x):
        return sum(layer["proj"](x) for layer in self.layers)


@pytest.fixture
def glue_dir():
    if not GLUE_DIR.is_dir():
        pytest.fail(f"GLUE data not found at {GLUE_DIR} (expected ../shared/data/glue beside the repo)")
    return GLUE_DIR


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch):
    # No network here: make any accidental hub access fail fast instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def save_tiny_model_folder(folder: Path, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random BERT with a character-level WordPiece vocabulary: a local model folder that
    `prilora train --model` loads like a hub model, with any English text tokenizable."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()&$%/")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=num_layers, intermediate_size=64, num_attention_heads=4,
                        vocab_size=len(vocab), max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)  # a pretrained encoder without a task head, as on the hub
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-bert"))


CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-()\n")


def char_tokenizer():
    """A character-level fast tokenizer with <s>, </s>, <pad> and <unk>: any lower-case English text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_causal_lm(arch: str = "llama", num_layers: int = 4, hidden: int = 32, seed: int = 0, vocab_size: int = 64):
    """A tiny random causal LM of one of the decoder families (no download)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=256, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **common)
    elif arch == "opt":
        config = tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=4, num_hidden_layers=num_layers,
                              max_position_embeddings=256, word_embed_proj_dim=hidden, dropout=0.0, bos_token_id=1,
                              eos_token_id=2, pad_token_id=3, **common)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        config = cls(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=num_layers, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                     pad_token_id=3, **common)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def save_tiny_causal_lm(folder: Path, arch: str = "llama", **kwargs) -> Path:
    tokenizer = char_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tiny_causal_lm(arch, vocab_size=len(tokenizer), **kwargs).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt, as in a terminal: a shell starts background jobs (a CI runner's,
    perhaps) with SIGINT ignored, and a test that sends one must not depend on that."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)
