"""Ship a trained adapter: merged into its base model, or with its pruned zeros left out.

A PRILoRA adapter is a plain PEFT LoRA adapter, so most users need nothing from here. Two
things still help: a merged Transformers folder for serving without PEFT, and a sparse copy
that does not store the half (or more) of A that pruning zeroed. The sparse format is a
safetensors file holding, for each pruned matrix, a bit mask (1 bit per element) and the kept
values in row-major order; ``to_dense`` turns it back into the identical PEFT adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .manifest import MANIFEST_FILE, write_manifest
from .manifest import damage as manifest_damage
from .run_folder import RUN_FILE, missing_local_folder, read_json, unwritable

ADAPTER_CONFIG = "adapter_config.json"
DENSE_WEIGHTS = "adapter_model.safetensors"
SPARSE_WEIGHTS = "adapter_model.sparse.safetensors"
SPARSE_FORMAT = "prilora-sparse-v1"
MASK, VALUES = ".__mask", ".__values"


class AdapterError(ValueError):
    """An adapter folder or base model that cannot be used; the message says which and why."""


def check_new_folder(path: str) -> None:
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise AdapterError(f"--out {path} exists and is not empty: choose a new folder")
    if why := unwritable(path):
        raise AdapterError(f"--out {path} cannot be written ({why}): choose another folder")


@contextlib.contextmanager
def new_folder(out: str):
    """A folder to write ``out``'s files into, renamed to ``out`` once all are written. An export stopped
    midway (Ctrl-C, a full disk, a merge check that fails) leaves nothing under ``out``: a half-written
    adapter that loads would be worse than none, and would block the next try ("exists and is not empty")."""
    check_new_folder(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as os.makedirs would make it, not mkdtemp's owner-only 0o700
    try:
        yield tmp
        write_manifest(tmp)  # last: the export proves itself intact wherever it is copied
        os.rename(tmp, out)  # over an empty folder too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor], bool]:
    """The adapter's config, its weights (dense, whichever way they are stored) and whether it is sparse."""
    if not os.path.isdir(path):
        raise AdapterError(f"adapter folder {path} not found")
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise AdapterError(f"{path} holds no {ADAPTER_CONFIG}: pass the folder a PEFT adapter was saved to "
                           "(prilora train's --output-dir)")
    if why := manifest_damage(path, extra_files=False):  # files added beside an adapter do not change it
        raise AdapterError(f"{path} is damaged: {why}; restore it from a copy, or train or export it again "
                           "(prilora verify checks a folder)")
    config = read_json(config_file)
    for name, load, sparse in ((SPARSE_WEIGHTS, unpack_sparse, True), (DENSE_WEIGHTS, load_file, False),
                               ("adapter_model.bin", lambda file: torch.load(file, weights_only=True), False)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            return config, load(file), sparse
        except AdapterError:
            raise
        except Exception as e:  # safetensors, pickle and zip errors of a damaged or cut-short file
            raise AdapterError(f"{file} cannot be read ({' '.join(str(e).split())}): the file is damaged or cut "
                               "short; save or export the adapter again") from None
    raise AdapterError(f"{path} holds no adapter weights ({DENSE_WEIGHTS} or {SPARSE_WEIGHTS})")


def _is_sparse_candidate(key: str, t: torch.Tensor) -> bool:
    """Stored as mask + values when that is smaller: a LoRA matrix whose density is below 1 - 1/(8 * itemsize)."""
    if ".lora_" not in key or t.dim() != 2 or not t.is_floating_point():
        return False
    density = (t != 0).float().mean().item()
    return density < 1 - 1 / (8 * t.element_size())


def pack_sparse(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    out, shapes = {}, {}
    for key, t in tensors.items():
        t = t.contiguous()
        if not _is_sparse_candidate(key, t):
            out[key] = t
            continue
        mask = t != 0
        out[key + MASK] = torch.from_numpy(np.packbits(mask.flatten().numpy()))
        out[key + VALUES] = t[mask]  # row-major order, the mask's order
        shapes[key] = list(t.shape)
    return out, shapes


def unpack_sparse(file: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != SPARSE_FORMAT:
        raise AdapterError(f"{file} is not a {SPARSE_FORMAT} file (metadata format {meta.get('format')!r})")
    shapes = json.loads(meta["shapes"])
    stored = load_file(file)
    out = {k: v for k, v in stored.items() if not k.endswith((MASK, VALUES))}
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        bits = np.unpackbits(stored[key + MASK].numpy(), count=n).astype(bool)
        values = stored[key + VALUES]
        dense = torch.zeros(n, dtype=values.dtype)
        dense[torch.from_numpy(bits)] = values
        out[key] = dense.reshape(shape)
    return out


def _copy_side_files(src: str, dst: str, skip: tuple[str, ...]) -> None:
    """Config, prilora.json, tokenizer, README: everything but the weights (and the manifest: the new
    folder gets its own)."""
    for name in os.listdir(src):
        full = os.path.join(src, name)
        if os.path.isfile(full) and name not in skip and name != MANIFEST_FILE:
            shutil.copy2(full, os.path.join(dst, name))


def _folder_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def to_sparse(adapter: str, out: str) -> dict:
    """Write ``out`` with the adapter's pruned matrices as mask + values; returns the sizes."""
    config, tensors, sparse = read_adapter(adapter)
    if sparse:
        raise AdapterError(f"{adapter} is already sparse ({SPARSE_WEIGHTS})")
    packed, shapes = pack_sparse(tensors)
    with new_folder(out) as folder:
        save_file(packed, os.path.join(folder, SPARSE_WEIGHTS),
                  metadata={"format": SPARSE_FORMAT, "shapes": json.dumps(shapes)})
        _copy_side_files(adapter, folder, skip=(DENSE_WEIGHTS, "adapter_model.bin"))
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    lora_packed = {k: v for k, v in packed.items() if ".lora_" in k}
    return {"dense_file_bytes": os.path.getsize(os.path.join(adapter, DENSE_WEIGHTS))
            if os.path.isfile(os.path.join(adapter, DENSE_WEIGHTS)) else None,
            "sparse_file_bytes": os.path.getsize(os.path.join(out, SPARSE_WEIGHTS)),
            "lora_dense_bytes": _folder_bytes(lora), "lora_sparse_bytes": _folder_bytes(lora_packed),
            "sparse_matrices": len(shapes), "matrices": sum(1 for k in tensors if ".lora_" in k)}


def to_dense(adapter: str, out: str) -> dict:
    """Write ``out`` as a standard PEFT adapter folder (from a sparse or a dense one)."""
    config, tensors, _ = read_adapter(adapter)
    with new_folder(out) as folder:
        save_file(tensors, os.path.join(folder, DENSE_WEIGHTS), metadata={"format": "pt"})
        _copy_side_files(adapter, folder, skip=(SPARSE_WEIGHTS, DENSE_WEIGHTS, "adapter_model.bin"))
    return {"dense_file_bytes": os.path.getsize(os.path.join(out, DENSE_WEIGHTS))}


HEAD_SUFFIXES = ("classifier.weight", "classifier.out_proj.weight", "score.weight")


def trained_in_4bit(adapter: str) -> bool:
    """Whether ``prilora train-clm --load-in-4bit`` trained this adapter: its run's ``run.json``, in the
    adapter's folder (a finished run) or the one above it (a checkpoint)."""
    for folder in (adapter, os.path.dirname(os.path.abspath(adapter))):
        path = os.path.join(folder, RUN_FILE)
        if os.path.isfile(path):
            try:
                return bool(read_json(path).get("spec", {}).get("load_in_4bit", False))
            except (OSError, ValueError, AttributeError):
                return False
    return False


def load_base_for(config: dict, tensors: dict[str, torch.Tensor], base: str, dequantized_4bit: bool = False):
    """The base model class the adapter was trained on (from its task type), with the same head size.
    ``dequantized_4bit``: the base as a 4-bit NF4 run saw it (loaded in 4-bit, then dequantized), so that an
    adapter trained on it is merged into the weights it was trained with, not the full-precision ones."""
    import transformers as tf

    task_type = config.get("task_type")
    kwargs = {}
    if dequantized_4bit:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise AdapterError("this adapter was trained on a 4-bit base, which needs bitsandbytes to rebuild: "
                               'pip install "prilora[qlora]"')
        from .causal_lm import four_bit_kwargs

        kwargs.update(four_bit_kwargs())
    if task_type == "SEQ_CLS":
        cls = tf.AutoModelForSequenceClassification
        heads = [t for k, t in tensors.items() if k.endswith(HEAD_SUFFIXES)]
        if heads:
            kwargs["num_labels"] = heads[0].shape[0]
            if heads[0].shape[0] == 1:
                kwargs["problem_type"] = "regression"
    elif task_type == "CAUSAL_LM":
        cls = tf.AutoModelForCausalLM
    elif task_type == "TOKEN_CLS":
        cls = tf.AutoModelForTokenClassification
    else:
        cls = tf.AutoModel
    if missing_local_folder(base):
        raise AdapterError(f"base model folder {base} not found: pass --base with the model the adapter was trained on")
    try:
        model = cls.from_pretrained(base, **kwargs)
        return model.dequantize() if dequantized_4bit else model
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"cannot load base model {base!r} ({reason}): pass --base with a local model folder") from None


def load_peft_model(adapter: str, base: str | None = None, dequantized_4bit: bool = False):
    """PeftModel of ``adapter`` (dense or sparse) on ``base`` (default: the adapter's base_model_name_or_path),
    refusing an adapter whose weights do not all fit the base model."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    config, tensors, sparse = read_adapter(adapter)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter}'s {ADAPTER_CONFIG} names no base model: pass --base")
    model = load_base_for(config, tensors, base, dequantized_4bit)
    with tempfile.TemporaryDirectory() as tmp:
        folder = adapter
        if sparse:
            folder = os.path.join(tmp, "dense")
            to_dense(adapter, folder)
        try:
            with warnings.catch_warnings():  # PEFT warns of unmatched patterns; the checks below say it in full
                warnings.simplefilter("ignore")
                peft_model = PeftModel.from_pretrained(model, folder)
        except (RuntimeError, ValueError, KeyError) as e:
            first = " ".join(str(e).split())[:300]
            raise AdapterError(f"adapter {adapter} does not fit base model {base!r}: {first}") from None
    loaded = get_peft_model_state_dict(peft_model)
    missing = sorted(set(tensors) - set(loaded))
    if missing:
        raise AdapterError(f"adapter {adapter} does not fit base model {base!r}: {len(missing)} of its weights "
                           f"have no place there (e.g. {missing[0]})")
    for key, value in tensors.items():
        if loaded[key].shape != value.shape:
            raise AdapterError(f"adapter {adapter} does not fit base model {base!r}: {key} is "
                               f"{tuple(value.shape)} in the adapter, {tuple(loaded[key].shape)} in the model")
    peft_model.eval()
    return peft_model, base


def probe_inputs(model, batch: int = 2, length: int = 16, seed: int = 0) -> dict:
    """Fixed random token ids within the model's vocabulary: enough to compare two versions of a model."""
    vocab = getattr(model.config, "vocab_size", None) or 100
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(vocab, 1000), (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def to_merged(adapter: str, out: str, base: str | None = None) -> dict:
    """Merge the adapter into its base model (``merge_and_unload``) and save a plain Transformers folder.
    Checks that the merged model's logits equal the adapted model's on a probe batch. An adapter trained on a
    4-bit base is merged into that base dequantized (full-precision tensors holding the 4-bit values)."""
    check_new_folder(out)
    four_bit = trained_in_4bit(adapter)
    peft_model, base = load_peft_model(adapter, base, dequantized_4bit=four_bit)
    probe = probe_inputs(peft_model.base_model.model)
    with torch.no_grad():
        before = peft_model(**probe).logits
        merged = peft_model.merge_and_unload()
        merged.eval()
        after = merged(**probe).logits
    diff = (before - after).abs().max().item()
    scale = before.abs().max().item()
    if not diff <= 1e-4 * max(1.0, scale):
        raise AdapterError(f"merging changed the logits by {diff:.3g} (scale {scale:.3g}): not saved")
    with new_folder(out) as folder:
        merged.save_pretrained(folder)
        for source in (adapter, base):
            if os.path.isfile(os.path.join(source, "tokenizer_config.json")):
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(source).save_pretrained(folder)
                break
    return {"base": base, "max_abs_logit_diff": diff, "params": sum(p.numel() for p in merged.parameters()),
            "dequantized_4bit": four_bit}
