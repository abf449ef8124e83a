"""`prilora export merged|sparse|dense` and `prilora inspect`: round trips element by element."""

import json
import math
import os
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from prilora import PriLoraConfig, get_prilora_model
from prilora.cli import main
from prilora.export import DENSE_WEIGHTS, SPARSE_WEIGHTS

from conftest import tiny_causal_lm


def _batch(seed, vocab=64, n=4, length=16):
    ids = torch.randint(4, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module", params=[0.5, 0.75], ids=["ratio0.5", "ratio0.75"])
def llama_adapter(request, tmp_path_factory):
    """A tiny LLaMA (saved as a base folder) and a PRILoRA adapter trained and pruned on it."""
    root = tmp_path_factory.mktemp(f"adapter-{request.param}")
    tiny_causal_lm("llama").save_pretrained(root / "base")
    model, pruner = get_prilora_model(AutoModelForCausalLM.from_pretrained(root / "base"),
                                      PriLoraConfig(task_type="CAUSAL_LM", prune_interval=1, prune_ratio=request.param))
    pruner.set_total_steps(4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(4):
        batch = _batch(step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    model.save_pretrained(root / "adapter")
    return {"root": root, "ratio": request.param}


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out.strip(), out.err.strip()


def adapter_logits(base, adapter, probe):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(**probe).logits


def test_sparse_round_trip_is_exact_and_smaller(llama_adapter, tmp_path, capsys):
    root, ratio = llama_adapter["root"], llama_adapter["ratio"]
    code, out, _ = run(capsys, "export", "sparse", str(root / "adapter"), "--out", str(tmp_path / "sparse"))
    assert code == 0
    original = load_file(root / "adapter" / DENSE_WEIGHTS)
    # Independent size: each pruned A as ceil(n/8) mask bytes + 4 bytes per kept value; B dense.
    expected = 0
    for key, t in original.items():
        if ".lora_A." in key:
            expected += math.ceil(t.numel() / 8) + 4 * int((t != 0).sum())
            assert (t == 0).float().mean().item() == pytest.approx(ratio, abs=1e-6)
        else:
            expected += 4 * t.numel()
    assert f"LoRA matrices {4 * sum(t.numel() for t in original.values()):,} -> {expected:,} bytes" in out
    assert (tmp_path / "sparse" / SPARSE_WEIGHTS).stat().st_size < (root / "adapter" / DENSE_WEIGHTS).stat().st_size
    assert not (tmp_path / "sparse" / DENSE_WEIGHTS).exists()
    assert (tmp_path / "sparse" / "prilora.json").exists()
    # Back to a standard adapter: every tensor equal, element by element, and the same logits in plain PEFT.
    assert run(capsys, "export", "dense", str(tmp_path / "sparse"), "--out", str(tmp_path / "dense"))[0] == 0
    restored = load_file(tmp_path / "dense" / DENSE_WEIGHTS)
    assert restored.keys() == original.keys()
    for key in original:
        assert restored[key].dtype == original[key].dtype and torch.equal(restored[key], original[key]), key
    probe = _batch(7)
    assert torch.equal(adapter_logits(root / "base", tmp_path / "dense", probe),
                       adapter_logits(root / "base", root / "adapter", probe))


def test_merged_export_has_the_adapted_logits(llama_adapter, tmp_path, capsys):
    root = llama_adapter["root"]
    # The base model is the one named in adapter_config.json unless --base says otherwise.
    code, out, _ = run(capsys, "export", "merged", str(root / "adapter"), "--out", str(tmp_path / "merged"))
    assert code == 0 and "max |logit difference| to the unmerged model" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    probe = _batch(11)
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, adapter_logits(root / "base", root / "adapter", probe),
                                   atol=1e-5, rtol=1e-5)
    # The sparse export merges to the same model.
    assert run(capsys, "export", "sparse", str(root / "adapter"), "--out", str(tmp_path / "sparse"))[0] == 0
    assert run(capsys, "export", "merged", str(tmp_path / "sparse"), "--base", str(root / "base"),
               "--out", str(tmp_path / "merged2"))[0] == 0
    merged2 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged2")
    for (n1, p1), (n2, p2) in zip(merged.state_dict().items(), merged2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_merged_sequence_classifier_keeps_its_trained_head(tiny_model_dir, glue_dir, tmp_path, capsys):
    # STS-B: a one-output regression head trained through modules_to_save.
    assert main(["train", "--task", "stsb", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
                 "--output-dir", str(tmp_path / "run"), "--max-train-samples", "16", "--max-eval-samples", "8",
                 "--max-steps", "2", "--batch-size", "8", "--quiet"]) == 0
    assert run(capsys, "export", "merged", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))[0] == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.num_labels == 1
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run").eval()
    probe = _batch(3, vocab=50)
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, adapted(**probe).logits, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_export_bad_input(llama_adapter, tmp_path, capsys):
    root = llama_adapter["root"]

    def error(*argv):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "\n" not in err, err
        return err

    assert error("export", "sparse", str(tmp_path / "none"), "--out", str(tmp_path / "o")).endswith(
        "none not found")
    (tmp_path / "empty").mkdir()
    assert error("export", "sparse", str(tmp_path / "empty"), "--out", str(tmp_path / "o")).endswith(
        "empty holds no adapter_config.json: pass the folder a PEFT adapter was saved to (prilora train's --output-dir)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert error("export", "sparse", str(root / "adapter"), "--out", str(tmp_path / "full")).endswith(
        "full exists and is not empty: choose a new folder")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert error("export", "sparse", str(root / "adapter"), "--out", str(tmp_path / "full" / "x" / "o")) == \
        f"prilora export: error: --out {tmp_path / 'full' / 'x' / 'o'} cannot be written ({tmp_path / 'full' / 'x'} " \
        "is a file): choose another folder"
    assert error("export", "sparse", str(root / "adapter"), "--base", "x", "--out", str(tmp_path / "o")) == \
        "prilora export: error: --base applies to export merged only, not export sparse"
    # Base models that do not match the adapter: other width, fewer layers.
    tiny_causal_lm("llama", hidden=48).save_pretrained(tmp_path / "wide")
    err = error("export", "merged", str(root / "adapter"), "--base", str(tmp_path / "wide"), "--out", str(tmp_path / "o"))
    assert "does not fit base model" in err and "size mismatch" in err
    tiny_causal_lm("llama", num_layers=2).save_pretrained(tmp_path / "short")
    # 2 missing layers x 7 matrices x (A, B)
    err = error("export", "merged", str(root / "adapter"), "--base", str(tmp_path / "short"), "--out", str(tmp_path / "o"))
    assert "does not fit base model" in err and ": 28 of its weights have no place there (e.g. " in err
    assert error("export", "merged", str(root / "adapter"), "--base", str(tmp_path / "gone"), "--out",
                 str(tmp_path / "o")).endswith("gone not found: pass --base with the model the adapter was trained on")
    shutil.copytree(root / "adapter", tmp_path / "nobase")
    config = json.loads((tmp_path / "nobase" / "adapter_config.json").read_text())
    (tmp_path / "nobase" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert error("export", "merged", str(tmp_path / "nobase"), "--out", str(tmp_path / "o")).endswith(
        "nobase's adapter_config.json names no base model: pass --base")
    # Damaged files: a config cut short, weights cut to their first 100 bytes.
    shutil.copytree(root / "adapter", tmp_path / "cut-config")
    (tmp_path / "cut-config" / "adapter_config.json").write_text('{"peft_type": "LO')
    assert error("inspect", str(tmp_path / "cut-config")) == (
        f"prilora inspect: error: {tmp_path / 'cut-config' / 'adapter_config.json'} is damaged (not JSON: "
        "Unterminated string starting at: line 1 column 15 (char 14)): restore it, or move its folder away")
    shutil.copytree(root / "adapter", tmp_path / "cut-weights")
    weights = tmp_path / "cut-weights" / DENSE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    err = error("export", "sparse", str(tmp_path / "cut-weights"), "--out", str(tmp_path / "o"))
    assert err.startswith(f"prilora export: error: {weights} cannot be read (") and \
        err.endswith("): the file is damaged or cut short; save or export the adapter again")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["sparse", "merged"])
def test_an_interrupted_export_leaves_nothing_and_can_be_run_again(llama_adapter, tmp_path, capsys, monkeypatch, kind):
    import prilora.export
    from transformers import PreTrainedModel

    def save_then_stop(real):
        def save(*args, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt  # Ctrl-C once the weights are written, before the rest
        return save

    if kind == "sparse":
        monkeypatch.setattr(prilora.export, "save_file", save_then_stop(prilora.export.save_file))
    else:
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_stop(PreTrainedModel.save_pretrained))
    src, out = llama_adapter["root"] / "adapter", tmp_path / "deep" / "o"
    assert run(capsys, "export", kind, str(src), "--out", str(out)) == (
        130, "", f"prilora export: interrupted; nothing was written to {out}")
    assert os.listdir(tmp_path / "deep") == []  # no half-written folder, no temporary one
    monkeypatch.undo()
    assert run(capsys, "export", kind, str(src), "--out", str(out))[0] == 0
    assert (out / ("adapter_model.sparse.safetensors" if kind == "sparse" else "model.safetensors")).is_file()
    (tmp_path / "plain").mkdir()  # readable by others as any folder made here, for a server running as another user
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_inspect_reads_ranks_and_sparsity_from_the_file(llama_adapter, tmp_path, capsys):
    root, ratio = llama_adapter["root"], llama_adapter["ratio"]
    code, out, _ = run(capsys, "inspect", str(root / "adapter"), "--json")
    assert code == 0
    info = json.loads(out)
    tensors = load_file(root / "adapter" / DENSE_WEIGHTS)
    assert info["lora_params"] == sum(t.numel() for t in tensors.values())
    assert info["nonzero_lora_params"] == sum(int((t != 0).sum()) for t in tensors.values())
    assert [layer["ranks"] for layer in info["layers"]] == [[4], [7], [9], [12]]
    assert all(layer["modules"] == 7 for layer in info["layers"])
    assert info["a_sparsity"] == pytest.approx(ratio) and info["b_sparsity"] == 0.0
    assert run(capsys, "inspect", str(root / "adapter"), "--layer-pattern", "(layers)") == (2, "", (
        "prilora inspect: error: layer_pattern '(layers)' captures 'layers' from module "
        "'model.layers.0.mlp.down_proj', "
        "not a layer number: its first group must match digits only, e.g. (\\d+)"))
    code, table, err = run(capsys, "inspect", str(root / "adapter"), "--plot", str(tmp_path / "h.png"))
    rows = [line for line in table.splitlines() if line[:1].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["4", "7", "9", "12"]
    assert all(r.count(f"{100 * ratio:.1f}%") == 7 for r in rows)
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The sparse export inspects the same.
    assert run(capsys, "export", "sparse", str(root / "adapter"), "--out", str(tmp_path / "s"))[0] == 0
    sparse_info = json.loads(run(capsys, "inspect", str(tmp_path / "s"), "--json")[1])
    assert sparse_info["sparse_file"] and sparse_info["modules"] == info["modules"]
