"""Where LLM users train LoRA, PRILoRA trains too: QLoRA (a 4-bit NF4 base, bitsandbytes on CPU) and TRL's
SFTTrainer, on a tiny LLaMA. Each ends with A pruned row by row and an adapter that plain PEFT loads."""

import pytest
import torch
from safetensors.torch import load_file

from prilora import PriLoraCallback, PriLoraConfig, get_prilora_model

from conftest import char_tokenizer

TEXT = ["the cat sat on the mat", "a dog ran in the park", "we like to read books", "rain fell on the town"] * 8


def assert_rows_half_pruned(model):
    a = [m.weight for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert a and all(int((w == 0).sum(1).min()) == int((w == 0).sum(1).max()) == w.shape[1] // 2 for w in a)
    return a


def test_qlora_4bit_base_trains_prunes_and_reloads(tiny_llama_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, dtype=torch.float32)

    model, pruner = get_prilora_model(base(), PriLoraConfig(task_type="CAUSAL_LM", total_steps=10, prune_interval=2))
    wrapped = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(wrapped) == 4 * 7  # every projection of the 4 layers is a 4-bit base under its LoRA
    tok = char_tokenizer()
    batch = tok(TEXT[:4], return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(10):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
    pruner.finalize()
    assert [h[0] for h in pruner.history] == [2, 4, 6, 8, 9] and pruner.sparsity()["A"] == 0.5
    assert_rows_half_pruned(model)
    assert all(torch.isfinite(n).all() for n in pruner.stats.emas.values())  # statistics of the 4-bit layers' inputs
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()  # plain PEFT, no prilora
    with torch.no_grad():
        after = reloaded(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # TRL sets a field transformers renames
def test_trl_sft_trainer_with_the_callback(tiny_llama_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model, pruner = get_prilora_model(base, PriLoraConfig(task_type="CAUSAL_LM", prune_interval=5))
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=30, per_device_train_batch_size=4, learning_rate=1e-2,
                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10,
                     max_length=32, dataset_text_field="text")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXT}),
                         processing_class=char_tokenizer(), callbacks=[PriLoraCallback(pruner)])
    trainer.train()
    assert pruner.global_step == 30 and pruner.total_steps == 30  # the callback learned the length from TRL
    assert [h[0] for h in pruner.history] == [5, 10, 15, 20, 25, 27] and pruner.sparsity()["A"] == 0.5
    a = assert_rows_half_pruned(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    names = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    loaded = dict(reloaded.named_modules())
    for name, weight in zip(names, a):  # element by element, the pruned zeros included
        assert torch.equal(loaded[name].weight, weight.detach()), name
    assert len([k for k in saved if "lora_A" in k]) == len(a)


def test_train_clm_load_in_4bit(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """`prilora train-clm --load-in-4bit`: the base loads in 4-bit NF4 (its loss before training is not the
    full-precision base's), A ends half pruned row by row, and plain PEFT puts the saved adapter on a 4-bit
    base. Without bitsandbytes: one line naming the extra, exit 2, nothing written."""
    bnb = pytest.importorskip("bitsandbytes")
    import importlib.util
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prilora.causal_lm import four_bit_kwargs
    from prilora.cli import main
    from test_causal_lm import clm

    assert clm(tmp_path, tiny_llama_dir, "--load-in-4bit", "--max-steps", "6", out="q") == 0
    assert clm(tmp_path, tiny_llama_dir, "--max-steps", "1", out="full") == 0
    q, full = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("q", "full"))
    assert q["load_in_4bit"] is True and full["load_in_4bit"] is False
    assert q["metrics"]["initial_eval_loss"] != pytest.approx(full["metrics"]["initial_eval_loss"], abs=1e-6)
    assert q["a_sparsity"] == 0.5 and q["ranks"] == [4, 7, 9, 12] and q["steps"] == 6
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, **four_bit_kwargs())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "q").eval()
    assert len([m for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 4 * 7
    saved = load_file(tmp_path / "q" / "adapter_model.safetensors")
    a = assert_rows_half_pruned(reloaded)
    assert [torch.equal(w, saved[k]) for k, w in zip(sorted(k for k in saved if "lora_A" in k), [
        m.weight for n, m in sorted(reloaded.named_modules()) if n.endswith("lora_A.default")])] == [True] * len(a)

    # export merged: into the base as the run saw it (4-bit values, dequantized): a plain full-precision
    # Transformers model with the adapted 4-bit model's logits.
    capsys.readouterr()
    assert main(["export", "merged", str(tmp_path / "q"), "--out", str(tmp_path / "merged")]) == 0
    assert "(dequantized from 4-bit NF4, as it was trained)" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    ids = torch.randint(4, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=1e-4)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes" else real(name, *args))
    capsys.readouterr()
    assert clm(tmp_path, tiny_llama_dir, "--load-in-4bit", out="none") == 2
    assert capsys.readouterr().err.strip() == ('prilora train-clm: error: --load-in-4bit needs bitsandbytes, which is '
                                               'not installed: pip install "prilora[qlora]"')
    assert not (tmp_path / "none").exists()
