"""`prilora bench` on a tiny model: the JSON it writes (no timing assertions)."""

import json

import pytest
import torch

from prilora.bench import build, format_result, load_base, make_batch
from prilora.cli import main


def test_bench_writes_every_measurement(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model_dir), "--batch-size", "4", "--seq-len", "16", "--steps", "2",
                 "--rounds", "2", "--warmup", "1", "--memory", "--event-sizes", "1e5", "--inference",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    methods = ["lora", "linear", "prilora", "prilora-every-step", "adalora"]
    assert list(r["step"]) == methods and list(r["ops"]) == methods
    ops = {m: v["ops_per_step"] for m, v in r["ops"].items()}
    assert ops["linear"] == ops["lora"]  # the same operations in other shapes
    # PRILoRA: one reduction per distinct input (4 a layer in BERT, 2 layers), and its fold and event
    # amortized over the 10 counted steps; an event every step costs more; no host read added.
    assert ops["lora"] + 8 < ops["prilora"] < ops["prilora-every-step"]
    assert {v["host_reads_per_step"] for m, v in r["ops"].items() if m != "adalora"} == {r["ops"]["lora"]["host_reads_per_step"]}
    for m in methods:
        s = r["step"][m]
        assert s["n"] == 4 and s["q25_ms"] <= s["median_ms"] <= s["q75_ms"]
        assert s["ratio_to_lora"] == pytest.approx(s["median_ms"] / r["step"]["lora"]["median_ms"])
        mem = r["memory"][m]
        assert mem["peak_rss_mb"] >= mem["rss_after_build_mb"] > 0 and mem["ratio_of"] == "tensor_peak_mb"
        assert mem["ratio_to_lora"] == pytest.approx(mem["tensor_peak_mb"] / r["memory"]["lora"]["tensor_peak_mb"])
        kinds = mem["tensor_peak_by_kind_mb"]
        assert sum(kinds.values()) == pytest.approx(mem["tensor_peak_mb"]) and kinds["activation"] > 0
        # AdamW's two moments per trainable weight plus a 4-byte step counter per trainable tensor, to the byte.
        model, _, _ = build(m, load_base(str(tiny_model_dir))[0], "SEQ_CLS", 10)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert round(kinds["optimizer_state"] * 2**20) == 2 * sum(4 * p.numel() for p in trainable) + 4 * len(trainable)
    # PRILoRA's memory over the same schedule unpruned: its statistics (an EMA, an accumulator, a ring of
    # 10 steps' norms and a module index per adapted input feature, a counter of skipped steps, the number
    # of features of each module) and at most one norm vector in flight; no activation kept alive.
    base, _, vocab = load_base(str(tiny_model_dir))
    model, _, after = build("prilora", base, "SEQ_CLS", 10)
    for _ in range(2):  # the first step records who reads what and lays out the ring
        model(**make_batch("SEQ_CLS", vocab, 4, 16, torch.device("cpu"))).loss.backward()
        after()
    s = after.__self__.stats
    stats = [s._ema, s._acc, s._ring, s._feature_module, s._finite_steps, s._sizes, s._ones,
             *(t for t in s._to_modules if t is not None)]
    # BERT: q, k and v read one tensor, so the ring holds 10 steps of every input but k's and v's
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    assert s._ring.shape == (10, s._ema.numel() - 2 * hidden * layers)
    extra = round((r["memory"]["prilora"]["tensor_peak_mb"] - r["memory"]["linear"]["tensor_peak_mb"]) * 2**20)
    # (The profiler's timeline sees only tensors that the profiled step touches: buffers read at folds and
    # events alone, and the ring rows not written in that step, may not show, hence no lower bound.)
    assert 0 < extra <= sum(t.numel() * t.element_size() for t in stats) + 4 * max(t.numel() for t in stats)
    assert r["step"]["adalora"]["ratio_to_prilora"] == pytest.approx(
        r["step"]["adalora"]["median_ms"] / r["step"]["prilora"]["median_ms"])
    # 1e5 A parameters at r=8, d_in=4096: round(1e5 / 32768) = 3 modules.
    assert r["event_cost"] == [pytest.approx({**r["event_cost"][0], "a_params": 3 * 8 * 4096, "modules": 3})]
    assert set(r["inference"]) == {"base", "prilora_unmerged", "prilora_merged"}
    assert r["inference"]["base"]["ratio_to_base"] == 1.0
    assert r["settings"]["batch_size"] == 4 and r["settings"]["seq_len"] == 16 and r["machine"]["device"] == "cpu"
    assert r["versions"]["torch"]
    table = capsys.readouterr().out
    assert "ratio to LoRA" in table and "AdaLoRA / PRILoRA step time" in table
    memory_only = format_result({k: v for k, v in r.items() if k != "step"})  # as --no-timing writes it
    assert "method | peak memory MB | ratio | peak RSS MB" in memory_only and "step ms" not in memory_only
    for m in methods:
        assert f"\n{m} | {r['memory'][m]['tensor_peak_mb']:.1f} | {r['memory'][m]['ratio_to_lora']:.4f} |" in memory_only


