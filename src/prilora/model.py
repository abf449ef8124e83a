"""Turn a transformer into a PRILoRA model: a plain PEFT LoRA model with per-layer ranks,
plus a pruner that works on it from outside.

Training a standard LoRA adapter (not a new PEFT method) is what lets any PEFT user load,
merge and serve the result without prilora installed.
"""

from __future__ import annotations

import json
import os
import re
import types
import warnings
from fractions import Fraction
from typing import Any

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from . import __version__
from .architectures import TargetModule, default_modules_to_save, find_target_modules
from .config import PriLoraConfig
from .pruning import PriLoraPruner, PruneSite
from .ranks import rank_schedule

PRILORA_FILE = "prilora.json"


def module_alphas(ranks: list[int], lora_alpha: float, policy: str) -> list[float]:
    """LoRA alpha per layer. PEFT scales an update by ``alpha / r``.

    ``constant_scaling``: every layer gets ``lora_alpha / r_ref`` with ``r_ref`` the mean rank
    of the schedule, i.e. the scale of plain LoRA at the same budget, so a PRILoRA/LoRA
    comparison changes the rank distribution and nothing else.
    ``constant_alpha``: ``lora_alpha`` everywhere (low-rank layers get a larger scale).
    """
    if policy == "constant_alpha":
        return [float(lora_alpha)] * len(ranks)
    r_ref = Fraction(sum(ranks), len(ranks))
    return [float(Fraction(lora_alpha) * r / r_ref) for r in ranks]


def build_lora_config(
    model: nn.Module, config: PriLoraConfig
) -> tuple[LoraConfig, list[TargetModule], list[int]]:
    """The plain LoraConfig that realises ``config`` on ``model``, the adapted modules and the ranks."""
    targets, num_layers = find_target_modules(model, config.target_modules, config.layer_pattern)
    ranks = rank_schedule(config.rank_schedule, num_layers, config.r_start, config.r_end)
    alphas = module_alphas(ranks, config.lora_alpha, config.alpha_policy)
    adapted = [t for t in targets if ranks[t.layer] > 0]
    # Full, escaped module names as keys: PEFT matches keys as regex suffixes, and a loose key
    # such as "layer.1.attention.self.query" would also catch layer 11.
    rank_pattern = {re.escape(t.name): ranks[t.layer] for t in adapted}
    alpha_pattern = {re.escape(t.name): _compact(alphas[t.layer]) for t in adapted}
    modules_to_save = config.modules_to_save
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(model, config.task_type)
    mean_rank = max(1, round(sum(ranks) / num_layers))
    lora_kwargs = dict(config.lora_kwargs)
    if any(t.transposed for t in adapted):
        lora_kwargs.setdefault("fan_in_fan_out", True)  # GPT-2's Conv1D stores W as (in, out)
    lora_config = LoraConfig(
        r=mean_rank,
        lora_alpha=_compact(config.lora_alpha),
        target_modules=[t.name for t in adapted],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=config.lora_dropout,
        bias=config.bias,
        modules_to_save=modules_to_save,
        task_type=config.task_type,
        **lora_kwargs,
    )
    return lora_config, adapted, ranks


