"""A run's output folder: what it was started with, whether it may be resumed, its results file.

Shared by ``prilora train`` (GLUE) and ``prilora train-clm``: a finished run is never touched
without ``--overwrite``, a resume must ask for exactly the settings the run was started with,
one process at a time trains in a folder, and results are written atomically as strict JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from importlib import metadata

import torch

from .manifest import damage as manifest_damage
from .manifest import check, has_manifest, verify

RUN_FILE, RESULTS_FILE = "run.json", "results.json"


class RunError(Exception):
    """Bad input to a run; the message says what was wrong and what to do (the CLI exits with 2)."""


def complete_spec(cls, recorded: dict) -> dict:
    """A spec recorded by an older version, with the fields added since at their defaults (and its
    PRILoRA options likewise), so that adding an option does not make old runs look different."""
    from .config import PriLoraConfig

    out = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    out.update(recorded)
    if out.get("prilora"):
        out["prilora"] = json.loads(json.dumps(PriLoraConfig.from_dict(out["prilora"]).to_dict()))
    return out


STOP_WITH_ENV = "PRILORA_STOP_WITH_PID"  # set by prilora sweep for its runs: its own process id


def stop_with_parent() -> None:
    """A run that ``prilora sweep`` started gets SIGINT, and saves a checkpoint, when the sweep dies, even
    by SIGKILL (an OOM kill, ``kill -9``, a CI timeout), on Linux (PR_SET_PDEATHSIG). The run has its own
    session (the sweep passes a terminal's Ctrl-C on itself), so without this it would train on alone,
    holding its folder. Set here, after exec: a preexec_fn is unsafe in a process with threads."""
    parent = os.environ.pop(STOP_WITH_ENV, None)  # not for this run's own children
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the sweep died before the line above
        os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def quiet_loading(enabled: bool = True):
    """Loading a model says nothing the run's own header does not: transformers' load report (a new task
    head is expected when fine-tuning), its weight-loading bar, and PEFT's use of an attribute that
    transformers deprecates (``is_gradient_checkpointing``: a FutureWarning about PEFT's code, not the
    user's). Errors still raise, and prilora's own warnings still show. ``--verbose``: all of it."""
    from transformers.utils import logging

    if not enabled:
        yield
        return

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or the only process): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for_main_process() -> None:
    """A barrier once torch.distributed is up (the Trainer's arguments start it); nothing otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish_distributed() -> None:
    """Wait until rank 0 has written its files, then tear the process group down on every process.

    Gloo's worker threads free a finished collective's tensors under the GIL, just after the collective
    returns. If the process exits, or the group is freed (a C++ join that holds the GIL) before they can,
    the process aborts (SIGABRT) or hangs: both seen under torchrun here. The pause hands them the GIL.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        wait_for_main_process()
        time.sleep(0.1)
        dist.destroy_process_group()


def train_stoppably(trainer, interrupt, resume_from: str | None):
    """``trainer.train()`` inside ``interrupt``'s signal handlers (a :class:`SaveOnInterrupt` among the
    trainer's callbacks). When the processes of a distributed run agreed to stop, each tears the process
    group down before the ``KeyboardInterrupt`` goes on, as at the end of a run, so none aborts on exit."""
    try:
        with interrupt:
            return trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        if interrupt.stopped:
            finish_distributed()
        raise


def micro_batch_size(batch_size: int, accumulation: int) -> int:
    """Per-process micro-batch, so that processes x micro-batches x this = the recipe's batch."""
    world = launched_world_size()
    if accumulation < 1 or batch_size % (accumulation * world):
        raise RunError(f"the batch size {batch_size} does not split into {world} process(es) x "
                       f"{accumulation} micro-batch(es): pass --batch-size divisible by {accumulation * world}")
    return batch_size // (accumulation * world)


def precision_args(precision: str) -> dict:
    if precision == "fp16" and not torch.cuda.is_available():
        raise RunError("--precision fp16 needs a GPU (fp16 autocast on CPU is not supported): use bf16 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def unwritable(folder: str) -> str | None:
    """Why ``folder`` could not be created or written to (its nearest existing parent is a file, or not
    writable), or None. Creates nothing: commands ask before hours of work, not when saving after it."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is a file"
    return None if os.access(path, os.W_OK) else f"{path} is not writable"


def check_output_dir(paths, spec) -> tuple[bool, str | None]:
    """Check the output folder against the request, changing nothing yet (a run that then fails on
    its data or model loses nothing). Returns (replace the folder?, checkpoint to resume from)."""
    out = paths.output_dir
    if not is_main_process():
        # Rank 0 checks and prepares the folder (and may already have written run.json): the other
        # processes only need the checkpoint to resume from; a refusal on rank 0 stops them all.
        return False, last_checkpoint(out) if paths.resume and os.path.isdir(out) else None
    run_file, results_file = os.path.join(out, RUN_FILE), os.path.join(out, RESULTS_FILE)
    if os.path.isfile(out):
        raise RunError(f"--output-dir {out} is a file: pass a folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return False, None
    if not os.path.isfile(run_file):
        raise RunError(f"--output-dir {out} is not empty and holds no prilora run ({RUN_FILE}): "
                       "choose a new or empty folder")
    if paths.overwrite:
        return True, None
    if os.path.isfile(results_file):
        raise RunError(f"{out} already holds a finished run ({RESULTS_FILE}): "
                       "pass --overwrite to replace it, or choose another --output-dir")
    if not paths.resume:
        raise RunError(f"{out} holds an unfinished run: pass --resume to continue it, or --overwrite to start over")
    started = complete_spec(type(spec), read_json(run_file)["spec"])
    started, wanted = _flatten(started), _flatten(json.loads(json.dumps(spec.to_dict())))
    changed = sorted(k for k in set(started) | set(wanted) if started.get(k) != wanted.get(k))
    if changed:
        detail = "; ".join(f"{k}: {started.get(k)} -> {wanted.get(k)}" for k in changed)
        raise RunError(f"cannot resume {out}: it was started with other settings ({detail}); "
                       "resume with the same flags, or pass --overwrite to start over")
    return False, last_checkpoint(out)


@contextlib.contextmanager
def hold_output_dir(out: str):
    """Keep the output folder to this run while it runs (main process): a second run on the same folder (the
    same command in another terminal; ``--resume``, or ``--overwrite`` that would delete a folder being
    written) stops at once with a RunError. An ``flock`` on the folder itself: no lock file, and it ends with
    the process, even a killed one. Folders made here for a run that fails before writing to them are removed."""
    if is_main_process() and not os.path.isfile(out) and (why := unwritable(out)):  # a file: check_output_dir
        raise RunError(f"--output-dir {out} cannot be written ({why}): choose another folder")
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is None or not is_main_process() or os.path.isfile(out):  # a file: check_output_dir says so
        yield
        return
    created, folder = [], os.path.abspath(out)  # the folders made here, the run's own first
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(out, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"--output-dir {out} is in use by another prilora process that is training there: "
                           "let it finish (or stop it), then run this again, or choose another --output-dir") from None
        except OSError:  # a file system without flock (some network mounts): run unguarded, as before
            pass
        try:
            yield
        finally:
            for folder in created:
                if os.listdir(folder):
                    break
                os.rmdir(folder)
    finally:
        os.close(fd)


def holding_output_dir(run):
    """``run(spec, paths)`` inside :func:`hold_output_dir` of ``paths.output_dir``."""
    @functools.wraps(run)
    def wrapper(spec, paths):
        with hold_output_dir(paths.output_dir):
            return run(spec, paths)
    return wrapper


def prepare_output_dir(paths, replace: bool, record: dict) -> bool:
    """On the main process: empty the folder if asked, create it and write run.json once. Returns whether
    this process is the main one (the only one that writes)."""
    import shutil

    if not is_main_process():
        return False
    if replace:  # its contents, not the folder: hold_output_dir's lock is on the folder
        for entry in os.scandir(paths.output_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    os.makedirs(paths.output_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(paths.output_dir, RUN_FILE)):
        write_json_atomic(os.path.join(paths.output_dir, RUN_FILE), record)
    return True


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finite_or_none(value):
    """NaN and infinities as null: strict JSON that jq and other tools can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # Trainer's checkpoint folders
RUNTIME_FILE = "prilora_runtime.json"  # the time trained up to a checkpoint; the last file it gets


def checkpoint_steps(out: str) -> dict[int, str]:
    """The checkpoint folders in ``out`` by optimizer step."""
    found = {}
    for name in os.listdir(out) if os.path.isdir(out) else []:
        match = CHECKPOINT_NAME.fullmatch(name)
        if match and os.path.isdir(os.path.join(out, name)):
            found[int(match.group(1))] = os.path.join(out, name)
    return dict(sorted(found.items()))


def checkpoint_complete(folder: str) -> bool:
    """Whether saving ``folder`` finished. Trainer writes trainer_state.json last of its files, then the
    callbacks write theirs (the pruner's state), the clock's prilora_runtime.json after them, and its
    manifest last of all (:class:`~prilora.callback.TrainingClock`). The runtime file says that a manifest
    follows, so a run killed between the two leaves a checkpoint that is not taken as complete; one
    written before manifests existed (a runtime file that says nothing of one) is complete without it."""
    if has_manifest(folder):
        return True
    runtime = os.path.join(folder, RUNTIME_FILE)
    if not (os.path.isfile(os.path.join(folder, "trainer_state.json")) and os.path.isfile(runtime)):
        return False
    try:
        with open(runtime) as f:
            return "manifest" not in json.load(f)
    except (OSError, ValueError):
        return True  # complete by the old rule; checkpoint_damage names the damaged file


def checkpoint_damage(folder: str) -> str | None:
    """Why a complete checkpoint cannot be read back (a file cut short or corrupted on disk since it was
    written), or None: JSON files parse, safetensors headers cover their files, and torch's zip archives
    (optimizer, scheduler, RNG state) pass their checksums. It reads every byte, which costs little next
    to the resumed training (a LoRA checkpoint is a few megabytes); a flipped bit in a safetensors file's
    tensor data goes unseen (that format keeps no checksum)."""
    import zipfile

    from safetensors import safe_open

    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                with safe_open(path, framework="pt"):
                    pass
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad:
                    return f"{name}: {bad} fails its checksum"
        except Exception as e:  # each library has its own error type for a damaged file
            return f"{name}: {' '.join(str(e).split()) or type(e).__name__}"
    return None


def last_checkpoint(out: str) -> str | None:
    """The newest complete, intact checkpoint in ``out``: resuming from one cut short by a kill (its
    optimizer state or pruner state missing or half written), or damaged on disk since, would fail or go
    wrong. A checkpoint with a manifest is verified byte for byte (SHA-256); an older one without, by its
    files' formats. Newer ones passed over are named, with the reason, in one line. When checkpoints are
    there but every complete one is damaged, nothing is resumed and nothing is deleted: a RunError."""
    steps = checkpoint_steps(out)
    passed = []  # (folder name, why) of newer checkpoints that cannot be resumed from
    chosen, damaged = None, False
    for folder in reversed(steps.values()):
        if not checkpoint_complete(folder):
            passed.append((os.path.basename(folder), "incomplete (the run was stopped while saving)"))
        elif why := manifest_damage(folder) if has_manifest(folder) else checkpoint_damage(folder):
            passed.append((os.path.basename(folder), f"damaged ({why})"))
            damaged = True
        else:
            chosen = folder
            break
    what = "; ".join(f"{name} in {out} is {why}" for name, why in reversed(passed))
    if damaged and chosen is None:
        raise RunError(f"no checkpoint to resume from: {what}; the folders are kept as they are: restore the "
                       "damaged files (or move those checkpoints away to start over), or pass --overwrite")
    if is_main_process():
        if passed:
            moved = " (the damaged ones are kept, renamed *.damaged, when training starts)" if damaged else ""
            print(f"prilora: {what}: " + (f"resuming from {os.path.basename(chosen)}{moved}" if chosen else
                                          "no complete checkpoint, starting over"), file=sys.stderr, flush=True)
        if chosen and not has_manifest(chosen):
            print(f"prilora: {os.path.basename(chosen)} has no manifest (written before checkpoints had one): its files "
                  "were checked by format, not byte for byte", file=sys.stderr, flush=True)
    return chosen


def verify_tree(path: str) -> list[dict]:
    """``prilora verify``: check a run folder (its final files and each checkpoint), a checkpoint, or an
    adapter or export folder, against their manifests. One entry per folder: ``status`` is "intact"
    (every byte as written), "damaged", "incomplete" (a checkpoint whose save was cut short), or
    "unverified" (no manifest: written before manifests, or by another tool; its files were read back
    by format, and ``problems`` says if one fails). ``added``: files beside a finished adapter that its
    manifest does not cover (in a checkpoint such a file is a problem)."""
    if not os.path.isdir(path):
        raise RunError(f"{path} is not a folder: pass a run folder, a checkpoint or an adapter folder")
    checkpoints = checkpoint_steps(path)
    finished = os.path.isfile(os.path.join(path, RESULTS_FILE))
    folders = [path] if has_manifest(path) or finished or not checkpoints else []
    folders += list(checkpoints.values())
    if not has_manifest(path) and not checkpoints and not any(
            os.path.isfile(os.path.join(path, f)) for f in (RUN_FILE, "adapter_config.json", "config.json")):
        raise RunError(f"{path} holds no manifest, checkpoint, run or adapter: nothing to verify")
    out = []
    for folder in folders:
        entry = {"folder": folder, "files": 0, "bytes": 0, "problems": [], "added": []}
        if has_manifest(folder):
            # A file added to a checkpoint is damage (resuming may read it); one put beside a finished adapter
            # (a plot) changes nothing that loads: listed, not counted against it.
            if folder in checkpoints.values():
                entry["problems"], entry["files"], entry["bytes"] = verify(folder)
            else:
                entry["problems"], entry["added"], entry["files"], entry["bytes"] = check(folder)
            entry["status"] = "damaged" if entry["problems"] else "intact"
        elif folder in checkpoints.values() and not checkpoint_complete(folder):
            entry["status"] = "incomplete"
        else:
            why = checkpoint_damage(folder)
            entry["status"], entry["problems"] = ("damaged", [why]) if why else ("unverified", [])
        out.append(entry)
    return out


def read_json(path: str) -> dict:
    """A JSON file a run or an adapter keeps (run.json, results.json, adapter_config.json): a damaged one
    is a one-line error that names it, not a traceback."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path} is damaged (not JSON: {e}): restore it, or move its folder away") from None


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(finite_or_none(data), f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("prilora", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}


def missing_local_folder(model: str) -> bool:
    """A path (not a hub id such as ``org/name``) that does not exist: say so instead of the hub's error."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1) and not os.path.isdir(os.path.expanduser(model))
