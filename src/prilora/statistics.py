"""Per-feature input norms of the adapted matrices, kept as an EMA over optimizer steps.

The importance of ``A[k, j]`` weighs its magnitude by how much signal input feature ``j``
carries (as in Wanda). The statistic of a step is the L2 norm of each input feature over all
tokens of all micro-batches of that optimizer step (the root of the summed squares of every
call); the EMA runs over steps, with bias correction. A step in which a module saw an inf/NaN
activation leaves that module's EMA as it was.

How it is computed is shaped by where users train: on a GPU a step can be bound by its number of
operations (docs/BENCHMARKS.md), and under ``torch.compile`` anything the tracer cannot follow
breaks the graph. So:

- **Eager, steady state: one operation per distinct input tensor** on a GPU (three on CPU, where
  they are faster than the one: ``CPU_SPLIT_REDUCTION``). The first collected step
  records which module reads which tensor (query, key and value read one; DeBERTa's shared
  relative embeddings feed every layer), and from then on each distinct input is reduced once,
  ``vector_norm(x, dims, dtype=float32, out=slot)``, straight into this step's row of a small ring
  of per-step norms; a module that reads an input already reduced costs nothing. If a step's calls
  stop following the record, the step is finished the general way and the record is made again.
- **Compiled**: the hook takes a branch with no Python state that changes between steps (so no
  guard fails and nothing recompiles): each module folds its norm into a fixed accumulator with
  ``hypot_`` (duplicate reductions of a shared input are merged by the compiler).
- **Per step**: nothing more in the steady state. The EMA is brought up to date from the ring in a
  handful of batched operations every few steps and before anything reads it (pruning events,
  checkpoints), with the same per-step recursion, skips included. Steps taken the general way
  (the first, compiled ones) update the EMA directly, in about a dozen operations.
- **No host reads**: the count of skipped steps stays on the device until someone asks.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle


# On CPU, vector_norm over the leading dims runs a slow strided loop: 121 ms against 28 ms for squaring,
# summing and taking the root of a 32 x 128 x 3072 input (2 threads; 16.7 against 2.6 ms at width 768), so
# there the statistics take those three operations. On a GPU one fused reduction is both fast and one
# launch, and the number of launches is what a small step there is bound by. Tests and benchmarks that
# count the operations a GPU runs set this to False.
CPU_SPLIT_REDUCTION = True


def feature_norms(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of each feature (last dim) over all other dims, in float32. On a GPU one operation
    (half-precision inputs accumulated in float32 without a float32 copy: fp16 squares overflow above
    256); on CPU a square, a sum and a root, a quarter of the time (see CPU_SPLIT_REDUCTION)."""
    dims = tuple(range(x.dim() - 1))
    if CPU_SPLIT_REDUCTION and x.device.type == "cpu":
        squares = (x if x.dtype == torch.float32 else x.float()).square()
        return torch.sum(squares, dims, out=out).sqrt_()
    if x.dtype == torch.float64:  # float32 would narrow it, which vector_norm refuses
        norm = torch.linalg.vector_norm(x, 2, dim=dims).float()
        return norm if out is None else out.copy_(norm)
    return torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32, out=out)


