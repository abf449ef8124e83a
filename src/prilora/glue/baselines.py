"""The baselines of the paper's comparison: AdaLoRA (PEFT's, really allocating) and full fine-tuning.

PEFT's AdaLoRA only reallocates ranks when ``update_and_allocate`` is called after every
optimizer step; ``transformers.Trainer`` never calls it, so without
:class:`AdaLoraCallback` AdaLoRA silently trains as plain LoRA.
"""

from __future__ import annotations

import os

import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback

from ..architectures import default_modules_to_save, find_target_modules
from ..callback import checkpoint_folder

ADALORA_STATE_FILE = "adalora_state.pt"
# Fractions of all optimizer steps; AdaLoRA's GLUE scripts use about 10-15% and 45-60%.
ADALORA_DEFAULTS = {"init_r": 12, "target_r": 8, "tinit": 0.1, "tfinal": 0.5, "deltaT": 10,
                    "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.1}


def resolve_steps(value: float, total_steps: int) -> int:
    """A step count given as steps (>= 1) or as a fraction of all steps (< 1)."""
    return int(value) if value >= 1 else int(round(value * total_steps))


def adalora_schedule(options: dict, total_steps: int) -> dict:
    """``tinit``/``tfinal`` in optimizer steps; AdaLoRA needs ``tinit < total_steps - tfinal``."""
    tinit, tfinal = resolve_steps(options["tinit"], total_steps), resolve_steps(options["tfinal"], total_steps)
    if tinit >= total_steps - tfinal:
        raise ValueError(
            f"AdaLoRA needs tinit < total steps - tfinal, got tinit={tinit}, tfinal={tfinal} of {total_steps} "
            "optimizer steps: lower --adalora-tinit/--adalora-tfinal or train longer"
        )
    return {"tinit": tinit, "tfinal": tfinal, "total_step": total_steps}


def get_adalora_model(model, options: dict, total_steps: int, lora_alpha: float, lora_dropout: float,
                      task_type: str = "SEQ_CLS", target_modules=None) -> PeftModel:
    targets, num_layers = find_target_modules(model, target_modules)
    config = AdaLoraConfig(
        init_r=options["init_r"], target_r=options["target_r"], deltaT=options["deltaT"],
        beta1=options["beta1"], beta2=options["beta2"], orth_reg_weight=options["orth_reg_weight"],
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=[t.name for t in targets],
        modules_to_save=default_modules_to_save(model, task_type), task_type=task_type,
        **adalora_schedule(options, total_steps),
    )
    peft_model = get_peft_model(model, config)
    peft_model.adalora_layers = {t.name: t.layer for t in targets}  # for per-layer reports
    peft_model.adalora_num_layers = num_layers
    return peft_model


def adalora_ranks(model: PeftModel) -> dict[str, int]:
    """Ranks AdaLoRA kept per module (names as in the base model): the non-zero entries of ``lora_E``."""
    prefix = "base_model.model."
    return {name.split(".lora_E")[0].removeprefix(prefix): int((p != 0).sum())
            for name, p in model.named_parameters() if ".lora_E." in name}


def adalora_layer_ranks(model: PeftModel) -> list[float]:
    """Mean rank AdaLoRA kept per layer (0 for a layer it left without rank)."""
    per_layer = [[] for _ in range(model.adalora_num_layers)]
    for name, r in adalora_ranks(model).items():
        per_layer[model.adalora_layers[name]].append(r)
    return [round(sum(r) / len(r), 3) if r else 0 for r in per_layer]


class AdaLoraCallback(TrainerCallback):
    """Calls ``update_and_allocate`` after every optimizer step (gradients still present), sets
    ``total_step`` from the Trainer, and checkpoints the rank allocator's importance EMAs so that
    a resumed run allocates as an uninterrupted one."""

    def __init__(self, model: PeftModel, options: dict):
        self.model = model
        self.options = options

    @property
    def allocator(self):
        return self.model.base_model.rankallocator

    def on_train_begin(self, args, state, control, **kwargs):
        config = self.model.peft_config[self.model.active_adapter]
        for key, value in adalora_schedule(self.options, state.max_steps).items():
            setattr(config, key, value)
        if state.global_step > 0:
            path = os.path.join(checkpoint_folder(args, state), ADALORA_STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming AdaLoRA at step {state.global_step} but {path} is missing")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(self.allocator, key, saved[key])
            config.rank_pattern = saved["rank_pattern"]
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_folder(args, state)
        if state.is_world_process_zero and os.path.isdir(folder):
            config = self.model.peft_config[self.model.active_adapter]
            state_dict = {key: getattr(self.allocator, key) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
            torch.save({**state_dict, "rank_pattern": config.rank_pattern}, os.path.join(folder, ADALORA_STATE_FILE))
            # PEFT saves an AdaLoRA adapter cut to its rank pattern, which Trainer cannot load back into the
            # full-rank model it resumes; checkpoints get the uncut weights (the pattern is in our state file).
            pattern, config.rank_pattern = config.rank_pattern, None
            try:
                self.model.save_pretrained(folder)
            finally:
                config.rank_pattern = pattern
        return control
