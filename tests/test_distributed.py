"""Multi-process training on CPU (gloo): every replica prunes the same weights, and equals one process
on the concatenated batch where the statistics are defined to match; gradient accumulation,
mixed precision, sharded parameters, and `prilora train` under torchrun (with resume)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from prilora import PriLoraCallback, PriLoraConfig, get_prilora_model
from prilora.cli import main
from prilora.manifest import MANIFEST_FILE, verify
from prilora.pruning import STATE_FILE
from prilora.run_folder import finish_distributed

from conftest import tiny_bert

STEPS, GLOBAL_BATCH = 6, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 100, (GLOBAL_BATCH, 12), generator=g), torch.randint(0, 2, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def train(config: PriLoraConfig, rank: int = 0, world: int = 1):
    """The same model and data; with world > 1 this process takes its shard of every global batch."""
    model, pruner = get_prilora_model(tiny_bert(), config)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    shard = GLOBAL_BATCH // world
    for ids, labels in batches():
        ids, labels = ids[rank * shard:(rank + 1) * shard], labels[rank * shard:(rank + 1) * shard]
        model(input_ids=ids, labels=labels).loss.backward()  # mean over the shard; DDP averages the shards
        opt.step()
        opt.zero_grad()
        pruner.step()
    return pruner


def _worker(rank, world, port, config_dict, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    pruner = train(PriLoraConfig.from_dict(config_dict), rank, world)
    assert pruner.check_replicas() == world
    torch.save({"A": [s.lora_A.detach().clone() for s in pruner.sites],
                "norms": {n: pruner.stats.norms(n) for n in pruner.stats.emas}}, os.path.join(out, f"{rank}.pt"))
    finish_distributed()


@pytest.mark.parametrize("sync, beta, equals_one_process", [
    ("event", 0.0, True),   # root-sum-square of the processes' norms = the norm over all tokens
    ("step", 0.9, True),    # every step's squared sums all-reduced: the single-process EMA exactly
    ("event", 0.9, False),  # combined only at events: identical replicas, close to one process
])
def test_replicas_prune_alike_and_match_one_process(tmp_path, sync, beta, equals_one_process):
    config = PriLoraConfig(task_type="SEQ_CLS", prune_interval=2, total_steps=STEPS, prune_end=STEPS, ema_beta=beta,
                           stats_sync=sync)
    mp.spawn(_worker, args=(2, free_port(), config.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    for a0, a1 in zip(r0["A"], r1["A"]):
        assert torch.equal(a0, a1)  # element by element, on every matrix
        assert torch.equal((a0 == 0).sum(1), torch.full((a0.shape[0],), a0.shape[1] // 2))
    torch.manual_seed(0)
    single = train(config)
    for site, a in zip(single.sites, r0["A"]):
        same_mask = torch.equal(site.lora_A == 0, a == 0)
        if equals_one_process:
            assert same_mask, site.name
            torch.testing.assert_close(a, site.lora_A.detach(), rtol=1e-5, atol=1e-6)
    if not equals_one_process:  # the local EMAs differ from the global one; the norms stay close
        for name, n in r0["norms"].items():
            torch.testing.assert_close(n, single.stats.norms(name) / (2 ** 0.5), rtol=0.5, atol=0)


def test_gradient_accumulation_gives_the_large_batch_statistics():
    # 4 micro-batches of 8 per optimizer step vs one batch of 32: the same squared sums, EMA and masks.
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 100, (32, 10), generator=g) for _ in range(4)]
    results = []
    for micro in (32, 8):
        model, pruner = get_prilora_model(tiny_bert(), PriLoraConfig(task_type="SEQ_CLS", prune_interval=2,
                                                                     total_steps=4, prune_end=4))
        model.train()
        for ids in data:
            for chunk in ids.split(micro):
                with torch.no_grad():  # statistics only: the weights stay put, so both runs see the same inputs
                    model(input_ids=chunk)
            pruner.step()
        results.append(({n: pruner.stats.norms(n) for n in pruner.stats.emas}, [s.lora_A.clone() for s in pruner.sites]))
    (norms32, a32), (norms8, a8) = results
    for name in norms32:
        torch.testing.assert_close(norms8[name], norms32[name], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(x == 0, y == 0) for x, y in zip(a32, a8))


def test_trainer_counts_optimizer_steps_under_accumulation(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, pruner = get_prilora_model(tiny_bert(), PriLoraConfig(task_type="SEQ_CLS", prune_interval=1))
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 100, (64, 8), generator=g).tolist(),
                              "labels": torch.randint(0, 2, (64,), generator=g).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=4,
                             num_train_epochs=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[PriLoraCallback(pruner)])
    trainer.train()
    assert trainer.state.global_step == 2 == pruner.global_step  # 64 / (8 x 4)
    assert pruner.stats.updates == 2  # one EMA update per optimizer step, not per micro-batch (8)


def test_sharded_parameters_are_refused():
    cb = PriLoraCallback(get_prilora_model(tiny_bert(), PriLoraConfig(task_type="SEQ_CLS"))[1])
    with pytest.raises(ValueError, match="PRILoRA does not support FSDP under the Trainer yet: .* or FSDP2 "
                                         r"\(fully_shard\) in a plain loop"):
        cb.on_train_begin(SimpleNamespace(fsdp=["full_shard"]), SimpleNamespace(max_steps=10, global_step=0), None)
    zero3 = SimpleNamespace(fsdp=[], hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO stage 3"):
        cb.on_train_begin(zero3, SimpleNamespace(max_steps=10, global_step=0), None)
    zero2 = SimpleNamespace(fsdp=[], hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 2}}),
                            output_dir="x")
    cb.on_train_begin(zero2, SimpleNamespace(max_steps=10, global_step=0), None)  # stages 1-2 keep whole matrices
    # A plain loop under ZeRO-3 (a partitioned parameter carries ds_numel and is empty on each process).
    model, pruner = get_prilora_model(tiny_bert(), PriLoraConfig(task_type="SEQ_CLS", total_steps=4, prune_interval=1))
    site = pruner.sites[0]
    site.lora_A.data = torch.empty(0)
    site.lora_A.ds_numel = 4 * 32
    with pytest.raises(RuntimeError, match=r"matrix is sharded across processes \(DeepSpeed ZeRO stage 3 or FSDP1 "
                       r"flatten it\); use FSDP2 \(fully_shard\), DDP, or DeepSpeed ZeRO stage 1 or 2$"):
        pruner.prune()


def test_precision_and_accumulation_flags(tiny_model_dir, glue_dir, tmp_path, capsys):
    def run(*extra, out):
        return main(["train", "--task", "rte", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
                     "--output-dir", str(tmp_path / out), "--max-train-samples", "32", "--max-eval-samples", "16",
                     "--batch-size", "8", "--epochs", "1", "--prune-interval", "1", "--quiet", *extra])

    assert run("--precision", "bf16", "--gradient-accumulation", "2", out="bf16") == 0
    r = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert r["precision"] == "bf16" and r["micro_batch_size"] == 4 and r["gradient_accumulation"] == 2
    assert r["steps"] == 4 and r["a_sparsity"] == 0.5 and r["world_size"] == 1 and r["replicas_identical"] is None
    # Binary cross-entropy of a barely trained model: about ln 2, not scaled by the 2 micro-batches.
    assert 0.5 < r["train_loss"] < 0.9
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert run("--precision", "fp16", out="fp16") == 2
        assert capsys.readouterr().err.strip() == ("prilora train: error: --precision fp16 needs a GPU (fp16 "
                                                   "autocast on CPU is not supported): use bf16 on CPU")
    assert run("--gradient-accumulation", "3", out="ga3") == 2
    assert capsys.readouterr().err.strip().endswith(
        "the batch size 8 does not split into 1 process(es) x 3 micro-batch(es): pass --batch-size divisible by 3")
    assert not (tmp_path / "ga3").exists() and not (tmp_path / "fp16").exists()


def torchrun(*argv, script=None):
    """``prilora`` (or a script that wraps it) in 2 processes."""
    entry = [str(script)] if script else ["-m", "prilora.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *entry, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def rank_errors(done) -> str:
    """The processes' own output, without the launcher's traceback that would fill the message."""
    return done.stderr.split("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")[0][-4000:]


def _finish_worker(rank, world, ports, out):
    for i, port in enumerate(ports):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.ones(2, 4)).sum().backward()
        gathered = [torch.empty(3) for _ in range(world)]
        dist.all_gather(gathered, torch.ones(3))  # a collective on tensors Python owns, as check_replicas
        finish_distributed()
        del model, gathered  # frees the group: joins Gloo's threads
        with open(os.path.join(out, f"{rank}.txt"), "w") as f:
            f.write(f"{i + 1} {dist.is_initialized()}")


def _interrupt_worker(rank, world, port, out, as_if_nccl):
    from transformers import TrainerControl

    from prilora import SaveOnInterrupt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if as_if_nccl:  # the flag then goes through a gloo group of its own, made here for real
        dist.get_backend = lambda group=None: "nccl"
    args, seen = SimpleNamespace(output_dir="run"), []
    during = SaveOnInterrupt()
    during.on_train_begin(args, SimpleNamespace(), TrainerControl())
    seen.append(during._group is not None)
    for step in range(1, 5):
        during.requested |= rank == 1 and step == 2  # a signal to rank 1 alone, during step 2
        control = during.on_step_end(args, SimpleNamespace(global_step=step), TrainerControl())
        seen.append(control.should_save)
        if control.should_save:
            try:
                during.on_save(args, SimpleNamespace(global_step=step), control)
            except KeyboardInterrupt as e:
                seen.append(str(e))
                break
    after = SaveOnInterrupt()  # a signal to rank 0 alone, after the last step: both stop
    after.on_train_begin(args, SimpleNamespace(), TrainerControl())
    try:
        with after:
            after.requested = rank == 0
    except KeyboardInterrupt as e:
        seen.append(str(e))
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(seen, f)
    finish_distributed()


@pytest.mark.parametrize("as_if_nccl", [False, True])
def test_processes_agree_on_the_step_an_interrupt_stops_at(tmp_path, as_if_nccl):
    mp.spawn(_interrupt_worker, args=(2, free_port(), str(tmp_path), as_if_nccl), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [
            as_if_nccl, False, True, f"after optimizer step 2, saved as {os.path.join('run', 'checkpoint-2')}",
            "after the last optimizer step"]


def test_runs_end_with_the_process_group_torn_down(tmp_path):
    # Without the pause in finish_distributed this hung (or aborted with SIGABRT, as rank 1 did in one CI
    # run of the torchrun test) within 30 rounds, every time it was tried.
    rounds = 20
    context = mp.spawn(_finish_worker, args=(2, [free_port() for _ in range(rounds)], str(tmp_path)), nprocs=2,
                       join=False)
    deadline = time.time() + 300
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"hung: {[(tmp_path / f'{r}.txt').read_text() for r in (0, 1) if (tmp_path / f'{r}.txt').exists()]}")
    assert [(tmp_path / f"{r}.txt").read_text() for r in (0, 1)] == [f"{rounds} False"] * 2


SIGNAL_AT_STEP_5 = """
import os, signal, sys
from prilora.cli import main
from prilora.pruning import PriLoraPruner

