"""Per-feature input norms of the adapted matrices, kept as an EMA over optimizer steps.

The importance of ``A[k, j]`` weighs its magnitude by how much signal input feature ``j``
carries (as in Wanda). The hook adds one square-and-sum per adapted input (fp32 for
half-precision inputs) and no host sync; when several adapted modules read the same
tensor (query, key and value read the same hidden states) the reduction is done once
and shared.

Squared norms are summed over all micro-batches of an optimizer step and turned into a
norm only at the step, so gradient accumulation (and, later, a cross-process sum) sees
the same statistic as one large batch.

All modules' sums and EMAs live in two flat buffers (the per-module tensors are views of them),
so the per-step update is under twenty operations whatever the number of modules, not a dozen
per module: on a GPU a step can be bound by its number of operations (docs/BENCHMARKS.md, "On a GPU").
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
        self.emas: dict[str, torch.Tensor] = {}  # views of _ema, one per module
        self.accs: dict[str, torch.Tensor] = {}  # views of _acc
        self._ema: torch.Tensor | None = None
        self._acc: torch.Tensor | None = None
        self._sizes: torch.Tensor | None = None  # features per module, in the order of the buffers
        self.updates = 0  # optimizer steps folded into the EMA (for bias correction)
        self._handles: list[RemovableHandle] = []
        self._last_input: weakref.ref | None = None  # weak: a strong one kept the input alive (24 MiB on MiniLM)
        self._last_version = -1
        self._last_sq: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None  # steps dropped as non-finite, counted on device

    def track(self, name: str, module: nn.Module, num_features: int, device: torch.device) -> None:
        """Collect the norms of the features of ``module``'s input (``x``, first positional)."""
        if name in self.emas:
            raise ValueError(f"PRILoRA already tracks the input of {name!r}")
        if self._skipped is None:  # the first module: empty buffers on its device
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
            self._ema = self._acc = torch.zeros(0, dtype=torch.float32, device=device)
            self._sizes = torch.zeros(0, dtype=torch.int64, device=device)
        # Grow the buffers by one module (tracking happens once, at wrapping time).
        zeros = torch.zeros(num_features, dtype=torch.float32, device=self._ema.device)
        self._ema, self._acc = torch.cat([self._ema, zeros]), torch.cat([self._acc, zeros])
        self._sizes = torch.cat([self._sizes, torch.tensor([num_features], device=self._sizes.device)])
        self._split([*self.emas, name])

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

    def _split(self, names: list[str]) -> None:
        """Point the per-module tensors at their slices of the flat buffers (names in tracking order)."""
        sizes = self._sizes.tolist()
        self.emas = dict(zip(names, self._ema.split(sizes)))
        self.accs = dict(zip(names, self._acc.split(sizes)))

    def to(self, device: torch.device) -> None:
        """Move the statistics to ``device`` (they follow the model's inputs)."""
        self._ema, self._acc, self._sizes = self._ema.to(device), self._acc.to(device), self._sizes.to(device)
        self._skipped = self._skipped.to(device)
        self._split(list(self.emas))

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

        dist.all_reduce(self._acc, op=dist.ReduceOp.SUM, group=group)

    @torch.no_grad()
    def update(self) -> None:
        """Fold this step's sums into the EMA; a module with a non-finite sum keeps its EMA this step."""
        self._last_input = self._last_sq = None  # release the cached activation
        # The L1 norm of a module's sums is non-finite exactly when one of them is (they are sums of
        # squares, so no inf - inf); that verdict then covers all the module's features.
        finite = torch.isfinite(torch.stack(torch._foreach_norm(list(self.accs.values()), 1)))
        keep = torch.repeat_interleave(finite, self._sizes, output_size=self._acc.numel())
        self._ema.copy_(torch.where(keep, torch.lerp(self._ema, self._acc.sqrt(), 1.0 - self.beta), self._ema))
        self._skipped.add_((~finite).any().to(torch.int64))
        self._acc.zero_()
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
        # Copies: views of one buffer share its storage, which safetensors refuses to save.
        state = {f"ema.{n}": t.clone() for n, t in self.emas.items()}
        state.update({f"acc.{n}": t.clone() for n, t in self.accs.items()})
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