def _compact(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def get_prilora_model(
    model: nn.Module, config: PriLoraConfig, adapter_name: str = "default"
) -> tuple[PeftModel, PriLoraPruner]:
    """Wrap ``model`` in a PEFT LoRA model with PRILoRA's ranks and return it with its pruner.

    Call ``pruner.step()`` after every optimizer step (or pass ``PriLoraCallback(pruner)`` to
    the Trainer). ``model.save_pretrained`` writes a standard LoRA adapter plus ``prilora.json``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a loaded torch model (e.g. AutoModelForSequenceClassification"
                        f".from_pretrained(...)), got {type(model).__name__}")
    if not isinstance(config, PriLoraConfig):
        raise TypeError(f"config must be a PriLoraConfig (from a dict: PriLoraConfig.from_dict(...)), "
                        f"got {type(config).__name__}")
    if config.task_type is None and type(model).__name__.endswith("ForSequenceClassification"):
        warnings.warn(
            f"{type(model).__name__} with task_type=None: its classification head stays frozen; "
            "pass PriLoraConfig(task_type='SEQ_CLS') to train it",
            UserWarning,
        )
    lora_config, adapted, ranks = build_lora_config(model, config)
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    sites = _verify_and_collect(peft_model, adapted, ranks, lora_config, adapter_name, config.prune_matrix)
    pruner = PriLoraPruner(sites, config)
    peft_model.prilora_pruner = pruner
    peft_model.prilora_ranks = ranks
    peft_model.save_pretrained = types.MethodType(_save_pretrained, peft_model)
    return peft_model, pruner


def _verify_and_collect(
    peft_model: PeftModel,
    adapted: list[TargetModule],
    ranks: list[int],
    lora_config: LoraConfig,
    adapter_name: str,
    prune_matrix: str,
) -> list[PruneSite]:
    """Check that PEFT built exactly the ranks and scales of the schedule (it only warns when a
    pattern matches nothing) and return the pruning sites."""
    base = peft_model.base_model.model
    sites = []
    for t in adapted:
        module = base.get_submodule(t.name)
        expected_r = ranks[t.layer]
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            raise RuntimeError(f"PEFT did not adapt {t.name!r}; the adapter would silently miss it")
        a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        if module.r[adapter_name] != expected_r or a.shape[0] != expected_r or b.shape[1] != expected_r:
            raise RuntimeError(
                f"PEFT built rank {module.r[adapter_name]} (A {tuple(a.shape)}) for {t.name!r}, "
                f"the schedule says {expected_r}"
            )
        expected_scale = lora_config.alpha_pattern[re.escape(t.name)] / expected_r
        if abs(module.scaling[adapter_name] - expected_scale) > 1e-9 * expected_scale:
            raise RuntimeError(
                f"PEFT built scaling {module.scaling[adapter_name]} for {t.name!r}, expected {expected_scale}"
            )
        stats_module = module if prune_matrix == "A" else module.lora_B[adapter_name]
        sites.append(PruneSite(t.name, t.layer, module.lora_A[adapter_name], module.lora_B[adapter_name],
                               prune_matrix, stats_module))
    n_lora_layers = sum(
        1 for m in base.modules() if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})
    )
    if n_lora_layers != len(adapted):
        raise RuntimeError(f"PEFT adapted {n_lora_layers} modules, the schedule has {len(adapted)}")
    return sites


def parameter_counts(peft_model: PeftModel) -> dict[str, int]:
    """Adapter parameters (A and B: the budget the papers report) and trainable head parameters."""
    lora = head = 0
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:  # A and B (and AdaLoRA's E, DoRA's magnitude)
            lora += p.numel()
        elif p.requires_grad:
            head += p.numel()
    return {"lora": lora, "head": head}


def prilora_summary(peft_model: PeftModel) -> dict[str, Any]:
    """What ``prilora.json`` holds: settings, ranks, parameter counts and final sparsity."""
    pruner: PriLoraPruner = peft_model.prilora_pruner
    sparsity = pruner.sparsity()
    return {
        "prilora_version": __version__,
        "config": pruner.config.to_dict(),
        "ranks": list(peft_model.prilora_ranks),
        "modules": {s.name: {"layer": s.layer, "r": s.lora_A.shape[0]} for s in pruner.sites},
        "parameters": parameter_counts(peft_model),
        "sparsity": {k: sparsity[k] for k in ("A", "B", "adapter", "per_layer")},
        "optimizer_steps": pruner.global_step,
        "pruning_events": pruner.events,
        "pruning_history": pruner.history,
    }


def _save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """PeftModel.save_pretrained, then ``prilora.json`` beside the adapter. Under FSDP2 the summary's
    sparsity is counted over every process's shards, a collective: every process calls this, with
    ``is_main_process`` true on one."""
    main = kwargs.get("is_main_process", True)
    sharded = any(site.sharded for site in self.prilora_pruner.sites)
    summary = prilora_summary(self) if main or sharded else None
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if not main:
        return
    path = os.path.join(save_directory, PRILORA_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
