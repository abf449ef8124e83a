"""Transformers Trainer glue: a thin callback over the pruner's plain-loop methods, and the runners'
callbacks that make checkpoints safe to resume from: the training clock, the deletion of old checkpoints
once a new one is complete, and Ctrl-C turned into a checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import warnings

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .manifest import MANIFEST_FILE, write_manifest
from .pruning import STATE_FILE, PriLoraPruner
from .run_folder import (RUNTIME_FILE, checkpoint_complete, checkpoint_steps, read_json, wait_for_main_process,
                         write_json_atomic)


def checkpoint_folder(args, state) -> str:
    """The folder Trainer saves the checkpoint of the current optimizer step into."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def refuse_sharded_parameters(args) -> None:
    """DeepSpeed ZeRO stage 3 flattens each LoRA matrix into shards that cut through rows, so no process
    sees a whole row of A to rank: refuse at the start rather than prune wrongly. FSDP2 keeps rows whole
    and the pruner handles it in a plain loop; under the Trainer (accelerate's FSDP plugin, its
    checkpoints of sharded state) it is not built or tested yet, so it is refused too. ZeRO 1-2 and DDP
    keep whole parameters on every process and work."""
    if getattr(args, "fsdp", None):
        raise ValueError("PRILoRA does not support FSDP under the Trainer yet: train with DDP (torchrun / "
                         "accelerate launch), DeepSpeed ZeRO stage 1 or 2, or FSDP2 (fully_shard) in a plain "
                         "loop (docs/DISTRIBUTED.md)")
    ds = getattr(args, "hf_deepspeed_config", None)
    stage = ds.config.get("zero_optimization", {}).get("stage") if ds is not None else None
    if stage == 3:
        raise ValueError("PRILoRA does not support DeepSpeed ZeRO stage 3 (it shards the LoRA matrices that "
                         "pruning ranks): use ZeRO stage 1 or 2, or DDP")


class PriLoraCallback(TrainerCallback):
    """Drives a :class:`PriLoraPruner` from ``transformers.Trainer``.

    - learns the number of optimizer steps from ``state.max_steps``;
    - calls ``pruner.step()`` right after each optimizer step;
    - saves the pruner state into every checkpoint folder and restores it on
      ``trainer.train(resume_from_checkpoint=...)`` (looked up as
      ``output_dir/checkpoint-<step>``; pass ``resume_from`` for a checkpoint elsewhere);
    - at the end of training makes sure the final mask is in place.
    """

    def __init__(self, pruner: PriLoraPruner, resume_from: str | None = None):
        self.pruner = pruner
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, **kwargs):
        refuse_sharded_parameters(args)
        if getattr(args, "save_total_limit", None) == 1 and getattr(args, "save_strategy", None) != "no":
            warnings.warn("save_total_limit=1: Trainer deletes the previous checkpoint before PriLoraCallback "
                          "saves the pruner state into the new one, so a run killed in that moment has no "
                          "checkpoint to resume from; use save_total_limit=2 or more", RuntimeWarning, stacklevel=2)
        self.pruner.set_total_steps(state.max_steps)
        self.pruner.to(self.pruner.sites[0].weight.device)  # Trainer has placed the model; torch_compile needs it
        if state.global_step > 0 and self.pruner.global_step != state.global_step:
            folder = self.resume_from or checkpoint_folder(args, state)
            if not os.path.isfile(os.path.join(folder, STATE_FILE)):
                raise FileNotFoundError(
                    f"resuming at optimizer step {state.global_step} but {folder} holds no {STATE_FILE}: "
                    "pass PriLoraCallback(pruner, resume_from=<checkpoint folder>), or, if the run was killed "
                    "while saving this checkpoint, resume from the one before it"
                )
            self.pruner.load(folder)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = checkpoint_folder(args, state)
            if os.path.isdir(folder):
                self.pruner.save(folder)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.pruner.finalize()
        return control


class TrainingClock(TrainerCallback):
    """Training time over every part of a resumed run, and the seal of each checkpoint. Each checkpoint
    records the time trained up to it (``prilora_runtime.json``), and a run resumed from that checkpoint
    counts on from there, so a run that was stopped and resumed reports its whole training time, not its
    last part's. A checkpoint from before this record counts as 0 s.

    Registered after the callbacks that save into a checkpoint, it writes the last two files: the runtime
    (which says a manifest follows), then the manifest of every file in the folder (sizes, SHA-256), once
    every process has written its part (each writes its own RNG state)."""

    def __init__(self, resume_from: str | None = None):
        self.before = 0.0
        path = os.path.join(resume_from, RUNTIME_FILE) if resume_from else None
        if path and os.path.isfile(path):
            self.before = float(read_json(path)["train_runtime_s"])
        self._start = time.time()

    def elapsed(self) -> float:
        """Seconds trained so far, earlier parts included."""
        return self.before + time.time() - self._start

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.time()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_folder(args, state)
        wait_for_main_process()  # every process's files are in the folder before it is hashed
        if state.is_world_process_zero and os.path.isdir(folder):
            write_json_atomic(os.path.join(folder, RUNTIME_FILE),
                              {"train_runtime_s": round(self.elapsed(), 2), "manifest": MANIFEST_FILE})
            write_manifest(folder)
        return control


