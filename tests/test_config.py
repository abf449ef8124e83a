"""Every bad input named in the spec fails early with a message that says what to change."""

import pytest

from prilora import PriLoraConfig


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r_start=0), "r_start must be at least 1, got 0"),
        (dict(r_end=-3), "r_end must be at least 1, got -3"),
        (dict(r_start=4.5), "r_start must be an integer rank, got 4.5"),
        (dict(r_end="12"), "r_end must be an integer rank, got '12'"),
        (dict(rank_schedule=[4, 5.5]), "rank_schedule entries must be integers >= 0, got 5.5"),
        (dict(rank_schedule="zigzag"), "unknown rank schedule 'zigzag': use one of linear, uniform, inverted, concentrated"),
        (dict(prune_ratio=1.0), r"prune_ratio must be in \[0, 1\), got 1.0"),
        (dict(prune_ratio=-0.1), r"prune_ratio must be in \[0, 1\), got -0.1"),
        (dict(prune_ratio=float("nan")), r"prune_ratio must be in \[0, 1\), got nan"),
        (dict(ema_beta=1.0), r"ema_beta must be in \[0, 1\), got 1.0"),
        (dict(ema_beta=-0.5), r"ema_beta must be in \[0, 1\), got -0.5"),
        (dict(prune_start=50, prune_end=10), r"prune_start \(50\) is after prune_end \(10\)"),
        (dict(prune_start=0.8, prune_end=0.5), r"prune_start \(0.8\) is after prune_end \(0.5\)"),
        (dict(prune_start=90, prune_end=0.5, total_steps=100), "prune_start resolves to step 90, after prune_end at step 50"),
        (dict(prune_end=0, prune_start=0), "prune_end resolves to optimizer step 0: no pruning event could happen"),
        (dict(prune_end=0.01, total_steps=10), "prune_end resolves to optimizer step 0"),
        (dict(prune_end=1.5), r"prune_end as a fraction of training must be in \[0, 1\], got 1.5"),
        (dict(prune_start=-1), "prune_start must be a step >= 0, got -1"),
        (dict(prune_interval=0), "prune_interval must be a positive integer of optimizer steps, got 0"),
        (dict(prune_scope="column"), "prune_scope must be one of row, matrix, got 'column'"),
        (dict(prune_criterion="wanda"), "prune_criterion must be one of importance, magnitude, random, none, got 'wanda'"),
        (dict(prune_matrix="C"), "prune_matrix must be one of A, B, got 'C'"),
        (dict(alpha_policy="rslora"), "alpha_policy must be one of constant_scaling, constant_alpha"),
        (dict(total_steps=0), "total_steps must be a positive integer, got 0"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(lora_kwargs={"r": 8}), "lora_kwargs sets 'r', which PriLoraConfig controls"),
        (dict(lora_kwargs={"use_rslora": True}), "lora_kwargs sets 'use_rslora', which PriLoraConfig controls"),
        (dict(lora_kwargs={"rank": 8}), "lora_kwargs has 'rank', which is not a field of peft.LoraConfig"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(layer_pattern="["),
         r"layer_pattern '\[' is not a valid regex \(unterminated character set at position 0\)"),
        (dict(layer_pattern=r"layers\.\d+"),
         r"layer_pattern 'layers\\\\.\\\\d\+' must have a capture group for the layer index"),
        (dict(layer_pattern=3), "layer_pattern must be a regex string, got 3"),
        (dict(target_modules="[q"), r"target_modules '\[q' is not a valid regex \(unterminated character set"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32 - 1\], got -1"),
        (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32 - 1\], got 4294967296"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PriLoraConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = PriLoraConfig(rank_schedule=[1, 2, 3], prune_end=200, target_modules=["q"], lora_kwargs={"init_lora_weights": False})
    assert PriLoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown PriLoraConfig fields \['bogus'\]"):
        PriLoraConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_window_resolution():
    cfg = PriLoraConfig(prune_start=0.1, prune_end=0.9)
    assert cfg.resolve_window(1000) == (100, 900)
    assert PriLoraConfig(prune_start=5, prune_end=1.0).resolve_window(40) == (5, 40)
    assert PriLoraConfig(prune_end=0.9).resolve_window(25) == (0, 23)  # 22.5 rounds half up
    assert PriLoraConfig(prune_end=0, prune_criterion="none").resolve_window(10) == (0, 0)
