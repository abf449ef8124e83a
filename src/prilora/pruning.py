"""Ongoing importance pruning of the LoRA A matrices, driven after each optimizer step.

At every pruning event each row of A (each rank component) loses the ``int(ratio * d_in)``
weights of lowest importance ``|A[k, j]| * n_j``, where ``n_j`` is the EMA of the L2 norm of
input feature ``j``. Pruned weights are zeroed, not frozen: they may regrow until the next
event re-prunes them. After the last event (``prune_end``) its mask is held, re-applied
after every optimizer step, so the adapter that is saved has exactly the configured sparsity.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import PriLoraConfig
from .statistics import InputNormEMA

STATE_FILE = "prilora_pruner.safetensors"


@dataclass
class PruneSite:
    """One adapted module: its LoRA matrices and the one that is pruned."""

    name: str  # module path in the base model
    layer: int
    lora_A: nn.Parameter  # (r, d_in)
    lora_B: nn.Parameter  # (d_out, r)
    matrix: str  # "A" or "B"
    stats_module: nn.Module  # whose input feeds the pruned matrix

    @property
    def weight(self) -> nn.Parameter:
        return self.lora_A if self.matrix == "A" else self.lora_B


def importance_scores(
    weight: torch.Tensor,
    criterion: str,
    norms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Score of each weight; the lowest are pruned. ``norms`` has one entry per input feature (column)."""
    if criterion == "importance":
        return weight.detach().abs().float() * norms.unsqueeze(0)
    if criterion == "magnitude":
        return weight.detach().abs().float()
    if criterion == "random":
        return torch.rand(weight.shape, generator=generator, device=weight.device)
    raise ValueError(f"no scores for prune criterion {criterion!r}")


def world_size() -> int:
    """Processes of the default torch.distributed group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def keep_mask(scores: torch.Tensor, ratio: float, scope: str) -> torch.Tensor:
    """Boolean mask that drops exactly ``int(ratio * n)`` lowest scores per row (or per matrix)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if scope == "row":
        k = int(ratio * scores.shape[1])
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    else:
        k = int(ratio * scores.numel())
        if k:
            mask.view(-1)[scores.flatten().topk(k, largest=False).indices] = False
    return mask


