from fractions import Fraction

import pytest

from prilora import rank_schedule


def test_linear_matches_paper_for_12_layers():
    assert rank_schedule("linear", num_layers=12, r_start=4, r_end=12) == [4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12]


def test_linear_minilm_6_layers():
    assert rank_schedule("linear", num_layers=6, r_start=4, r_end=12) == [4, 6, 7, 9, 10, 12]


@pytest.mark.parametrize("layers,r0,r1", [(12, 4, 12), (6, 4, 12), (7, 3, 11), (24, 2, 30), (5, 12, 4), (3, 4, 5)])
def test_linear_is_rounded_interpolation(layers, r0, r1):
    # Independent computation: exact rational interpolation, halves rounded up.
    expected = []
    for i in range(layers):
        x = Fraction(r0) + Fraction(r1 - r0) * Fraction(i, layers - 1)
        lo = x.numerator // x.denominator
        expected.append(lo + 1 if x - lo >= Fraction(1, 2) else lo)
    assert rank_schedule("linear", layers, r0, r1) == expected


def test_half_rounds_up_not_to_even():
    # 4 -> 5 over 3 layers has 4.5 in the middle; Python's round() would give 4.
    assert rank_schedule("linear", 3, 4, 5) == [4, 5, 5]


@pytest.mark.parametrize("layers", [1, 2, 5, 6, 7, 12, 13, 24])
def test_all_schedules_share_the_linear_budget(layers):
    total = sum(rank_schedule("linear", layers, 4, 12))
    for kind in ("uniform", "inverted", "concentrated"):
        ranks = rank_schedule(kind, layers, 4, 12)
        assert len(ranks) == layers
        assert sum(ranks) == total, kind


def test_uniform_inverted_concentrated_shapes():
    assert rank_schedule("uniform", 12, 4, 12) == [8] * 12
    assert rank_schedule("inverted", 6, 4, 12) == [12, 10, 9, 7, 6, 4]
    assert rank_schedule("concentrated", 6, 4, 12) == [0, 0, 0, 16, 16, 16]
    assert rank_schedule("concentrated", 12, 4, 12) == [0] * 6 + [16] * 6


def test_uniform_with_uneven_budget_differs_by_at_most_one():
    # 7 layers 4->12: linear sums to 56 -> exactly 8; 5 layers 4->11 sums to 38 -> 7/8 mix.
    ranks = rank_schedule("uniform", 5, 4, 11)
    assert sum(ranks) == sum(rank_schedule("linear", 5, 4, 11)) == 38
    assert max(ranks) - min(ranks) == 1


def test_explicit_list():
    assert rank_schedule([1, 2, 0, 3], num_layers=4) == [1, 2, 0, 3]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kind="linear", num_layers=6, r_start=0, r_end=12), "r_start must be at least 1"),
        (dict(kind="linear", num_layers=6, r_start=4, r_end=-1), "r_end must be at least 1"),
        (dict(kind="linear", num_layers=6, r_start=4.5, r_end=12), "r_start must be an integer rank"),
        (dict(kind="zigzag", num_layers=6), "unknown rank schedule 'zigzag'"),
        (dict(kind=[4, 5], num_layers=6), "lists 2 ranks but the model has 6 layers"),
        (dict(kind=[4, 5.5], num_layers=2), "rank of layer 1 must be an integer"),
        (dict(kind=[4, -1], num_layers=2), "rank of layer 1 must be >= 0"),
        (dict(kind=[0, 0], num_layers=2), "every layer rank 0"),
        (dict(kind="linear", num_layers=0), "num_layers must be a positive integer"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        rank_schedule(**kwargs)