def test_bench_bad_input(tmp_path, capsys):
    assert main(["bench", "--methods", "lora,dora"]) == 2
    assert capsys.readouterr().err.strip() == ("prilora bench: error: unknown bench method 'dora': choose from lora, "
                                               "linear, prilora, prilora-every-step, adalora")
    assert main(["bench", "--model", str(tmp_path / "none")]) == 2
    assert "is neither one of minilm, deberta-v3-base, llama-0.27b nor a local model folder" in capsys.readouterr().err
    assert main(["bench", "--no-timing"]) == 2
    assert capsys.readouterr().err.strip() == ("prilora bench: error: --no-timing leaves nothing to measure: add "
                                               "--ops, --memory, --event-sizes or --inference")
    assert main(["bench", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "prilora bench: error: --steps must be >= 1, got 0"
    (tmp_path / "a-file").write_text("")
    assert main(["bench", "--json", str(tmp_path / "a-file" / "bench.json")]) == 2  # refused before measuring
    assert capsys.readouterr().err.strip() == (f"prilora bench: error: --json {tmp_path / 'a-file' / 'bench.json'} "
                                               f"cannot be written ({tmp_path / 'a-file'} is a file): pass another "
                                               "file path")


def test_bench_counts_operations_phase_by_phase(tiny_model_dir, tmp_path, capsys):
    """``--no-timing --ops``: operation counts alone (no quiet machine needed). With every dropout at 0, a
    PRILoRA forward runs exactly one reduction more than LoRA's per distinct adapted input (4 a layer in
    BERT: the attention's shared input, its context, the FFN's two inputs; 2 layers), and its backward,
    optimizer step and zero_grad run LoRA's; its after-step work is the fold and event amortized."""
    out = tmp_path / "ops.json"
    counts = {}
    for dropout in ([], ["--no-dropout"]):
        assert main(["bench", "--model", str(tiny_model_dir), "--batch-size", "2", "--seq-len", "8", "--no-timing",
                     "--ops", *dropout, "--methods", "lora,linear,prilora,prilora-every-step", "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        assert "step" not in r and "memory" not in r
        counts[bool(dropout)] = r["ops"]
    printed = capsys.readouterr().out
    assert "  prilora: forward " in printed and "operations per step (eager, ratio to LoRA; host reads)" in printed
    ops = counts[True]
    for m, v in ops.items():
        assert v["ops_per_step"] == pytest.approx(sum(v["ops_per_phase"].values()))
        assert v["ratio_to_lora"] == pytest.approx(v["ops_per_step"] / ops["lora"]["ops_per_step"])
    lora, pri, every = (ops[m]["ops_per_phase"] for m in ("lora", "prilora", "prilora-every-step"))
    assert ops["linear"]["ops_per_phase"] == lora
    assert pri["forward"] - lora["forward"] == 8
    assert {p: pri[p] for p in ("backward", "optimizer", "zero_grad")} == \
        {p: lora[p] for p in ("backward", "optimizer", "zero_grad")}
    assert lora["after_step"] == 0 < pri["after_step"] < every["after_step"]
    # Dropout is a new tensor (and operations) per layer: counting without it removes them from every method.
    assert counts[True]["lora"]["ops_per_phase"]["forward"] < counts[False]["lora"]["ops_per_phase"]["forward"]
