"""Checksum manifests (issue 31): every checkpoint, final adapter and export proves it is intact; a damaged
checkpoint is found byte for byte and passed over for the one before, a damaged adapter is refused, and
``prilora verify`` says what it checked."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from prilora.cli import main
from prilora.manifest import MANIFEST_FILE, verify, write_manifest
from prilora.run_folder import checkpoint_complete, last_checkpoint

EXTRA = ["--save-steps", "2", "--keep-checkpoints", "0", "--epochs", "2", "--prune-interval", "2"]  # 12 steps


def train(model, glue_dir, out, *extra):
    return main(["train", "--task", "rte", "--model", str(model), "--data-dir", str(glue_dir), "--output-dir",
                 str(out), "--max-train-samples", "48", "--max-eval-samples", "40", "--batch-size", "8",
                 "--max-seq-length", "48", "--quiet", *EXTRA, *extra])


@pytest.fixture(scope="module")
def full(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run with a checkpoint every 2 of its 12 steps, all kept."""
    from conftest import GLUE_DIR

    out = tmp_path_factory.mktemp("manifest") / "full"
    assert train(tiny_model_dir, GLUE_DIR, out) == 0
    return out


def cut_run(full, cut, *checkpoints):
    """An interrupted run's folder: run.json and the named checkpoints of the uninterrupted one."""
    cut.mkdir()
    shutil.copy(full / "run.json", cut / "run.json")
    for name in checkpoints:
        shutil.copytree(full / name, cut / name)
    return cut


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "training_args.bin", "prilora_pruner.safetensors",
                    "prilora_runtime.json", "prilora.json", "tokenizer.json", "tokenizer_config.json"}


