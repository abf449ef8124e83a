"""Where the layers of a transformer are, and which matrices PRILoRA adapts by default.

A rank schedule is indexed by depth, so every adapted module must be mapped to its layer.
The mapping is read from the module path (``encoder.layer.N``, ``h.N``, ``layers.N``); a
model laid out otherwise needs ``layer_pattern``. Nothing here guesses silently: a pattern
that finds no layer, or finds layers that do not cover the model, is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

# The paper adapts all six weight matrices of each encoder layer (q, k, v, attention
# output, FFN in, FFN out); for decoders the same idea is all attention projections and
# all MLP matrices.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "mpnet": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

# Bidirectional encoders: transformers can put an LM head on them, but they are not causal LMs.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "deberta", "distilbert",
                                 "mpnet"})

# Layer stacks of BERT/RoBERTa/DeBERTa (encoder.layer.N), DistilBERT (transformer.layer.N),
# GPT-2 (h.N) and LLaMA/Mistral/Qwen2/OPT (layers.N).
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layer|layers|h)\.(\d+)\."

# Heads that a sequence classifier must train besides the LoRA matrices. PEFT adds the
# classifier by itself but not a pooler, which DeBERTa (and BERT) put before it.
DEFAULT_POOLER_NAMES = ("pooler",)


@dataclass(frozen=True)
class TargetModule:
    name: str  # full module path inside the base model
    layer: int  # 0-based depth
    transposed: bool = False  # GPT-2's Conv1D keeps its weight as (in, out)


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = model_type_of(model)
    if model_type not in DEFAULT_TARGET_MODULES:
        known = ", ".join(sorted(DEFAULT_TARGET_MODULES))
        raise ValueError(
            f"no default target modules for model type {model_type!r}: pass target_modules=[...] "
            f"(module name suffixes); defaults exist for {known}"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_adaptable(module: nn.Module) -> bool:
    # nn.Linear, and GPT-2's Conv1D (a transposed linear layer that PEFT's LoRA supports).
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def compile_layer_pattern(layer_pattern: str | None) -> re.Pattern:
    """``layer_pattern`` (None: the default) as a regex, checked here so that a bad one is a one-line
    error when the configuration is made, not a traceback from deep inside model building."""
    text = DEFAULT_LAYER_PATTERN if layer_pattern is None else layer_pattern
    if not isinstance(text, str):
        raise ValueError(f"layer_pattern must be a regex string, got {text!r}")
    try:
        pattern = re.compile(text)
    except re.error as e:
        raise ValueError(f"layer_pattern {text!r} is not a valid regex ({e}): pass a regex whose first group "
                         f"captures the layer index; the default is {DEFAULT_LAYER_PATTERN}") from None
    if pattern.groups < 1:
        raise ValueError(f"layer_pattern {text!r} must have a capture group for the layer index; the default is "
                         f"{DEFAULT_LAYER_PATTERN}")
    return pattern


def layer_index(pattern: re.Pattern, name: str, captured: str) -> int:
    """The layer number that ``pattern`` captured from module ``name``."""
    if not captured.isdigit():
        raise ValueError(f"layer_pattern {pattern.pattern!r} captures {captured!r} from module {name!r}, not a layer "
                         "number: its first group must match digits only, e.g. (\\d+)")
    return int(captured)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None,
    layer_pattern: str | None = None,
    num_layers: int | None = None,
) -> tuple[list[TargetModule], int]:
    """Locate the modules to adapt and the layer of each; return them and the layer count.

    ``target_modules`` follows PEFT: a list of name suffixes, or one regex matched against the
    full name. Every match must lie inside the layer stack, since its rank comes from its depth.
    """
    targets = default_target_modules(model) if target_modules is None else target_modules
    pattern = compile_layer_pattern(layer_pattern)
    found: list[TargetModule] = []
    outside: list[str] = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets) or not _is_adaptable(module):
            continue
        hits = pattern.findall(name + ".")
        indices = {layer_index(pattern, name, h if isinstance(h, str) else h[0]) for h in hits}
        if len(indices) == 1:
            found.append(TargetModule(name, indices.pop(), type(module).__name__ == "Conv1D"))
        elif not indices:
            outside.append(name)
        else:
            raise ValueError(
                f"module {name!r} matches the layer pattern {pattern.pattern!r} more than once: "
                "pass layer_pattern= with a regex that captures the layer index once"
            )
    if not found and not outside:
        raise ValueError(
            f"target_modules={targets!r} match no linear layer of this {type(model).__name__}: "
            "check the module names (model.named_modules()) and pass target_modules=[...]"
        )
    if not found:
        raise ValueError(
            f"cannot locate the layers of this {type(model).__name__}: no target module path matches the "
            f"layer pattern {pattern.pattern!r} (e.g. {outside[0]!r}); pass layer_pattern= with a regex "
            "whose first group captures the layer index"
        )
    if outside:
        raise ValueError(
            f"target modules outside the layer stack have no depth to take a rank from: {outside[:4]}; "
            "remove them from target_modules (train them fully with modules_to_save) or pass a layer_pattern "
            "that covers them"
        )
    layers = sorted({t.layer for t in found})
    if num_layers is None:
        num_layers = num_hidden_layers(model) or layers[-1] + 1
    if layers != list(range(num_layers)):
        raise ValueError(
            f"the layer pattern {pattern.pattern!r} found layer indices {layers} but the model has "
            f"{num_layers} layers: pass layer_pattern= (or num_layers=) that matches this model's layer stack"
        )
    return found, num_layers


def default_modules_to_save(model: nn.Module, task_type: str | None) -> list[str] | None:
    """For sequence classification, also train the pooler that feeds the classifier, if any."""
    if task_type != "SEQ_CLS":
        return None
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in DEFAULT_POOLER_NAMES]
    return ["pooler"] if names else None
