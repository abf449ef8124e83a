"""PriLoraConfig: the LoRA fields PEFT knows, plus the rank schedule and pruning settings.

It is not a PEFT config (PEFT's method registry is closed); `to_lora_config` turns it into a
plain `peft.LoraConfig` with per-module ranks, which is what gets trained and saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .ranks import SCHEDULES, is_int

SEEDS = range(2**32)  # the seeds that torch, numpy and Trainer's set_seed take

PRUNE_SCOPES = ("row", "matrix")
PRUNE_CRITERIA = ("importance", "magnitude", "random", "none")
PRUNE_MATRICES = ("A", "B")
ALPHA_POLICIES = ("constant_scaling", "constant_alpha")
STATS_SYNC = ("event", "step")

StepSpec = Union[int, float]

# LoraConfig fields that PriLoraConfig sets itself (or that would undo its per-layer ranks).
CONTROLLED_LORA_FIELDS = (
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "bias",
    "modules_to_save", "task_type", "layers_to_transform", "layers_pattern", "use_rslora",
)


@dataclass
class PriLoraConfig:
    """Settings of a PRILoRA run. Defaults follow the paper where it is explicit, and
    `docs/METHOD.md` says why for each choice it leaves open.

    Rank schedule
        rank_schedule: "linear" | "uniform" | "inverted" | "concentrated" | list of per-layer ranks.
        r_start, r_end: ranks of the first and last layer of the linear schedule.
        alpha_policy: "constant_scaling" (default) gives every module the scale
            ``lora_alpha / r_ref`` of LoRA at the schedule's mean rank ``r_ref``;
            "constant_alpha" keeps ``lora_alpha`` everywhere, so PEFT's ``alpha / r_i``
            scales low-rank layers up.
        layer_pattern: regex whose first group captures the layer index from a module path.

    Pruning of A (``W`` below is A, or B with prune_matrix="B")
        prune_ratio: fraction of each row of W set to zero at every pruning event.
        prune_interval: optimizer steps between events.
        prune_start, prune_end: first and last event, as an optimizer step (int) or a fraction
            of total_steps (float in [0, 1]). After prune_end the last mask is held.
        total_steps: optimizer steps of the run (the Trainer callback fills it in).
        ema_beta: EMA coefficient of the per-feature input norms.
        prune_scope: "row" (each rank component keeps its own inputs) or "matrix".
        prune_criterion: "importance" (|W| x input norm), "magnitude", "random", "none".
        prune_matrix: "A" (the paper) or "B" (ablation).
        seed: seed of the "random" criterion.

    Multi-process training (torch.distributed; no effect in one process)
        stats_sync: "event" (default): at each pruning event the processes' norms are combined
            (root of the sum of squares, one all-reduce), so every replica prunes the same
            weights, with no communication on other steps; equal to one process on the
            concatenated batch when the per-step norms are steady (exactly so for ema_beta=0).
            "step": every optimizer step's squared norms are summed across processes before
            the EMA update (one all-reduce per step): equal to one process on the
            concatenated batch for any ema_beta.
    """

    # rank schedule
    rank_schedule: Union[str, list[int]] = "linear"
    r_start: int = 4
    r_end: int = 12
    alpha_policy: str = "constant_scaling"
    layer_pattern: str | None = None
    # LoRA fields passed to peft.LoraConfig
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str, None] = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    bias: str = "none"
    lora_kwargs: dict[str, Any] = field(default_factory=dict)
    # pruning
    prune_ratio: float = 0.5
    prune_interval: int = 10
    prune_start: StepSpec = 0
    prune_end: StepSpec = 0.9
    total_steps: int | None = None
    ema_beta: float = 0.9
    prune_scope: str = "row"
    prune_criterion: str = "importance"
    prune_matrix: str = "A"
    seed: int = 0
    stats_sync: str = "event"

    def __post_init__(self) -> None:
        if isinstance(self.rank_schedule, str):
            if self.rank_schedule not in SCHEDULES:
                raise ValueError(
                    f"unknown rank schedule {self.rank_schedule!r}: use one of {', '.join(SCHEDULES)} "
                    "or a list of per-layer ranks"
                )
        else:
            self.rank_schedule = list(self.rank_schedule)
            for r in self.rank_schedule:
                if not is_int(r) or r < 0:
                    raise ValueError(f"rank_schedule entries must be integers >= 0, got {r!r}")
        for name in ("r_start", "r_end"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"{name} must be an integer rank, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.layer_pattern is not None:
            from .architectures import compile_layer_pattern

            compile_layer_pattern(self.layer_pattern)
        if not is_int(self.seed) or self.seed not in SEEDS:
            raise ValueError(f"seed must be an integer in [0, 2**32 - 1], got {self.seed!r}")
        _check_choice("alpha_policy", self.alpha_policy, ALPHA_POLICIES)
        _check_choice("prune_scope", self.prune_scope, PRUNE_SCOPES)
        _check_choice("prune_criterion", self.prune_criterion, PRUNE_CRITERIA)
        _check_choice("prune_matrix", self.prune_matrix, PRUNE_MATRICES)
        _check_choice("stats_sync", self.stats_sync, STATS_SYNC)
        if not _is_real(self.prune_ratio) or not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio!r}")
        if not _is_real(self.ema_beta) or not 0 <= self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta!r}")
        if not _is_real(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not _is_real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not is_int(self.prune_interval) or self.prune_interval < 1:
            raise ValueError(f"prune_interval must be a positive integer of optimizer steps, got {self.prune_interval!r}")
        if self.total_steps is not None and (not is_int(self.total_steps) or self.total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        for name in ("prune_start", "prune_end"):
            _check_step_spec(name, getattr(self, name))
        if type(self.prune_start) is type(self.prune_end) and self.prune_start > self.prune_end:
            raise ValueError(
                f"prune_start ({self.prune_start}) is after prune_end ({self.prune_end}): pruning would never run"
            )
        if self.total_steps is not None or (isinstance(self.prune_start, int) and isinstance(self.prune_end, int)):
            self.resolve_window(self.total_steps)
        self._check_lora_kwargs()
        if isinstance(self.target_modules, str):  # one regex, matched against the full module name (PEFT's rule)
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regex ({e}): pass a list "
                                 "of module name suffixes, or a regex matched against the full name") from None
        elif isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is empty: pass None for the architecture's defaults")

    def _check_lora_kwargs(self) -> None:
        from peft import LoraConfig

        for key in self.lora_kwargs:
            if key in CONTROLLED_LORA_FIELDS:
                raise ValueError(
                    f"lora_kwargs sets {key!r}, which PriLoraConfig controls: use its own fields "
                    "(rank_schedule/r_start/r_end, lora_alpha, alpha_policy, target_modules, ...)"
                )
            if key not in LoraConfig.__dataclass_fields__:
                raise ValueError(f"lora_kwargs has {key!r}, which is not a field of peft.LoraConfig")

    @property
    def prunes(self) -> bool:
        return self.prune_criterion != "none" and self.prune_ratio > 0

    @property
    def needs_input_norms(self) -> bool:
        return self.prunes and self.prune_criterion == "importance"

    def resolve_window(self, total_steps: int | None) -> tuple[int, int]:
        """First and last pruning event as optimizer steps (1-based: step s is the s-th update)."""
        start = _resolve_step("prune_start", self.prune_start, total_steps)
        end = _resolve_step("prune_end", self.prune_end, total_steps)
        if end < 1 and self.prunes:
            raise ValueError(
                f"prune_end resolves to optimizer step {end}: no pruning event could happen "
                "(steps count from 1); use prune_criterion='none' to train without pruning"
            )
        if start > end:
            raise ValueError(
                f"prune_start resolves to step {start}, after prune_end at step {end} "
                f"(total_steps={total_steps}): pruning would never run"
            )
        return start, end

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PriLoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PriLoraConfig fields {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_step_spec(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an optimizer step (int) or a fraction of training (float), got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be a step >= 0, got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} as a fraction of training must be in [0, 1], got {value}")


def _resolve_step(name: str, value: StepSpec, total_steps: int | None) -> int:
    if isinstance(value, int):
        return value
    if total_steps is None:
        raise ValueError(
            f"{name}={value} is a fraction of training but the number of optimizer steps is unknown: "
            "pass total_steps= to PriLoraConfig (plain loop) or use PriLoraCallback with the Trainer"
        )
    return math.floor(value * total_steps + 0.5)  # half up, as the rank schedules