def test_every_file_of_a_checkpoint_and_of_the_run_is_in_its_manifest(full):
    for step in range(2, 13, 2):
        folder = full / f"checkpoint-{step}"
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        assert manifest["format"] == "prilora-manifest-v1" and manifest["recursive"] is True
        assert set(manifest["files"]) == CHECKPOINT_FILES == {p.name for p in folder.iterdir()} - {MANIFEST_FILE}
        for name, entry in manifest["files"].items():  # against hashlib over the whole file, read at once
            assert entry == {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}, name
        assert json.loads((folder / "prilora_runtime.json").read_text())["manifest"] == MANIFEST_FILE
    # The run folder's own: its top-level files, the final adapter among them; the checkpoints have theirs.
    manifest = json.loads((full / MANIFEST_FILE).read_text())
    top = {p.name for p in full.iterdir() if p.is_file()} - {MANIFEST_FILE}
    assert manifest["recursive"] is False and set(manifest["files"]) == top
    assert {"adapter_model.safetensors", "adapter_config.json", "run.json", "results.json"} <= top
    assert all(manifest["files"][n]["sha256"] == sha256(full / n) for n in top)
    assert verify(str(full)) == ([], len(top), sum((full / n).stat().st_size for n in top))


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle: tensor data, not a header
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "flipped": (flip_byte, "{name} has different contents than when it was written (SHA-256 mismatch)"),
    "truncated": (truncate, "{name} has {half:,} bytes, its manifest says {size:,} (cut short or overwritten)"),
    "missing": (lambda path: path.unlink(), "{name} is missing"),
}


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "prilora_pruner.safetensors", "optimizer.pt",
                                  "scheduler.pt", "trainer_state.json"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_damage_to_each_file_of_a_checkpoint_is_found(full, tmp_path, capsys, name, damage):
    cut = cut_run(full, tmp_path / "cut", "checkpoint-4", "checkpoint-6")
    path = cut / "checkpoint-6" / name
    size = path.stat().st_size
    do, said = DAMAGES[damage]
    do(path)
    capsys.readouterr()
    assert last_checkpoint(str(cut)) == str(cut / "checkpoint-4")
    why = said.format(name=name, half=size // 2, size=size)
    assert capsys.readouterr().err == f"prilora: checkpoint-6 in {cut} is damaged ({why}): resuming from " \
        "checkpoint-4 (the damaged ones are kept, renamed *.damaged, when training starts)\n"


def test_a_file_added_to_a_checkpoint_is_found(full, tmp_path, capsys):
    cut = cut_run(full, tmp_path / "cut", "checkpoint-4", "checkpoint-6")
    shutil.copy(cut / "checkpoint-6" / "adapter_model.safetensors", cut / "checkpoint-6" / "adapter_model.bin")
    capsys.readouterr()
    assert last_checkpoint(str(cut)) == str(cut / "checkpoint-4")
    assert "checkpoint-6 in " f"{cut} is damaged (adapter_model.bin is not in its manifest (added since))" in \
        capsys.readouterr().err


def test_a_checkpoint_cut_short_while_writing_its_manifest_is_not_complete(full, tmp_path, capsys):
    cut = cut_run(full, tmp_path / "cut", "checkpoint-4", "checkpoint-6")
    manifest = cut / "checkpoint-6" / MANIFEST_FILE
    text = manifest.read_text()
    manifest.unlink()
    (cut / "checkpoint-6" / f"{MANIFEST_FILE}.tmp").write_text(text[: len(text) // 2])  # killed mid-write
    assert not checkpoint_complete(str(cut / "checkpoint-6"))
    capsys.readouterr()
    assert last_checkpoint(str(cut)) == str(cut / "checkpoint-4")
    assert capsys.readouterr().err == f"prilora: checkpoint-6 in {cut} is incomplete (the run was stopped while " \
        "saving): resuming from checkpoint-4\n"


def assert_same_adapter(a_dir, b_dir):
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_resume_passes_over_a_flipped_bit_and_ends_as_the_uninterrupted_run(full, tiny_model_dir, glue_dir,
                                                                          tmp_path, capsys):
    # The case: one bit of one float's exponent in a lora_B weight of the newest checkpoint. Its
    # safetensors header is intact, so only the manifest can tell.
    cut = cut_run(full, tmp_path / "cut", "checkpoint-4", "checkpoint-6")
    weights = cut / "checkpoint-6" / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(weights).items()}
    key = next(k for k in tensors if "lora_B" in k)
    header = int.from_bytes(weights.read_bytes()[:8], "little")
    offset = 8 + header + json.loads(weights.read_bytes()[8:8 + header])[key]["data_offsets"][0]
    data = bytearray(weights.read_bytes())
    data[offset + 3] ^= 0x40  # the top exponent bit of the first float (little endian)
    weights.write_bytes(bytes(data))
    assert not torch.equal(load_file(weights)[key], tensors[key])  # it loads, silently different
    damaged = weights.read_bytes()
    capsys.readouterr()
    assert train(tiny_model_dir, glue_dir, cut, "--resume") == 0
    err = capsys.readouterr().err
    assert f"checkpoint-6 in {cut} is damaged (adapter_model.safetensors has different contents than when it " \
           "was written (SHA-256 mismatch)): resuming from checkpoint-4" in err
    assert_same_adapter(full, cut)
    r = json.loads((cut / "results.json").read_text())
    assert r["resumed_from"] == "checkpoint-4" and r["metrics"] == json.loads((full / "results.json").read_text())["metrics"]
    # Kept for inspection, out of the way of the checkpoint the resumed run writes at step 6.
    assert (cut / "checkpoint-6.damaged" / "adapter_model.safetensors").read_bytes() == damaged
    assert verify(str(cut / "checkpoint-6"))[0] == [] and verify(str(cut))[0] == []
    assert main(["verify", str(cut / "checkpoint-6.damaged")]) == 1


def test_no_intact_checkpoint_is_exit_2_and_nothing_is_lost(full, tiny_model_dir, glue_dir, tmp_path, capsys):
    cut = cut_run(full, tmp_path / "cut", "checkpoint-4", "checkpoint-6")
    for step in (4, 6):
        flip_byte(cut / f"checkpoint-{step}" / "optimizer.pt")
    before = {p.relative_to(cut): p.read_bytes() for p in cut.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train(tiny_model_dir, glue_dir, cut, "--resume") == 2
    err = capsys.readouterr().err.strip()
    mismatch = "optimizer.pt has different contents than when it was written (SHA-256 mismatch)"
    assert err == f"prilora train: error: no checkpoint to resume from: checkpoint-4 in {cut} is damaged " \
        f"({mismatch}); checkpoint-6 in {cut} is damaged ({mismatch}); the folders are kept as they are: restore " \
        "the damaged files (or move those checkpoints away to start over), or pass --overwrite"
    assert {p.relative_to(cut): p.read_bytes() for p in cut.rglob("*") if p.is_file()} == before


def test_a_checkpoint_without_a_manifest_still_resumes_with_a_note(full, tiny_model_dir, glue_dir, tmp_path, capsys):
    cut = cut_run(full, tmp_path / "cut", "checkpoint-4")
    folder = cut / "checkpoint-4"
    (folder / MANIFEST_FILE).unlink()  # as written before manifests: a runtime file that names none
    runtime = json.loads((folder / "prilora_runtime.json").read_text())
    (folder / "prilora_runtime.json").write_text(json.dumps({"train_runtime_s": runtime["train_runtime_s"]}))
    capsys.readouterr()
    assert train(tiny_model_dir, glue_dir, cut, "--resume") == 0
    assert "prilora: checkpoint-4 has no manifest (written before checkpoints had one): its files were checked " \
           "by format, not byte for byte\n" in capsys.readouterr().err
    assert_same_adapter(full, cut)


def test_damaged_adapters_are_refused_where_they_are_read(full, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    (run / "heatmap.png").write_bytes(b"a file put beside the adapter changes nothing")
    assert main(["inspect", str(run)]) == 0
    assert main(["export", "sparse", str(run), "--out", str(tmp_path / "sparse")]) == 0
    sparse = tmp_path / "sparse"
    manifest = json.loads((sparse / MANIFEST_FILE).read_text())  # the export's own, of what it holds
    assert set(manifest["files"]) == {p.name for p in sparse.iterdir()} - {MANIFEST_FILE}
    assert "adapter_model.sparse.safetensors" in manifest["files"] and verify(str(sparse))[0] == []
    assert main(["export", "dense", str(sparse), "--out", str(tmp_path / "dense")]) == 0
    assert verify(str(tmp_path / "dense"))[0] == []
    assert_same_adapter(full, tmp_path / "dense")
    capsys.readouterr()
    for folder, name in ((run, "adapter_model.safetensors"), (sparse, "adapter_model.sparse.safetensors")):
        flip_byte(folder / name)
        why = f"{folder} is damaged: {name} has different contents than when it was written (SHA-256 mismatch); " \
              "restore it from a copy, or train or export it again (prilora verify checks a folder)"
        for argv in (["inspect", str(folder)], ["export", "dense", str(folder), "--out", str(tmp_path / "x")]):
            assert main(argv) == 2
            assert capsys.readouterr().err.strip() == f"prilora {argv[0]}: error: {why}"
        assert not (tmp_path / "x").exists()


def test_verify_says_what_it_checked(full, tmp_path, capsys):
    capsys.readouterr()
    assert main(["verify", str(full)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[:2] for line in lines] == \
        [[str(full), "intact"]] + [[str(full / f"checkpoint-{s}"), "intact"] for s in range(2, 13, 2)]
    files = len(json.loads((full / MANIFEST_FILE).read_text())["files"])
    size = sum(e["size"] for e in json.loads((full / MANIFEST_FILE).read_text())["files"].values())
    assert lines[0] == f"{full}: intact: {files} files, {size:,} bytes, as written (SHA-256)"
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / "heatmap.png").write_bytes(b"put beside the adapter: listed, not damage")
    assert main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{run}: intact: {files} files, {size:,} bytes, as written " \
        "(SHA-256); not in its manifest (added since): heatmap.png"
    truncate(run / "checkpoint-8" / "scheduler.pt")
    (run / "checkpoint-10" / "training_args.bin").unlink()
    assert main(["verify", str(run), "--json"]) == 1
    entries = {e["folder"]: e for e in map(json.loads, capsys.readouterr().out.splitlines())}
    assert entries[str(run / "checkpoint-10")]["problems"] == ["training_args.bin is missing"]
    assert entries[str(run / "checkpoint-8")]["status"] == "damaged"
    assert [e["status"] for e in entries.values()].count("intact") == 5
    # A folder written without a manifest: checked by format, and said so.
    plain = tmp_path / "plain"
    shutil.copytree(full / "checkpoint-2", plain)
    (plain / MANIFEST_FILE).unlink()
    assert main(["verify", str(plain)]) == 0
    assert capsys.readouterr().out.startswith(f"{plain}: unverified: no manifest")
    (plain / "trainer_state.json").write_text("{")
    assert main(["verify", str(plain)]) == 1
    assert capsys.readouterr().out.startswith(f"{plain}: damaged: trainer_state.json: ")
    for bad, why in ((tmp_path / "nowhere", "is not a folder"), (tmp_path, "holds no manifest, checkpoint, run")):
        assert main(["verify", str(bad)]) == 2
        assert why in capsys.readouterr().err


def test_write_manifest_lists_subfolders_only_when_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 3_000_000)  # more than one read chunk
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / "c.json.tmp").write_text("a write in progress")
    write_manifest(str(tmp_path))
    files = json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]
    assert files == {"a.bin": {"size": 3_000_000, "sha256": hashlib.sha256(b"a" * 3_000_000).hexdigest()},
                     "sub/b.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
    write_manifest(str(tmp_path), recursive=False)
    assert set(json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]) == {"a.bin"}
    (tmp_path / "sub" / "b.json").write_text("[]")  # outside a non-recursive manifest: not its business
    assert verify(str(tmp_path))[0] == []
    (tmp_path / MANIFEST_FILE).write_text("{")
    assert verify(str(tmp_path))[0][0].startswith(f"{MANIFEST_FILE} is damaged (")
