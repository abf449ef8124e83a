"""Decoder LLMs: PRILoRA on each causal-LM family, and `prilora train-clm` end to end."""

import json
import random
import re

import pytest
import torch
from peft import PeftModel

from prilora import PriLoraConfig, get_prilora_model, rank_schedule
from prilora.cli import main

from conftest import save_tiny_causal_lm, tiny_causal_lm

DECODERS = {  # arch -> the adapted matrices of one layer (independent list, from the model code)
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "mistral": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"],
    "qwen2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
}


def _batch(seed=0, vocab=64, n=4, length=24):
    ids = torch.randint(4, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoder_trains_prunes_saves_and_merges(arch, tmp_path):
    model, pruner = get_prilora_model(tiny_causal_lm(arch), PriLoraConfig(task_type="CAUSAL_LM", prune_interval=2))
    assert model.prilora_ranks == rank_schedule("linear", 4, 4, 12) == [4, 7, 9, 12]
    suffixes = sorted({re.split(r"\.(?:layers|h)\.\d+\.", s.name)[1] for s in pruner.sites})
    assert suffixes == sorted(DECODERS[arch])
    assert len(pruner.sites) == 4 * len(DECODERS[arch])
    pruner.set_total_steps(8)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(8):
        loss = model(**_batch(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert pruner.events > 0
    for site in pruner.sites:  # every row of every A keeps exactly half of its inputs
        zeros = (site.lora_A == 0).sum(dim=1)
        assert torch.equal(zeros, torch.full_like(zeros, site.lora_A.shape[1] // 2)), site.name
    model.eval()
    probe = _batch(99)
    with torch.no_grad():
        trained = model(**probe).logits
    model.save_pretrained(tmp_path / "adapter")
    # Plain PEFT, fresh base with the same initial weights: the same logits, element by element.
    loaded = PeftModel.from_pretrained(tiny_causal_lm(arch), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**probe).logits, trained)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**probe).logits, trained, atol=1e-5, rtol=1e-5)


def write_corpus(path, n=300, seed=0):
    rng = random.Random(seed)
    subj, verb, obj = ["the cat", "a dog", "my friend"], ["sat on", "looked at", "ran to"], ["the mat.", "a tree."]
    path.write_text("\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}" for _ in range(n)) + "\n")
    return path


def clm(tmp_path, model_dir, *extra, out="clm", train_file=None, pruning=("--prune-interval", "2")):
    train_file = train_file or write_corpus(tmp_path / "corpus.txt")
    return main(["train-clm", "--model", str(model_dir), "--train-file", str(train_file),
                 "--output-dir", str(tmp_path / out), "--block-size", "32", "--learning-rate", "1e-2",
                 "--quiet", *pruning, *extra])


def test_train_clm_loss_goes_down_and_writes_a_peft_adapter(tiny_llama_dir, tmp_path):
    assert clm(tmp_path, tiny_llama_dir) == 0
    out = tmp_path / "clm"
    r = json.loads((out / "results.json").read_text())
    m = r["metrics"]
    assert m["eval_loss"] < m["initial_eval_loss"] - 0.2, m
    assert m["perplexity"] == pytest.approx(torch.tensor(m["eval_loss"]).exp().item(), rel=1e-6)
    # 300 lines of ~23 characters + </s> -> ~7,200 tokens -> 225 blocks of 32; 10% held out.
    tokens = sum(len(line) + 1 for line in (tmp_path / "corpus.txt").read_text().splitlines())
    assert r["train_blocks"] + r["eval_blocks"] == tokens // 32
    assert r["eval_blocks"] == round(0.1 * (tokens // 32))
    assert r["ranks"] == [4, 7, 9, 12] and r["a_sparsity"] == 0.5 and r["method"] == "prilora"
    assert r["steps"] == -(-r["train_blocks"] // 8)
    assert r["loss_curve"][-1][1] < r["loss_curve"][0][1]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert json.loads((out / "prilora.json").read_text())["sparsity"]["A"] == 0.5
    # A finished run is never overwritten silently.
    assert clm(tmp_path, tiny_llama_dir) == 2


def test_train_clm_lora_and_jsonl_with_eval_file(tiny_llama_dir, tmp_path):
    lines = write_corpus(tmp_path / "c.txt").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in lines[:200]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in lines[200:]))
    assert clm(tmp_path, tiny_llama_dir, "--method", "lora", "--eval-file", str(tmp_path / "eval.jsonl"),
               "--text-field", "body", "--max-steps", "3", train_file=tmp_path / "train.jsonl", pruning=()) == 0
    r = json.loads((tmp_path / "clm" / "results.json").read_text())
    assert r["ranks"] == [8, 8, 8, 8] and r["a_sparsity"] == 0.0 and r["steps"] == 3 and r["holdout"] is None
    assert r["eval_blocks"] == sum(len(t) + 1 for t in lines[200:]) // 32


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_train_clm_bad_input(tiny_llama_dir, tiny_model_dir, tmp_path, capsys):
    capsys.readouterr()
    assert one_line_error(capsys, clm(tmp_path, tiny_llama_dir, train_file=tmp_path / "none.txt")).endswith(
        "none.txt not found: pass a text file (one example per line) or JSON lines")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    assert one_line_error(capsys, clm(tmp_path, tiny_llama_dir, train_file=tmp_path / "bad.jsonl")).endswith(
        "bad.jsonl:2: no string field 'text': pass --text-field with the name of the text field")
    (tmp_path / "short.txt").write_text("too short\n")
    assert "gives 0 blocks of 32 tokens: too few to hold out 0.1" in one_line_error(
        capsys, clm(tmp_path, tiny_llama_dir, train_file=tmp_path / "short.txt"))
    assert "is not a causal LM" in one_line_error(capsys, clm(tmp_path, tiny_model_dir))
    assert one_line_error(capsys, clm(tmp_path, tiny_llama_dir, "--method", "lora", "--prune-ratio", "0.5", pruning=())) == (
        "prilora train-clm: error: --prune-ratio does not apply to --method lora: it is an option of --method prilora")
    assert not (tmp_path / "clm").exists()


def test_train_clm_on_gpt2_and_opt_folders(tmp_path):
    for arch in ("gpt2", "opt"):
        folder = save_tiny_causal_lm(tmp_path / arch, arch=arch)
        assert clm(tmp_path, folder, "--max-steps", "4", out=f"{arch}-run") == 0
        r = json.loads((tmp_path / f"{arch}-run" / "results.json").read_text())
        assert r["steps"] == 4 and r["ranks"] == [4, 7, 9, 12]


def test_train_clm_ctrl_c_saves_the_step_and_resumes_from_it(tiny_llama_dir, tmp_path, monkeypatch, capsys, ctrl_c):
    import os
    import signal

    from prilora.pruning import PriLoraPruner

    real = PriLoraPruner.step

    def step(self):
        real(self)
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(PriLoraPruner, "step", step)
    assert clm(tmp_path, tiny_llama_dir) == 130
    out = tmp_path / "clm"
    assert f"interrupted after optimizer step 3, saved as {out / 'checkpoint-3'}" in capsys.readouterr().err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"] and not (out / "results.json").exists()
    before = json.loads((out / "checkpoint-3" / "prilora_runtime.json").read_text())["train_runtime_s"]
    monkeypatch.undo()
    assert clm(tmp_path, tiny_llama_dir, "--resume") == 0
    r = json.loads((out / "results.json").read_text())
    assert r["resumed_from"] == "checkpoint-3" and r["a_sparsity"] == 0.5
    assert 0 < before < r["train_runtime_s"]  # the time before the stop is counted in
