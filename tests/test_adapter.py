"""The output is a standard PEFT LoRA adapter: plain PEFT loads it, merges it, gets the same logits."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from prilora import PriLoraConfig, get_prilora_model

from conftest import tiny_bert


def trained(tmp_path, steps=6, **cfg):
    model, pruner = get_prilora_model(
        tiny_bert(), PriLoraConfig(task_type="SEQ_CLS", prune_interval=2, prune_start=0, prune_end=4, total_steps=steps, **cfg)
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 12), generator=g)
        labels = torch.randint(0, 2, (4,), generator=g)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
    model.eval()
    return model, pruner


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (3, 10), generator=g)


def test_plain_peft_loads_adapter_without_prilora(tmp_path):
    model, pruner = trained(tmp_path)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    with torch.no_grad():
        expected = model(input_ids=inputs()).logits
    torch.save({"ids": inputs(), "logits": expected}, tmp_path / "expected.pt")
    # A fresh interpreter that never imports prilora: what any PEFT user does.
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from conftest import tiny_bert
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(tiny_bert(), {str(out)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits
        torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-6)
        merged = model.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ref["ids"]).logits, ref["logits"], rtol=1e-4, atol=1e-5)
        assert not any(m.startswith("prilora") for m in sys.modules), "prilora was imported"
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_saved_files(tmp_path):
    model, pruner = trained(tmp_path)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert set(adapter_config["rank_pattern"].values()) == {4, 7, 9, 12}  # 4 layers, 4 -> 12
    weights = load_file(out / "adapter_model.safetensors")
    a_keys = [k for k in weights if "lora_A" in k]
    assert len(a_keys) == 24  # 6 matrices x 4 layers
    # the saved A has exactly the configured sparsity, row by row
    for k in a_keys:
        a = weights[k]
        assert ((a == 0).sum(1) == int(0.5 * a.shape[1])).all(), k
        # and equals the live weights element by element
    live = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert len(live) == len(a_keys)
    for name, p in live.items():
        key = name.replace(".default", "")  # PEFT drops the adapter name in the saved keys
        torch.testing.assert_close(weights[key], p.detach(), rtol=0, atol=0)
    info = json.loads((out / "prilora.json").read_text())
    assert info["ranks"] == [4, 7, 9, 12]
    assert info["config"]["prune_ratio"] == 0.5
    assert info["sparsity"]["A"] == 0.5
    assert info["parameters"]["lora"] == sum(w.numel() for k, w in weights.items() if "lora_" in k)
    assert info["optimizer_steps"] == 6 and info["pruning_events"] == 2  # steps 2 and 4
    assert PriLoraConfig.from_dict(info["config"]) == pruner.config


def test_merge_matches_unmerged(tmp_path):
    model, _ = trained(tmp_path)
    with torch.no_grad():
        unmerged = model(input_ids=inputs()).logits
        merged = model.merge_and_unload()(input_ids=inputs()).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_constant_scaling_and_constant_alpha(tmp_path):
    model, pruner = get_prilora_model(tiny_bert(), PriLoraConfig(lora_alpha=16, task_type="SEQ_CLS"))
    r_ref = sum([4, 7, 9, 12]) / 4  # 8
    for s in pruner.sites:
        module = model.base_model.model.get_submodule(s.name)
        assert abs(module.scaling["default"] - 16 / r_ref) < 1e-12
    model, pruner = get_prilora_model(tiny_bert(), PriLoraConfig(lora_alpha=16, alpha_policy="constant_alpha", task_type="SEQ_CLS"))
    for s in pruner.sites:
        module = model.base_model.model.get_submodule(s.name)
        assert abs(module.scaling["default"] - 16 / s.lora_A.shape[0]) < 1e-12