real = PriLoraPruner.step
WHO = sys.argv.pop(1)  # "rank-1": rank 1 signals itself; "launcher": rank 1 signals torchrun, which passes it on

def step(self):
    real(self)
    if self.global_step == 5 and os.environ["RANK"] == "1":
        os.kill(os.getpid() if WHO == "rank-1" else os.getppid(), signal.SIGTERM)

PriLoraPruner.step = step
sys.exit(main(sys.argv[1:]))
"""


def test_prilora_train_under_torchrun_and_resume(tiny_model_dir, glue_dir, tmp_path):
    argv = ["train", "--task", "rte", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
            "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "8", "--epochs", "2",
            "--prune-interval", "2", "--save-steps", "4", "--keep-checkpoints", "0", "--quiet", "--json"]
    done = torchrun(*argv, "--output-dir", str(tmp_path / "full"))
    assert done.returncode == 0, rank_errors(done)
    r = json.loads((tmp_path / "full" / "results.json").read_text())
    # 64 examples, global batch 8 = 2 processes x 4: 8 steps an epoch.
    assert r["world_size"] == 2 and r["micro_batch_size"] == 4 and r["steps"] == 16
    assert r["replicas_identical"] is True and r["a_sparsity"] == 0.5 and r["eval_examples"] == {"dev": 32}
    assert len([line for line in done.stdout.splitlines() if line.startswith('{"task"')]) == 1  # rank 0 alone
    # SIGTERM to rank 1 alone, mid-epoch (a scheduler preempting one node; torchrun passing Ctrl-C on to
    # processes at different steps): both processes agree to stop, save step 5 and exit; rank 0 says so.
    script = tmp_path / "signal_at_step_5.py"
    script.write_text(SIGNAL_AT_STEP_5)
    cut = tmp_path / "cut"
    stopped = torchrun("rank-1", *argv, "--output-dir", str(cut), script=script)
    assert stopped.returncode != 0
    said = [line for line in stopped.stderr.splitlines() if line.startswith("prilora train: interrupted")]
    assert said == [f"prilora train: interrupted after optimizer step 5, saved as {cut / 'checkpoint-5'}; checkpoints "
                    f"stay in {cut}: rerun with --resume to continue"], rank_errors(stopped)
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert {"rng_state_0.pth", "rng_state_1.pth", STATE_FILE} <= {p.name for p in (cut / "checkpoint-5").iterdir()}
    assert not (cut / "results.json").exists()
    # Rank 0 hashed the checkpoint once both processes had written into it (each its own RNG state).
    listed = json.loads((cut / "checkpoint-5" / MANIFEST_FILE).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", STATE_FILE} <= set(listed)
    assert verify(str(cut / "checkpoint-5"))[0] == []
    # A copy whose file that only rank 1 reads is damaged: every process resumes from checkpoint-4.
    damaged = tmp_path / "damaged"
    shutil.copytree(cut, damaged)
    rng = damaged / "checkpoint-5" / "rng_state_1.pth"
    rng.write_bytes(rng.read_bytes()[:-1] + bytes([rng.read_bytes()[-1] ^ 1]))
    for folder, resumed_from in ((cut, "checkpoint-5"), (damaged, "checkpoint-4")):
        resumed = torchrun(*argv, "--output-dir", str(folder), "--resume")
        assert resumed.returncode == 0, rank_errors(resumed)
        rc = json.loads((folder / "results.json").read_text())
        assert rc["resumed_from"] == resumed_from and rc["steps"] == 16 and rc["metrics"] == r["metrics"]
        assert rc["replicas_identical"] is True
        a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(folder / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    said = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert said == [f"prilora: checkpoint-5 in {damaged} is damaged (rng_state_1.pth has different contents than "
                    "when it was written (SHA-256 mismatch)): resuming from checkpoint-4 (the damaged ones are "
                    "kept, renamed *.damaged, when training starts)"], resumed.stderr[-3000:]


def test_a_signal_to_torchrun_stops_every_process_at_one_checkpoint(tiny_model_dir, glue_dir, tmp_path):
    # Ctrl-C or a scheduler's SIGTERM to the launcher: torchrun passes it on to the processes, which agree
    # on a step (the one they reach together, 5 or a little later) and save it before torchrun's 30 s are up.
    script = tmp_path / "signal_at_step_5.py"
    script.write_text(SIGNAL_AT_STEP_5)
    out = tmp_path / "run"
    stopped = torchrun("launcher", "train", "--task", "rte", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
                       "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "8", "--epochs", "2",
                       "--quiet", "--output-dir", str(out), script=script)
    assert stopped.returncode != 0
    saved = [p.name for p in out.glob("checkpoint-*")]
    assert len(saved) == 1 and 5 <= int(saved[0].split("-")[1]) < 16, rank_errors(stopped)
    said = [line for line in stopped.stderr.splitlines() if line.startswith("prilora train: interrupted")]
    assert said == [f"prilora train: interrupted after optimizer step {saved[0].split('-')[1]}, saved as "
                    f"{out / saved[0]}; checkpoints stay in {out}: rerun with --resume to continue"]
    assert {"rng_state_0.pth", "rng_state_1.pth", STATE_FILE} <= {p.name for p in (out / saved[0]).iterdir()}
    assert not (out / "results.json").exists()


def test_other_processes_leave_the_folder_checks_to_rank_0(tmp_path, monkeypatch):
    # Rank 0 may already have written run.json when rank 1 looks: rank 1 must not call that a clash.
    from prilora.glue.runner import RunPaths
    from prilora.run_folder import check_output_dir

    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    for name in ("trainer_state.json", "prilora_runtime.json"):  # a complete checkpoint
        (tmp_path / "checkpoint-4" / name).write_text("{}")
    monkeypatch.setenv("RANK", "1")
    assert check_output_dir(RunPaths(output_dir=str(tmp_path), data_dir=None), spec=None) == (False, None)
    assert check_output_dir(RunPaths(output_dir=str(tmp_path), data_dir=None, resume=True), spec=None) == \
        (False, str(tmp_path / "checkpoint-4"))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(Exception, match="holds an unfinished run: pass --resume"):
        check_output_dir(RunPaths(output_dir=str(tmp_path), data_dir=None), spec=None)
