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
    """One adapted module: its LoRA matrices and the one that is pruned.

    It holds the LoRA linear layers, not their weights: FSDP2's ``fully_shard`` replaces each parameter
    with a sharded one after the pruner is built, and the weights are read through the layers."""

    name: str  # module path in the base model
    layer: int
    A: nn.Module  # the LoRA A layer; weight (r, d_in)
    B: nn.Module  # the LoRA B layer; weight (d_out, r)
    matrix: str  # "A" or "B"
    stats_module: nn.Module  # whose input feeds the pruned matrix

    @property
    def lora_A(self) -> nn.Parameter:
        return self.A.weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.B.weight

    @property
    def weight(self) -> nn.Parameter:
        return self.lora_A if self.matrix == "A" else self.lora_B

    @property
    def sharded(self) -> bool:
        """Whether the pruned matrix is split across processes by rows (FSDP2: a DTensor on Shard(0))."""
        return is_dtensor(self.weight)

    def rows(self) -> torch.Tensor:
        """The rows of the pruned matrix that this process holds, as a plain tensor that writes through to
        the parameter: all of them, or under FSDP2 this process's shard (each row whole, so a per-row
        ranking needs nothing from other processes). Call under ``torch.no_grad()``."""
        return local_part(self.weight)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (FSDP2's shard), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def row_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor split by rows over a one-dimensional device mesh, as FSDP2 shards a 2-D parameter."""
    from torch.distributed.tensor import Shard

    placements = tuple(tensor.placements)
    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0


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

    Cost, by design (docs/BENCHMARKS.md): a step adds no tensor operation beyond the forward
    statistics; an event scores, ranks and masks all matrices of one input width together, so its
    operations do not grow with the number of adapted matrices; and nothing is read back to the host
    (the history and the skip count stay on the device until someone asks).
    """

    def __init__(self, sites: list[PruneSite], config: PriLoraConfig, total_steps: int | None = None):
        if not sites:
            raise ValueError("PriLoraPruner needs at least one adapted module")
        self.sites = sites
        self.config = config
        self.total_steps = total_steps if total_steps is not None else config.total_steps
        self.global_step = 0
        self.events = 0
        self._history: list[list] = []  # [optimizer step, nonzeros before the event, after]: device counts
        self._masks: dict[str, torch.Tensor] = {}  # held after the last event
        self._held: list[tuple[list[nn.Parameter], torch.Tensor]] | None = None  # masks batched by group
        self._row_indices: dict[tuple, torch.Tensor] = {}  # per group and device: see _row_index
        self._window: tuple | None = None  # (total_steps, (start, end)) cache
        self._generator: torch.Generator | None = None  # for the "random" criterion, made on first use
        self.stats = InputNormEMA(config.ema_beta, self._collecting, capacity=min(config.prune_interval, 16))
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

    def to(self, device: torch.device | str) -> "PriLoraPruner":
        """Move the statistics to ``device``. Eager training moves them by itself on the first forward; a
        compiled model needs them there before its first forward (PriLoraCallback does it)."""
        self.stats.to(torch.device(device))
        return self

    # --- the training-loop entry point ------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step: update the EMA, prune on event steps, hold the final mask."""
        self.global_step += 1
        if not self.config.prunes:
            return
        if self.stats.tracking and not self._masks:
            sync = self.config.stats_sync == "step" and world_size() > 1
            self.stats.update(all_reduce_group=None if sync else False)
        if self._masks:
            self._apply_masks()
        elif self.is_event(self.global_step):
            self.prune(hold=self.global_step == self.window()[1])

    @property
    def history(self) -> list[list[float]]:
        """[optimizer step, fraction of the pruned matrices at zero before the event, after it] per event
        (read from the device here, not during training)."""
        numel = sum(site.rows().numel() for site in self.sites)  # this process's rows (all, but under FSDP2)

        def fraction(zeros):  # a float (a loaded history) or the nonzero counts of an event's groups
            return zeros if not isinstance(zeros, list) else 1.0 - sum(int(n) for n in zeros) / numel

        return [[step, fraction(before), fraction(after)] for step, before, after in self._history]

    @history.setter
    def history(self, value: list[list[float]]) -> None:
        self._history = [list(h) for h in value]

    @torch.no_grad()
    def prune(self, hold: bool = False) -> None:
        """One pruning event on every adapted matrix; ``hold`` keeps its mask from now on."""
        cfg = self.config
        self._check_shards()
        flat = self._event_norms() if cfg.needs_input_norms else None
        norms = self.stats.split(flat) if flat is not None else {}
        batched = cfg.prune_scope == "row" and cfg.prune_criterion in ("importance", "magnitude")
        before, after = [], []  # nonzeros per group, on the device: summed when the history is read
        for sites in self._groups():
            weights = [site.rows() for site in sites]
            rows = [w.shape[0] for w in weights]
            if batched:
                # All rows of all matrices of one input width at once: one score, one top-k, one write.
                stacked = torch.cat(weights)
                before.append(torch.count_nonzero(stacked))
                scores = stacked.abs().float()
                if cfg.prune_criterion == "importance":
                    # Row i multiplied by its module's norms: windows of the flat norms, one per row.
                    windows = flat.unfold(0, stacked.shape[1], 1)
                    scores.mul_(windows.index_select(0, self._row_index(sites, flat.device)))
                k = int(cfg.prune_ratio * stacked.shape[1])
                if k:
                    stacked.scatter_(1, scores.topk(k, dim=1, largest=False).indices, 0.0)
                torch._foreach_copy_(weights, list(stacked.split(rows)))
                after.append(torch.count_nonzero(stacked))
                if hold:  # the kept positions exactly (a kept weight may be zero too), once
                    masks = keep_mask(scores, cfg.prune_ratio, "row").split(rows)
            else:  # the ablations' criteria and scopes, one matrix at a time
                before += [torch.count_nonzero(w) for w in weights]
                masks = []
                for site, w in zip(sites, weights):
                    n = norms.get(site.name)
                    scores = importance_scores(w, cfg.prune_criterion, None if n is None else n.to(w.device),
                                               self._random(w.device))
                    masks.append(keep_mask(scores, cfg.prune_ratio, cfg.prune_scope))
                    w.masked_fill_(~masks[-1], 0.0)
                after += [torch.count_nonzero(w) for w in weights]
            if hold:
                self._masks.update({site.name: m for site, m in zip(sites, masks)})
        if hold:
            self._hold_masks()
        self.events += 1
        # How much of the pruned matrices had regrown since the last event, and the sparsity now.
        self._history.append([self.global_step, before, after])

    def _groups(self) -> list[list[PruneSite]]:
        """The sites whose pruned matrices are handled as one: same input width, dtype and device."""
        groups: dict[tuple, list[PruneSite]] = {}
        for site in self.sites:
            w = site.rows()
            groups.setdefault((w.shape[1], w.dtype, w.device), []).append(site)
        return list(groups.values())

    def _row_index(self, sites: list[PruneSite], device: torch.device) -> torch.Tensor:
        """Where each stacked row's module starts in the flat norms (its features follow contiguously);
        made once per group and device."""
        key = (tuple(s.name for s in sites), device)
        if key not in self._row_indices:
            starts = dict(zip(self.stats._names, self.stats._offsets))
            self._row_indices[key] = torch.tensor([starts[s.name] for s in sites for _ in range(s.rows().shape[0])],
                                                  device=device)
        return self._row_indices[key]

    def _event_norms(self) -> torch.Tensor:
        """The norms that decide this event, flat, the same on every process: with stats_sync="event" the
        processes' norms are combined here as the root of their summed squares (one all-reduce; for
        steady per-step norms this is the norm over all processes' tokens); with "step" they already
        agree, since every step's norms were combined."""
        # The EMA without its bias correction: one factor for all features, which changes no ranking
        # (in a row or a matrix, on every process alike).
        flat = self.stats.flat_norms(corrected=False)
        if self.config.stats_sync == "event" and world_size() > 1:
            import torch.distributed as dist

            flat = flat.square()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.sqrt_()
        return flat

    def _check_shards(self) -> None:
        """FSDP2 splits each matrix by rows, whole rows on each process: a ranking per row is exact there,
        one over a whole matrix is not (it would rank a fragment). ZeRO-3 and FSDP1 flatten the matrices
        into shards that cut through rows. Refuse what cannot be pruned exactly instead of pruning wrongly."""
        for site in self.sites:
            w = site.weight
            if is_dtensor(w):
                if not row_sharded(w):
                    raise RuntimeError(f"PRILoRA cannot prune {site.name!r}: its {site.matrix} matrix is a DTensor "
                                       f"placed as {tuple(w.placements)}; only FSDP2's row shards (Shard(0) on a "
                                       "one-dimensional mesh) keep its rows whole")
                if self.config.prune_scope != "row":
                    raise RuntimeError(f"PRILoRA under FSDP2 prunes per row of A: prune_scope={self.config.prune_scope!r} "
                                       "ranks a whole matrix that is sharded across processes; use prune_scope='row' "
                                       "(--prune-scope row)")
            elif hasattr(w, "ds_numel") or w.dim() != 2 or w.numel() == 0:
                raise RuntimeError(
                    f"PRILoRA cannot prune {site.name!r}: its {site.matrix} matrix is sharded across processes "
                    f"(DeepSpeed ZeRO stage 3 or FSDP1 flatten it); use FSDP2 (fully_shard), DDP, or DeepSpeed "
                    "ZeRO stage 1 or 2"
                )

    def replica_fingerprint(self) -> torch.Tensor:
        """A small float64 summary of every pruned matrix (sum, sum of squares, zeros): equal on all
        processes when the replicas agree."""
        rows = []
        for site in self.sites:
            if site.sharded:  # FSDP2: each process holds other rows by design; nothing to compare
                continue
            w = site.weight.detach().double()
            rows.append(torch.stack([w.sum(), w.square().sum(), (w == 0).sum().double()]))
        return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)

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

    def _hold_masks(self) -> None:
        """Batch the held masks by group (at the last event, or when a checkpoint's masks are loaded)."""
        self._held = []
        for sites in self._groups():
            pruned = torch.cat([~self._masks[site.name] for site in sites])
            self._held.append(([site.rows() for site in sites], pruned))

    def _apply_masks(self) -> None:
        """Re-apply the held masks: per group of matrices, one masked write and one copy back."""
        if self._held is None:
            self._hold_masks()
        for weights, pruned in self._held:
            stacked = torch.cat(weights)
            stacked.masked_fill_(pruned, 0.0)
            torch._foreach_copy_(weights, list(stacked.split([w.shape[0] for w in weights])))

    def finalize(self) -> None:
        """At the end of training, make sure the adapter has the configured sparsity.

        Prunes once more (and holds) when the last event never came (training stopped before
        prune_end) or when the weights no longer follow the held mask (e.g. the Trainer loaded
        an earlier best checkpoint at the end).
        """
        if not self.config.prunes:
            return
        self.stats.warn_if_skipped()  # the end of training reads from the device anyway
        if not self._masks:
            reason = (
                f"training ended at optimizer step {self.global_step}, before the last pruning event "
                "(set total_steps/prune_end to the real length of training to avoid this)"
            )
        elif any(site.rows()[~self._masks[site.name]].any() for site in self.sites):
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
        """Fraction of exact zeros in A and B: overall, per layer and per module. Under FSDP2 each process
        counts its shards and the counts are summed over processes (so every process must call it)."""
        matrices = [(site.lora_A, site.lora_B) for site in self.sites]
        zeros = [(local_part(w) == 0).sum() for pair in matrices for w in pair]
        zeros = torch.stack([z.to(zeros[0].device) for z in zeros])
        if world_size() > 1 and any(is_dtensor(w) for pair in matrices for w in pair):
            import torch.distributed as dist

            dist.all_reduce(zeros)
        zeros = zeros.view(len(self.sites), 2).tolist()  # one read from the device
        totals = {"A": [0, 0], "B": [0, 0]}
        per_layer: dict[int, dict[str, list[int]]] = {}
        per_module: dict[str, dict[str, float]] = {}
        for site, pair, site_zeros in zip(self.sites, matrices, zeros):
            layer = per_layer.setdefault(site.layer, {"A": [0, 0], "B": [0, 0]})
            per_module[site.name] = {}
            for key, w, n in zip(("A", "B"), pair, site_zeros):
                numel = w.numel()  # a DTensor's is the whole matrix's
                per_module[site.name][key] = n / numel
                for bucket in (totals[key], layer[key]):
                    bucket[0] += n
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
        self.stats.warn_if_skipped()  # a checkpoint reads from the device anyway
        tensors = dict(self.stats.state_dict())
        tensors.update({f"mask.{n}": m.clone() for n, m in self._masks.items()})  # copies: they may share storage
        if self._generator is not None:
            tensors["generator"] = self._generator.get_state()
        meta = {"global_step": self.global_step, "events": self.events, "ema_updates": self.stats.updates,
                "total_steps": self.total_steps, "history": self.history}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        tensors, meta = state["tensors"], state["meta"]
        if self.stats.tracking:
            self.stats.load_state_dict(tensors, int(meta["ema_updates"]))
        names = {s.name for s in self.sites}
        masks = {k[len("mask."):]: v for k, v in tensors.items() if k.startswith("mask.")}
        if masks and set(masks) != names:
            raise ValueError("PRILoRA state holds masks for other modules: it was saved from a different model")
        for s in self.sites if masks else ():
            if masks[s.name].shape != s.rows().shape:
                raise ValueError(
                    f"PRILoRA state mask for {s.name!r} has shape {tuple(masks[s.name].shape)}, "
                    f"the model's {s.matrix} has {tuple(s.rows().shape)}"
                    f"{' on this process' if s.sharded else ''}: it was saved from a different model"
                )
        self._masks = {s.name: masks[s.name].to(s.weight.device) for s in self.sites} if masks else {}
        self._held = None
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
