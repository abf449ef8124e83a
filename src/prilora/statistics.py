"""Per-feature input norms of the adapted matrices, kept as an EMA over optimizer steps.

The importance of ``A[k, j]`` weighs its magnitude by how much signal input feature ``j``
carries (as in Wanda). The hook adds one square-and-sum per adapted input (fp32 for
half-precision inputs) and no host sync; when several adapted modules read the same
tensor (query, key and value read the same hidden states) the reduction is done once
and shared.

Squared norms are summed over all micro-batches of an optimizer step and turned into a
norm only at the step, so gradient accumulation (and, later, a cross-process sum) sees
the same statistic as one large batch.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle


class InputNormEMA:
    """EMA of the L2 norm (over all tokens of a step) of each input feature of some modules."""

    def __init__(self, beta: float, should_collect: Callable[[], bool]):
        self.beta = beta
        self._should_collect = should_collect
        self.emas: dict[str, torch.Tensor] = {}
        self.accs: dict[str, torch.Tensor] = {}
        self.updates = 0  # optimizer steps folded into the EMA (for bias correction)
        self._handles: list[RemovableHandle] = []
        self._last_input: weakref.ref | None = None  # weak: a strong one kept the input alive (24 MiB on MiniLM)
        self._last_version = -1
        self._last_sq: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None  # steps dropped as non-finite, counted on device

    def track(self, name: str, module: nn.Module, num_features: int, device: torch.device) -> None:
        """Collect the norms of the features of ``module``'s input (``x``, first positional)."""
        self.emas[name] = torch.zeros(num_features, dtype=torch.float32, device=device)
        self.accs[name] = torch.zeros(num_features, dtype=torch.float32, device=device)
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not mod.training or not self._should_collect():
                return
            x = args[0] if args else kwargs.get("x")
            if not torch.is_tensor(x):
                raise TypeError(f"PRILoRA cannot read the input of {name!r}: expected a tensor as first argument or x=")
            acc = self.accs[name]
            if acc.device != x.device:  # the model was moved (e.g. by the Trainer) after get_prilora_model
                self.to(x.device)
                acc = self.accs[name]
            with torch.no_grad():
                acc.add_(self._squared_norms(x))

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def to(self, device: torch.device) -> None:
        """Move the statistics to ``device`` (they follow the model's inputs)."""
        for store in (self.emas, self.accs):
            for name in store:
                store[name] = store[name].to(device)
        self._skipped = self._skipped.to(device)

    def _squared_norms(self, x: torch.Tensor) -> torch.Tensor:
        # Identity plus version: a tensor modified in place since is not the same input.
        if self._last_input is not None and self._last_input() is x and self._last_version == x._version:
            return self._last_sq
        flat = x.reshape(-1, x.shape[-1])
        # A square-and-sum ran 6-10x faster than linalg.vector_norm over the token dims on CPU
        # (experiments/overhead_check.py --kernels). Half-precision inputs are squared in an fp32 copy:
        # fp16 squares overflow above 256.
        sq = flat.float().square_() if flat.dtype in (torch.float16, torch.bfloat16) else flat.square()
        self._last_input, self._last_version, self._last_sq = weakref.ref(x), x._version, sq.sum(0).float()
        return self._last_sq

    @torch.no_grad()
    def all_reduce_accs(self, group=None) -> None:
        """Sum this step's squared norms over all processes (one flat all-reduce)."""
        import torch.distributed as dist

        names = list(self.accs)
        flat = torch.cat([self.accs[n] for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for name, part in zip(names, flat.split([self.accs[n].numel() for n in names])):
            self.accs[name].copy_(part)

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step's sums into the EMA; a step with a non-finite value is skipped."""
        self._last_input = self._last_sq = None  # release the cached activation
        weight = 1.0 - self.beta
        bad = torch.zeros((), dtype=torch.bool, device=self._skipped.device)
        for name, acc in self.accs.items():
            ema = self.emas[name]
            finite = torch.isfinite(acc).all()
            ema.copy_(torch.where(finite, torch.lerp(ema, acc.sqrt(), weight), ema))
            bad |= ~finite
            acc.zero_()
        self._skipped.add_(bad.to(torch.int64))
        self.updates += 1

    def norms(self, name: str) -> torch.Tensor:
        """Bias-corrected EMA (the zero start would otherwise shrink early values)."""
        if self.updates == 0:
            return self.emas[name].clone()
        return self.emas[name] / (1.0 - self.beta**self.updates)

    def warn_if_skipped(self) -> None:
        """Called at pruning events, which sync anyway, so the check costs no extra sync."""
        if self._skipped is not None and int(self._skipped) > 0:
            warnings.warn(
                f"PRILoRA skipped the input norms of {int(self._skipped)} optimizer step(s) with inf/NaN "
                "activations; the EMA of those modules kept its previous values",
                RuntimeWarning,
            )
            self._skipped.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = self._last_sq = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{n}": t for n, t in self.emas.items()}
        state.update({f"acc.{n}": t for n, t in self.accs.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for name in self.emas:
            for prefix, store in (("ema", self.emas), ("acc", self.accs)):
                key = f"{prefix}.{name}"
                if key not in state:
                    raise ValueError(f"PRILoRA state has no {key!r}: it was saved from a different model")
                if state[key].shape != store[name].shape:
                    raise ValueError(
                        f"PRILoRA state {key!r} has shape {tuple(state[key].shape)}, expected {tuple(store[name].shape)}"
                    )
                store[name].copy_(state[key])
        self.updates = updates