class PriLoraPruner:
    """Keeps the input statistics and prunes at the configured optimizer steps.

    Call :meth:`step` right after every ``optimizer.step()`` (``PriLoraCallback`` does it for
    the Trainer). It counts optimizer steps, not forward passes.
    """

    def __init__(self, sites: list[PruneSite], config: PriLoraConfig, total_steps: int | None = None):
        if not sites:
            raise ValueError("PriLoraPruner needs at least one adapted module")
        self.sites = sites
        self.config = config
        self.total_steps = total_steps if total_steps is not None else config.total_steps
        self.global_step = 0
        self.events = 0
        self.history: list[list[float]] = []  # [optimizer step, zeros before the event, zeros after] per event
        self._masks: dict[str, torch.Tensor] = {}  # held after the last event
        self._window: tuple | None = None  # (total_steps, (start, end)) cache
        self._generator: torch.Generator | None = None  # for the "random" criterion, made on first use
        self.stats = InputNormEMA(config.ema_beta, self._collecting)
        if config.needs_input_norms:
            for site in sites:
                self.stats.track(site.name, site.stats_module, site.weight.shape[1], site.weight.device)

    # --- schedule -------------------------------------------------------------------------
    def set_total_steps(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if self.total_steps is not None and self.total_steps != total_steps:
            warnings.warn(
                f"PRILoRA total_steps changes from {self.total_steps} to {total_steps} "
                "(the trainer's number of optimizer steps wins)",
                RuntimeWarning,
            )
        self.total_steps = total_steps

    def window(self) -> tuple[int, int]:
        """First and last pruning event, as 1-based optimizer steps."""
        if self._window is None or self._window[0] != self.total_steps:
            self._window = (self.total_steps, self.config.resolve_window(self.total_steps))
        return self._window[1]

    def is_event(self, step: int) -> bool:
        if not self.config.prunes:
            return False
        start, end = self.window()
        return start <= step <= end and step >= 1 and ((step - start) % self.config.prune_interval == 0 or step == end)

    def _collecting(self) -> bool:
        # Statistics only matter while events are still to come. (With a fractional window and
        # no total_steps yet, keep collecting: the first step() will ask for total_steps.)
        if self._masks:
            return False
        if self.total_steps is None and float in (type(self.config.prune_start), type(self.config.prune_end)):
            return True
        return self.global_step < self.window()[1]

    # --- the training-loop entry point ------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step: update the EMA, prune on event steps, hold the final mask."""
        self.global_step += 1
        if not self.config.prunes:
            return
        if self.stats.accs and not self._masks:
            if self.config.stats_sync == "step" and world_size() > 1:
                self.stats.all_reduce_accs()
            self.stats.update()
        if self._masks:
            self._apply_masks()
        elif self.is_event(self.global_step):
            self.prune(hold=self.global_step == self.window()[1])

    @torch.no_grad()
    def prune(self, hold: bool = False) -> None:
        """One pruning event on every adapted matrix; ``hold`` keeps its mask from now on."""
        cfg = self.config
        self._check_not_sharded()
        all_norms = self._event_norms() if cfg.needs_input_norms else {}
        before = self._zero_fraction()
        for site in self.sites:
            norms = all_norms.get(site.name)
            if norms is not None and norms.device != site.weight.device:
                norms = norms.to(site.weight.device)
            scores = importance_scores(site.weight, cfg.prune_criterion, norms, self._random(site.weight.device))
            mask = keep_mask(scores, cfg.prune_ratio, cfg.prune_scope)
            site.weight.masked_fill_(~mask, 0.0)
            if hold:
                self._masks[site.name] = mask
        self.events += 1
        # How much of the pruned matrix had regrown since the last event, and the sparsity now.
        self.history.append([self.global_step, before, self._zero_fraction()])

    def _zero_fraction(self) -> float:
        """Zeros over all pruned matrices. The counts add up on their own device and are read back
        once per device: a read per matrix would stall a GPU hundreds of times per event."""
        per_device: dict[torch.device, torch.Tensor] = {}
        for site in self.sites:
            count = (site.weight == 0).sum()
            total = per_device.get(count.device)
            per_device[count.device] = count if total is None else total + count
        zeros = sum(int(count) for count in per_device.values())
        return zeros / sum(site.weight.numel() for site in self.sites)

    def _event_norms(self) -> dict[str, torch.Tensor]:
        """The norms that decide this event, the same on every process: with stats_sync="event" the
        processes' norms are combined here as the root of their summed squares (one all-reduce; for
        steady per-step norms this is the norm over all processes' tokens); with "step" they already
        agree, since every step's sums were all-reduced."""
        self.stats.warn_if_skipped()
        norms = {name: self.stats.norms(name) for name in self.stats.emas}
        if self.config.stats_sync == "event" and world_size() > 1:
            import torch.distributed as dist

            names = list(norms)
            flat = torch.cat([norms[n].square() for n in names])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            norms = dict(zip(names, flat.sqrt_().split([norms[n].numel() for n in names])))
        return norms

    def _check_not_sharded(self) -> None:
        """ZeRO-3 and FSDP keep only a shard of each matrix on a process: pruning it would rank a
        fragment. Refuse instead of pruning wrongly."""
        for site in self.sites:
            w = site.weight
            if hasattr(w, "ds_numel") or w.dim() != 2 or w.numel() == 0 or type(w.data).__name__ == "DTensor":
                raise RuntimeError(
                    f"PRILoRA cannot prune {site.name!r}: its {site.matrix} matrix is sharded across processes "
                    f"(DeepSpeed ZeRO stage 3 or FSDP); use DDP, or DeepSpeed ZeRO stage 1 or 2"
                )

    def replica_fingerprint(self) -> torch.Tensor:
        """A small float64 summary of every pruned matrix (sum, sum of squares, zeros): equal on all
        processes when the replicas agree."""
        rows = []
        for site in self.sites:
            w = site.weight.detach().double()
            rows.append(torch.stack([w.sum(), w.square().sum(), (w == 0).sum().double()]))
        return torch.stack(rows)

    def check_replicas(self) -> int:
        """Raise if the processes' pruned matrices differ; returns the number of processes compared."""
        n = world_size()
        if n == 1:
            return 1
        import torch.distributed as dist

        mine = self.replica_fingerprint().to(self.sites[0].weight.device)
        gathered = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(gathered, mine)
        differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differ:
            raise RuntimeError(f"PRILoRA replicas diverged: the adapters of processes {differ} differ from process 0's")
        return n

    def _random(self, device: torch.device) -> torch.Generator | None:
        """Generator of the "random" criterion, on the weights' device (made on first use)."""
        if self.config.prune_criterion != "random":
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.config.seed + self.events)
        return self._generator

    def _apply_masks(self) -> None:
        for site in self.sites:
            site.weight.masked_fill_(~self._masks[site.name], 0.0)

    def finalize(self) -> None:
        """At the end of training, make sure the adapter has the configured sparsity.

        Prunes once more (and holds) when the last event never came (training stopped before
        prune_end) or when the weights no longer follow the held mask (e.g. the Trainer loaded
        an earlier best checkpoint at the end).
        """
        if not self.config.prunes:
            return
        if not self._masks:
            reason = (
                f"training ended at optimizer step {self.global_step}, before the last pruning event "
                "(set total_steps/prune_end to the real length of training to avoid this)"
            )
        elif any(site.weight[~self._masks[site.name]].any() for site in self.sites):
            reason = "the weights at the end of training do not follow the final mask (an earlier checkpoint loaded?)"
        else:
            return
        warnings.warn(
            f"{reason}; pruning once more now so the adapter has the configured sparsity",
            RuntimeWarning,
        )
        with torch.no_grad():
            self.prune(hold=True)

    # --- reporting ----------------------------------------------------------------------------
    def sparsity(self) -> dict:
        """Fraction of exact zeros in A and B: overall, per layer and per module."""
        totals = {"A": [0, 0], "B": [0, 0]}
        per_layer: dict[int, dict[str, list[int]]] = {}
        per_module: dict[str, dict[str, float]] = {}
        for site in self.sites:
            layer = per_layer.setdefault(site.layer, {"A": [0, 0], "B": [0, 0]})
            per_module[site.name] = {}
            for key, w in (("A", site.lora_A), ("B", site.lora_B)):
                zeros, numel = int((w == 0).sum()), w.numel()
                per_module[site.name][key] = zeros / numel
                for bucket in (totals[key], layer[key]):
                    bucket[0] += zeros
                    bucket[1] += numel
        frac = lambda b: b[0] / b[1]  # noqa: E731
        return {
            "A": frac(totals["A"]),
            "B": frac(totals["B"]),
            "adapter": (totals["A"][0] + totals["B"][0]) / (totals["A"][1] + totals["B"][1]),
            "per_layer": {i: {k: frac(v) for k, v in d.items()} for i, d in sorted(per_layer.items())},
            "per_module": per_module,
        }

    def remove(self) -> None:
        """Detach the statistics hooks (the model behaves as plain PEFT LoRA afterwards)."""
        self.stats.remove()

    # --- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        tensors = dict(self.stats.state_dict())
        tensors.update({f"mask.{n}": m for n, m in self._masks.items()})
        if self._generator is not None:
            tensors["generator"] = self._generator.get_state()
        meta = {"global_step": self.global_step, "events": self.events, "ema_updates": self.stats.updates,
                "total_steps": self.total_steps, "history": self.history}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        tensors, meta = state["tensors"], state["meta"]
        if self.stats.accs:
            self.stats.load_state_dict(tensors, int(meta["ema_updates"]))
        names = {s.name for s in self.sites}
        masks = {k[len("mask."):]: v for k, v in tensors.items() if k.startswith("mask.")}
        if masks and set(masks) != names:
            raise ValueError("PRILoRA state holds masks for other modules: it was saved from a different model")
        for s in self.sites if masks else ():
            if masks[s.name].shape != s.weight.shape:
                raise ValueError(
                    f"PRILoRA state mask for {s.name!r} has shape {tuple(masks[s.name].shape)}, "
                    f"the model's {s.matrix} has {tuple(s.weight.shape)}: it was saved from a different model"
                )
        self._masks = {s.name: masks[s.name].to(s.weight.device) for s in self.sites} if masks else {}
        if "generator" in tensors:
            self._generator = torch.Generator(device=self.sites[0].weight.device)
            self._generator.set_state(tensors["generator"].cpu())
        self.global_step = int(meta["global_step"])
        self.events = int(meta["events"])
        self.history = [list(h) for h in meta.get("history", [])]
        if meta.get("total_steps") is not None and self.total_steps is None:
            self.total_steps = int(meta["total_steps"])

    def save(self, directory: str | os.PathLike) -> str:
        """Write the state into ``directory`` (a checkpoint folder); returns the file path."""
        state = self.state_dict()
        path = os.path.join(directory, STATE_FILE)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state["tensors"].items()}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"prilora": json.dumps(state["meta"])})
        os.replace(tmp, path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no PRILoRA pruner state at {path}: was the checkpoint written with PriLoraCallback?")
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["prilora"])
        self.load_state_dict({"tensors": load_file(path), "meta": meta})
