"""Per-layer LoRA rank schedules.

PRILoRA gives deeper layers more rank (they carry the task semantics) while keeping the
total rank, and so the parameter budget, equal to plain LoRA. Every non-linear schedule
here is defined by its relation to the linear one so that ablations compare equal budgets.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence, Union

ScheduleSpec = Union[str, Sequence[int]]

SCHEDULES = ("linear", "uniform", "inverted", "concentrated")


def is_int(value) -> bool:
    """An int that is not a bool (True would otherwise pass as rank 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _round_half_up(x: Fraction) -> int:
    # Python's round() rounds half to even; a schedule must not depend on that quirk.
    return int((x + Fraction(1, 2)).__floor__())


def _spread(total: int, num_layers: int) -> list[int]:
    """Split `total` into `num_layers` integers differing by at most one.

    The extra units go to evenly spaced layers, biased to the top of the stack, so a
    budget that does not divide evenly is still matched exactly.
    """
    base, extra = divmod(total, num_layers)
    ranks = [base] * num_layers
    for k in range(extra):
        # k-th extra unit, counted from the top layer downwards at an even stride.
        ranks[num_layers - 1 - (k * num_layers) // extra] += 1
    return ranks


def linear_ranks(num_layers: int, r_start: int, r_end: int) -> list[int]:
    """`round(r_start + (r_end - r_start) * i / (L - 1))`, halves rounded up (exact arithmetic)."""
    if num_layers == 1:
        return [_round_half_up(Fraction(r_start + r_end, 2))]
    return [
        _round_half_up(r_start + Fraction((r_end - r_start) * i, num_layers - 1))
        for i in range(num_layers)
    ]


def rank_schedule(
    kind: ScheduleSpec,
    num_layers: int,
    r_start: int = 4,
    r_end: int = 12,
) -> list[int]:
    """Rank of each layer (0-based, bottom to top).

    - ``linear``: the paper's schedule, ``r_start`` at the first layer to ``r_end`` at the last.
    - ``uniform``: every layer the mean rank of the linear schedule (plain LoRA at the same
      budget); where the mean is not an integer, ranks differ by one so the total still matches.
    - ``inverted``: the linear schedule reversed (``r_end`` down to ``r_start``).
    - ``concentrated``: the linear schedule's total rank placed evenly on the top half of the
      layers (``ceil(L/2)`` layers); the bottom layers get rank 0, i.e. are not adapted.
    - a sequence of ints: taken as is (0 means the layer is not adapted).

    >>> rank_schedule("linear", num_layers=12, r_start=4, r_end=12)
    [4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12]
    """
    if not is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if not isinstance(kind, str):
        return _explicit_ranks(kind, num_layers)
    for name, value in (("r_start", r_start), ("r_end", r_end)):
        if not is_int(value):
            raise ValueError(f"{name} must be an integer rank, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    linear = linear_ranks(num_layers, r_start, r_end)
    if kind == "linear":
        return linear
    if kind == "uniform":
        return _spread(sum(linear), num_layers)
    if kind == "inverted":
        return linear[::-1]
    if kind == "concentrated":
        top = (num_layers + 1) // 2
        return [0] * (num_layers - top) + _spread(sum(linear), top)
    raise ValueError(
        f"unknown rank schedule {kind!r}: use one of {', '.join(SCHEDULES)} or a list of per-layer ranks"
    )


def _explicit_ranks(ranks: Sequence[int], num_layers: int) -> list[int]:
    try:
        values = list(ranks)
    except TypeError:
        raise ValueError(f"rank schedule must be a name or a list of ints, got {ranks!r}") from None
    if len(values) != num_layers:
        raise ValueError(f"rank schedule lists {len(values)} ranks but the model has {num_layers} layers")
    for i, r in enumerate(values):
        if not is_int(r):
            raise ValueError(f"rank of layer {i} must be an integer, got {r!r}")
        if r < 0:
            raise ValueError(f"rank of layer {i} must be >= 0, got {r}")
    if not any(values):
        raise ValueError("rank schedule gives every layer rank 0: nothing would be adapted")
    return values