class KeepCheckpoints(TrainerCallback):
    """Trainer's own ``save_total_limit`` deletes the older checkpoints before the callbacks have saved into
    the new one, so a run killed then would have no complete checkpoint to resume from. This callback,
    registered after :class:`TrainingClock` (whose manifest completes a checkpoint), deletes them only once
    the new one is complete, keeping the newest ``keep`` (0: all). At the start of a resumed run it clears
    the checkpoints beyond the step it resumes from: what is left of a save cut short is deleted; a complete
    one, passed over because it is damaged, is renamed ``checkpoint-N.damaged`` and kept for inspection."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for step, folder in checkpoint_steps(args.output_dir).items():
                if step > state.global_step:
                    if checkpoint_complete(folder):
                        aside, n = f"{folder}.damaged", 1
                        while os.path.exists(aside):
                            aside, n = f"{folder}.damaged-{n}", n + 1
                        os.rename(folder, aside)
                    else:
                        shutil.rmtree(folder, ignore_errors=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.keep or not state.is_world_process_zero:
            return control
        steps = checkpoint_steps(args.output_dir)
        complete = [step for step, folder in steps.items() if checkpoint_complete(folder)]
        if state.global_step not in complete:  # the new one is not complete: keep everything
            return control
        for step, folder in steps.items():
            if step < state.global_step and step not in complete[-self.keep:]:
                shutil.rmtree(folder, ignore_errors=True)
        return control


class SaveOnInterrupt(TrainerCallback):
    """Ctrl-C, SIGTERM or a closed terminal (SIGHUP) during ``trainer.train()``: finish the optimizer step, save a
    checkpoint (the
    pruner's state goes with it when this callback comes after :class:`PriLoraCallback`), then raise
    ``KeyboardInterrupt``, so a resumed run loses no step instead of everything since the last save.

    Use as a context manager around ``trainer.train()``; it handles the signals only inside it and only in
    the main thread. More signals while it saves are ignored: a sweep and a terminal may both send one,
    and torchrun passes its own on; SIGKILL still stops at once.

    In a distributed run (torchrun, accelerate launch) the processes may see a signal at different steps,
    or only one of them may get it, so after every optimizer step they agree whether any was signalled
    (an all-reduce of one flag, on a CPU group: no GPU synchronisation), and all save the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False  # this process was signalled
        self.stopped = False  # all processes agreed to stop: the checkpoint of this step is (being) saved
        self._old: dict = {}
        self._group = None  # the process group the flag is all-reduced in (None: the default one)
        self._device = "cpu"  # where the flag lives for that group
        self._distributed = False

    def __enter__(self):
        self.requested = self.stopped = False  # a new train() call: an earlier stop is over
        if self.enabled and threading.current_thread() is threading.main_thread():
            # A signal the process ignores stays ignored (a shell starts background jobs ignoring SIGINT;
            # nohup ignores SIGHUP).
            self._old = {s: signal.signal(s, self._request) for s in self.SIGNALS
                         if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
        # The signal came after the last step: stop all the same (every process returned from train(), so
        # every process reaches this agreement; after an error some may not, so none is attempted then).
        if exc[0] is None and self._agree():
            self.stopped = True
            raise KeyboardInterrupt("after the last optimizer step")

    def _request(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            try:
                print("stopping after this optimizer step, with a checkpoint to resume from", file=sys.stderr,
                      flush=True)
            # The terminal that closed (SIGHUP) cannot be written to (OSError); a signal that lands while the
            # run itself writes to stderr re-enters that stream's buffer (RuntimeError). Stop all the same:
            # an exception here would surface inside the training step and lose it.
            except (OSError, RuntimeError):
                pass

    def _agree(self) -> bool:
        """Whether any process was signalled; in a distributed run every process must call this together."""
        if not self._distributed:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.requested)], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def on_train_begin(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if self.enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._distributed = True
            if dist.get_backend() != "gloo":
                # NCCL would need the flag on the GPU and a synchronisation every step; a gloo group keeps it on
                # CPU. Where gloo cannot connect, the default group it is, at that cost.
                try:
                    self._group = dist.new_group(backend="gloo")
                except RuntimeError:
                    self._device = args.device
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self.stopped and self._agree():
            self.stopped = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.stopped:
            if self._distributed:  # no process leaves before every one has written its part of the checkpoint
                import torch.distributed as dist

                dist.barrier(group=self._group)
            raise KeyboardInterrupt(
                f"after optimizer step {state.global_step}, saved as {checkpoint_folder(args, state)}")
        return control