class InputNormEMA:
    """EMA of the L2 norm (over all tokens of a step) of each input feature of some modules."""

    RING_FLOATS = 1 << 22  # at most 16 MiB of per-step norms waiting to be folded

    def __init__(self, beta: float, should_collect: Callable[[], bool], capacity: int = 10):
        self.beta = beta
        self.capacity = max(1, int(capacity))  # steps the ring holds before it is folded into the EMA
        self._should_collect = should_collect
        self._names: list[str] = []
        self._offsets: list[int] = []  # start of each module's features in the flat (module-space) buffers
        self._widths: list[int] = []
        self._ema = self._acc = None  # (F,) float32: the EMA, and a step's norms taken the general way
        self._sizes = self._feature_module = None  # (M,) features per module, (F,) module of each feature
        self._finite_steps: torch.Tensor | None = None  # steps folded with every module finite (on the device)
        self._folded_steps = 0  # steps folded (skipped steps: the difference)
        self._ones: torch.Tensor | None = None  # (F,) ones
        self.updates = 0  # optimizer steps in the EMA (folded or pending), for bias correction
        self._handles: list[RemovableHandle] = []
        # The record of a step's calls (the "plan") and the ring of per-step norms of its distinct inputs.
        self._plan: list[tuple[int, int, bool]] | None = None  # per call: module, input slot, first use
        self._slot_offsets: list[int] = []  # start of each distinct input's features in a ring row
        self._plan_widths: list[int] = []  # and its width
        self._ring: torch.Tensor | None = None  # (capacity, features of all distinct inputs)
        self._to_modules: tuple[torch.Tensor, torch.Tensor | None] | None = None  # ring -> module features
        self._row = 0  # ring rows holding finished steps not folded yet
        self._call = 0  # calls so far in this step
        self._general = False  # this step is taken the general way (no plan yet, or it broke)
        self._seen: dict[tuple, tuple] = {}  # _key(x) -> weakref to its base, version, slot, norm (this step's inputs)
        self._calls: list[tuple[int, int]] = []  # (module, slot) per call of a step taken the general way
        self._slot_widths: list[int] = []

    # --- setup ---------------------------------------------------------------------------
    def track(self, name: str, module: nn.Module, num_features: int, device: torch.device) -> None:
        """Collect the norms of the features of ``module``'s input (``x``, first positional)."""
        if name in self._names:
            raise ValueError(f"PRILoRA already tracks the input of {name!r}")
        index, offset = len(self._names), sum(self._widths)
        self._names.append(name)
        self._offsets.append(offset)
        self._widths.append(num_features)
        device = device if self._ema is None else self._ema.device
        total = offset + num_features  # tracking happens once, at wrapping time: rebuild the buffers
        self._ema = torch.zeros(total, dtype=torch.float32, device=device)
        self._acc = torch.zeros(total, dtype=torch.float32, device=device)
        self._sizes = torch.tensor(self._widths, dtype=torch.int64, device=device)
        self._feature_module = torch.repeat_interleave(torch.arange(len(self._widths), device=device), self._sizes)
        self._finite_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._ones = torch.ones(total, dtype=torch.float32, device=device)
        self._plan = self._ring = self._to_modules = None

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not mod.training:
                return
            x = args[0] if args else kwargs.get("x")
            if not torch.is_tensor(x):
                raise TypeError(f"PRILoRA cannot read the input of {name!r}: expected a tensor as first argument or x=")
            if torch.compiler.is_compiling():
                # Collect unconditionally: a flag read here would be guarded on, and its change at the end
                # of the pruning window would recompile. Duplicate norms of a shared input are merged by
                # the compiler's common-subexpression elimination.
                if self._acc.device != x.device:  # decided while tracing: no guard fails later
                    raise RuntimeError(f"PRILoRA's statistics are on {self._acc.device}, the compiled model's input "
                                       f"on {x.device}: call pruner.to(device) after moving the model, before "
                                       "its first compiled forward")
                with torch.no_grad():
                    self._acc[offset:offset + num_features].hypot_(feature_norms(x))
                return
            if self._should_collect():
                self._record(index, x)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    @property
    def tracking(self) -> bool:
        return bool(self._names)

    def to(self, device: torch.device) -> None:
        """Move the statistics to ``device`` (they follow the model's inputs)."""
        for attr in ("_ema", "_acc", "_sizes", "_feature_module", "_finite_steps", "_ones", "_ring"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, value.to(device))
        if self._to_modules is not None:
            self._to_modules = tuple(t if t is None else t.to(device) for t in self._to_modules)

    # --- the forward pass (eager) ------------------------------------------------------
    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        """The same data: the same base tensor seen through the same view, unchanged since (DeBERTa slices
        its relative embeddings anew for each module that reads them)."""
        base = x if x._base is None else x._base
        return id(base), x.storage_offset(), x.shape, x.stride()

    def _lookup(self, x: torch.Tensor):
        seen = self._seen.get(self._key(x))
        base = x if x._base is None else x._base
        if seen is not None and seen[0]() is base and seen[1] == x._version:
            return seen
        return None

    def _remember(self, x: torch.Tensor, slot: int, norm: torch.Tensor | None):
        seen = (weakref.ref(x if x._base is None else x._base), x._version, slot, norm)
        self._seen[self._key(x)] = seen
        return seen

    @torch.no_grad()
    def _record(self, index: int, x: torch.Tensor) -> None:
        if self._ema.device != x.device:  # the model was moved (e.g. by the Trainer) after get_prilora_model
            self.to(x.device)
        call, self._call = self._call, self._call + 1
        if not self._general:
            if call < len(self._plan or ()) and self._plan[call][0] == index:
                _, slot, first = self._plan[call]
                seen = self._lookup(x)
                if first and seen is None:  # a new input: its norm goes straight into the ring
                    start = self._slot_offsets[slot]
                    feature_norms(x, out=self._ring[self._ring_row(), start:start + self._plan_widths[slot]])
                    self._remember(x, slot, None)
                    return
                if not first and seen is not None and seen[2] == slot:  # an input reduced before: free
                    return
            self._leave_plan(call)
        # The general way: every call adds its input's norm into its module's accumulator.
        seen = self._lookup(x)  # (this step's inputs so far, all reduced the general way: _leave_plan forgot the rest)
        if seen is None:
            seen = self._remember(x, len(self._slot_widths), feature_norms(x))
            self._slot_widths.append(x.shape[-1])
        self._calls.append((index, seen[2]))
        start, width = self._offsets[index], self._widths[index]
        self._acc[start:start + width].hypot_(seen[3])

    def _leave_plan(self, call: int) -> None:
        """This step's calls stopped following the plan (or there is none): finish the step the general
        way, with the norms the plan already put in the ring moved to the modules' accumulator."""
        self._general = True
        if self._plan is not None and call > 0:
            row = self._ring_row()
            self._acc.hypot_(self._module_norms(self._ring[row:row + 1])[0])
            self._ring[row].zero_()
        self._plan, self._seen, self._calls, self._slot_widths = None, {}, [], []

    def _make_plan(self) -> None:
        """From a step taken the general way: which call reads which distinct input, the ring's layout
        and how ring features map to module features. Made once; remade only if the calls change."""
        self._fold()
        if not self._calls or len(self._calls) != self._call:
            return  # a step that left the plan part-way records only part of its calls: record the next
        first_use, plan = set(), []
        for module, slot in self._calls:
            plan.append((module, slot, slot not in first_use))
            first_use.add(slot)
        widths = self._plan_widths = list(self._slot_widths)
        self._slot_offsets = [sum(widths[:i]) for i in range(len(widths))]
        device = self._ema.device
        rows = max(1, min(self.capacity, self.RING_FLOATS // max(1, sum(widths))))
        self._ring = torch.zeros(rows, sum(widths), dtype=torch.float32, device=device)
        # Ring feature of each (module feature, call) pair; one call per module is a plain gather.
        source, target = [], []
        for module, slot in self._calls:
            source.append(torch.arange(self._slot_offsets[slot], self._slot_offsets[slot] + self._widths[module]))
            target.append(torch.arange(self._offsets[module], self._offsets[module] + self._widths[module]))
        source, target = torch.cat(source), torch.cat(target)
        once = sorted(module for module, _ in self._calls) == list(range(len(self._names)))
        if once:
            order = target.argsort()
            self._to_modules = (source[order].to(device), None)
        else:
            self._to_modules = (source.to(device), target.to(device))
        self._plan = plan

    def _module_norms(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-step norms of the distinct inputs (steps, ring features) as per-module norms (steps, F)."""
        source, target = self._to_modules
        gathered = rows.index_select(1, source)
        if target is None:  # every module read one input a step: its norms as they are
            return gathered
        summed = torch.zeros(rows.shape[0], self._ema.numel(), dtype=rows.dtype, device=rows.device)
        return summed.index_add_(1, target, gathered.square_()).sqrt_()

    # --- the optimizer step --------------------------------------------------------------
    @torch.no_grad()
    def update(self, all_reduce_group=False) -> None:
        """Close this optimizer step: its norms become a row of the ring (folded into the EMA when full),
        or, for a step taken the general way, go into the EMA directly.

        ``all_reduce_group``: False, or a process group (None: the default one) whose processes' norms
        are combined into this step's (the root of their summed squares)."""
        planned = self._plan is not None and not self._general and self._call > 0
        if planned and all_reduce_group is not False:  # combined across processes in module space, as every
            # process's step is, planned or not: their collectives must have the same size
            row = self._ring_row()
            self._acc.hypot_(self._module_norms(self._ring[row:row + 1])[0])
            self._ring[row].zero_()
            planned = False
        if planned:
            self._row += 1
            if self._row == self._ring.shape[0]:
                self._fold()
        else:  # compiled forwards, the first step, a step that left the plan: straight into the EMA
            if all_reduce_group is not False:
                self._all_reduce(self._acc, all_reduce_group)
            self._fold()
            self._step_ema(self._acc[None])
            self._acc.zero_()
            if self._general:
                self._make_plan()
        self._call, self._general, self._seen, self._calls, self._slot_widths = 0, self._plan is None, {}, [], []
        self.updates += 1

    @staticmethod
    def _all_reduce(norms: torch.Tensor, group) -> None:
        import torch.distributed as dist

        squares = norms.square()
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
        torch.sqrt(squares, out=norms)

    def _ring_row(self) -> int:
        """The ring's row of this step: rows fill from the end, so the newest finished step comes first."""
        return self._ring.shape[0] - 1 - self._row

    @torch.no_grad()
    def _fold(self) -> None:
        """Bring the EMA up to date with the finished steps in the ring."""
        if self._row:
            rows = self._ring[self._ring.shape[0] - self._row:]
            self._step_ema(self._module_norms(rows))
            rows.zero_()
            self._row = 0

    def _step_ema(self, norms: torch.Tensor) -> None:
        """The per-step recursion ``ema = beta * ema + (1 - beta) * norm`` over ``norms`` (steps, F), newest
        step first, at once; a module skips a step whose norms are not finite."""
        steps = norms.shape[0]
        lengths = self._sizes.expand(steps, -1)
        finite = torch.isfinite(torch.segment_reduce(norms, "sum", lengths=lengths, axis=1))  # (steps, modules)
        ok = finite.index_select(1, self._feature_module)  # (steps, features)
        self._finite_steps.add_(finite.all(1).sum())
        self._folded_steps += steps
        if steps == 1:  # a step taken the general way: the recursion itself
            self._ema.copy_(torch.where(ok[0], torch.lerp(self._ema, norms[0], 1.0 - self.beta), self._ema))
            return
        decay = torch.where(ok, self.beta, 1.0).cumprod(0)  # row i: the decay of the i + 1 newest steps
        newer = torch.cat([self._ones[None], decay[:-1]])  # row i: of the steps newer than it
        self._ema.mul_(decay[-1]).add_((torch.where(ok, norms, 0.0) * newer).sum(0), alpha=1.0 - self.beta)

    # --- reading -------------------------------------------------------------------------
    @property
    def emas(self) -> dict[str, torch.Tensor]:
        """Each module's EMA (views of one flat buffer), up to date with every finished step."""
        self._fold()
        return dict(zip(self._names, self._ema.split(self._widths))) if self._names else {}

    @property
    def accs(self) -> dict[str, torch.Tensor]:
        """Norms of this step taken the general way so far (views; zero between steps)."""
        return dict(zip(self._names, self._acc.split(self._widths))) if self._names else {}

    def flat_norms(self, corrected: bool = True) -> torch.Tensor:
        """Bias-corrected EMA of all modules, in tracking order (the zero start would otherwise shrink early
        values); ``corrected=False``: the EMA itself (a view)."""
        self._fold()
        if not corrected:
            return self._ema
        if self.updates == 0:
            return self._ema.clone()
        return self._ema / (1.0 - self.beta**self.updates)

    def norms(self, name: str) -> torch.Tensor:
        """Bias-corrected EMA of one module."""
        index = self._names.index(name)
        return self.flat_norms()[self._offsets[index]:self._offsets[index] + self._widths[index]]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat per-feature tensor as one view per module."""
        return dict(zip(self._names, flat.split(self._widths)))

    def skipped_steps(self) -> int:
        """Optimizer steps left out of the EMA as non-finite so far (a host read: call it when reporting)."""
        self._fold()
        return self._folded_steps - int(self._finite_steps) if self._finite_steps is not None else 0

    def warn_if_skipped(self) -> None:
        """Called where the host reads anyway (checkpoints, the end of training), never per step."""
        skipped = self.skipped_steps()
        if skipped:
            warnings.warn(
                f"PRILoRA skipped the input norms of {skipped} optimizer step(s) with inf/NaN "
                "activations; the EMA of those modules kept its previous values",
                RuntimeWarning,
            )
            self._finite_steps.fill_(self._folded_steps)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen = {}

    # --- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        # Copies: views of one buffer share its storage, which safetensors refuses to save.
        state = {f"ema.{n}": t.clone() for n, t in self.emas.items()}
        state.update({f"acc.{n}": t.clone() for n, t in self.accs.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        if self._ring is not None:
            self._ring.zero_()
        self._row = self._call = 0
        emas, accs = self.emas, self.accs
        for name in self._names:
            for prefix, store in (("ema", emas), ("acc", accs)):
                key = f"{prefix}.{name}"
                if key not in state:
                    raise ValueError(f"PRILoRA state has no {key!r}: it was saved from a different model")
                if state[key].shape != store[name].shape:
                    raise ValueError(
                        f"PRILoRA state {key!r} has shape {tuple(state[key].shape)}, expected {tuple(store[name].shape)}"
                    )
                store[name].copy_(state[key])
        self.updates = updates
