"""Folders that prove they are intact: a manifest of every file's size and SHA-256.

Safetensors checks its header, not its data, and Trainer checks nothing, so a bit flipped on disk or a
copy cut short loads without a word and trains on from damaged weights. Every checkpoint, final adapter
and export that prilora writes gets ``prilora_manifest.json``, written last and atomically; resuming,
exporting and inspecting verify it first. It is plain JSON, and ``sha256sum`` gives the same digests, so
it can be checked without prilora too.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST_FILE = "prilora_manifest.json"
FORMAT = "prilora-manifest-v1"
_CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _ignored(name: str) -> bool:
    """The manifest itself and the temporary files of atomic writes."""
    return name.startswith(MANIFEST_FILE) or name.endswith(".tmp")


def folder_files(folder: str, recursive: bool) -> list[str]:
    """The files a manifest of ``folder`` covers, as sorted '/'-separated relative paths. A run folder's
    manifest is not recursive: its checkpoints have their own."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        for name in files:
            if root == folder and _ignored(name):
                continue
            if os.path.isfile(os.path.join(root, name)):  # not a dangling link
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
        if not recursive:
            break
    return sorted(found)


def write_manifest(folder: str, recursive: bool = True) -> str:
    """Hash the files of ``folder`` and write its manifest atomically (a temporary file, flushed to disk,
    renamed): a manifest under its name is always whole. Call it when everything else is written."""
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)),
                   "sha256": file_sha256(os.path.join(folder, rel))} for rel in folder_files(folder, recursive)}
    path = os.path.join(folder, MANIFEST_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "recursive": recursive, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself on disk
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST_FILE))


def check(folder: str) -> tuple[list[str], list[str], int, int]:
    """Check ``folder`` against its manifest, reading it once: (problems, files added since, files checked,
    bytes checked). A problem is one short phrase per file: missing, a different size, different contents
    (or a manifest that cannot be read). A folder without a manifest has nothing to check: ask
    :func:`has_manifest` first."""
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE} is damaged ({' '.join(str(e).split()) or type(e).__name__})"], [], 0, 0
    problems, checked, size_checked = [], 0, 0
    for rel, entry in sorted(files.items()):
        full = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
            continue
        size = os.path.getsize(full)
        if size != entry["size"]:
            problems.append(f"{rel} has {size:,} bytes, its manifest says {entry['size']:,} (cut short or overwritten)")
            continue
        if file_sha256(full) != entry["sha256"]:
            problems.append(f"{rel} has different contents than when it was written (SHA-256 mismatch)")
        checked += 1
        size_checked += size
    added = [rel for rel in folder_files(folder, bool(manifest.get("recursive", True))) if rel not in files]
    return problems, added, checked, size_checked


def verify(folder: str, extra_files: bool = True) -> tuple[list[str], int, int]:
    """:func:`check` as (problems, files checked, bytes checked), where with ``extra_files`` a file the
    manifest does not list is a problem too."""
    problems, added, checked, size_checked = check(folder)
    if extra_files:
        problems += [f"{rel} is not in its manifest (added since)" for rel in added]
    return problems, checked, size_checked


def damage(folder: str, extra_files: bool = True) -> str | None:
    """Why ``folder`` does not match its manifest, in one line (the first problems), or None. None also
    for a folder without a manifest."""
    if not has_manifest(folder):
        return None
    problems = verify(folder, extra_files)[0]
    if not problems:
        return None
    more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
    return "; ".join(problems[:2]) + more
