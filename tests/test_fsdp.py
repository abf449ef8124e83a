"""PRILoRA under FSDP2 (``fully_shard``) in a plain training loop, 2 processes on CPU (gloo).

FSDP2 splits every LoRA matrix by rows, each row whole on one process, so a per-row ranking needs only
the synchronized input norms: the sharded run must prune exactly the weights that one process training
on the same global batches prunes. Ranks that 2 does not divide (3 and 5) give uneven shards, and a rank
of 1 leaves one process without any row of that matrix.
"""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prilora import PriLoraConfig, get_prilora_model
from prilora.run_folder import finish_distributed

from conftest import tiny_causal_lm
from test_distributed import free_port

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")

STEPS, GLOBAL_BATCH, SEQ = 6, 4, 10
CONFIG = dict(task_type="CAUSAL_LM", r_start=1, r_end=5, prune_interval=2, total_steps=STEPS, prune_end=4,
              ema_beta=0.9, stats_sync="step")  # ranks 1 to 5 over 5 layers: the last event at step 4, its mask held


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 60, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]


def train(rank: int = 0, world: int = 1):
    """The same model and data; with world > 1 each decoder layer and the whole model are fully_shard-ed
    and this process takes its part of every global batch."""
    model, pruner = get_prilora_model(tiny_causal_lm("llama", num_layers=5), PriLoraConfig(**CONFIG))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    part = GLOBAL_BATCH // world
    for ids in batches():
        ids = ids[rank * part:(rank + 1) * part]
        model(input_ids=ids, labels=ids).loss.backward()  # mean over this part; FSDP2 averages the gradients
        opt.step()
        opt.zero_grad()
        pruner.step()
    return model, pruner


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, pruner = train(rank, world)
    assert all(site.sharded for site in pruner.sites)
    local_rows = {site.name: site.rows().shape[0] for site in pruner.sites}
    sparsity = pruner.sparsity()
    full = {site.name: (site.lora_A.full_tensor().detach().clone(), site.lora_B.full_tensor().detach().clone())
            for site in pruner.sites}
    # The adapter as a PEFT user saves a sharded model: whole matrices gathered onto rank 0, every process
    # calling save_pretrained (prilora.json's sparsity is counted over all shards), rank 0 writing.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(os.path.join(out, "adapter"), state_dict=state, is_main_process=rank == 0)
    # A ranking over a whole sharded matrix would rank a fragment: refused, with the way out named.
    pruner.config = dataclasses.replace(pruner.config, prune_scope="matrix")
    try:
        pruner.prune()
        refusal = None
    except RuntimeError as e:
        refusal = str(e)
    torch.save({"full": full, "local_rows": local_rows, "sparsity": sparsity, "refusal": refusal,
                "history": pruner.history}, os.path.join(out, f"{rank}.pt"))
    finish_distributed()


def test_fsdp2_prunes_exactly_what_one_process_prunes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    torch.manual_seed(0)
    _, single = train()
    ranks = {site.name: site.lora_A.shape[0] for site in single.sites}
    assert sorted(set(ranks.values())) == [1, 2, 3, 4, 5]
    for name, r in ranks.items():  # FSDP2's row shards: ceil(r / 2) rows first, the rest on process 1
        assert (r0["local_rows"][name], r1["local_rows"][name]) == ((r + 1) // 2, r // 2)
    for site in single.sites:
        a, b = r0["full"][site.name]
        assert torch.equal(a, r1["full"][site.name][0])  # the gathered matrices agree on both processes
        assert torch.equal(a == 0, site.lora_A == 0), site.name  # the same pruned weights, exactly
        assert torch.equal((a == 0).sum(1), torch.full((a.shape[0],), a.shape[1] // 2))  # held: half of each row
        # The values within float tolerance: the gradients are averaged in another order (4.5e-6 at most seen).
        torch.testing.assert_close(a, site.lora_A.detach(), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(b, site.lora_B.detach(), rtol=1e-4, atol=2e-5)
    # Plain PEFT loads the saved adapter onto a fresh base: every LoRA weight as gathered, zeros included.
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama", num_layers=5), str(tmp_path / "adapter"))
    for site in single.sites:
        layer = reloaded.base_model.model.get_submodule(site.name)
        assert torch.equal(layer.lora_A["default"].weight, r0["full"][site.name][0]), site.name
        assert torch.equal(layer.lora_B["default"].weight, r0["full"][site.name][1]), site.name
    summary = json.loads((tmp_path / "adapter" / "prilora.json").read_text())
    assert summary["sparsity"]["A"] == 0.5 and summary["modules"] == {
        site.name: {"layer": site.layer, "r": site.lora_A.shape[0]} for site in single.sites}
    expected = single.sparsity()
    for r in (r0, r1):  # counted over both processes' shards: the whole adapter's sparsity on each
        assert r["sparsity"]["A"] == expected["A"] == 0.5
        assert r["sparsity"]["per_module"] == expected["per_module"]
        assert [h[0] for h in r["history"]] == [h[0] for h in single.history] == [2, 4]
        assert r["refusal"] == ("PRILoRA under FSDP2 prunes per row of A: prune_scope='matrix' ranks a whole "
                                "matrix that is sharded across processes; use prune_scope='row' (--prune-scope row)")
