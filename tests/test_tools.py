"""tools/plot_metrics.py and tools/benchmark.py through their command lines."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "tools", "plot_metrics.py")


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def write_metrics(run_dir, epochs: int) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for epoch in range(epochs):
            f.write(json.dumps({"epoch": epoch, "train_loss": 2.3 / (epoch + 1), "lr": 1e-3,
                                "val_loss": 2.0 / (epoch + 1), "acc1": 20.0 + 10 * epoch,
                                "acc5": 60.0, "epoch_time": 3.0, "images_per_sec": 40.0}) + "\n")


def test_plot_metrics_overlays_runs(tmp_path):
    write_metrics(tmp_path / "a", 3)
    write_metrics(tmp_path / "b", 5)
    out = tmp_path / "fig" / "metrics.png"
    result = run_tool(PLOT, str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = run_tool(PLOT, str(tmp_path / "a"))  # one run: the PNG goes beside its metrics
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a" / "metrics.png").is_file()


def test_plot_metrics_names_the_missing_or_empty_file(tmp_path):
    result = run_tool(PLOT, str(tmp_path / "absent"))
    assert result.returncode != 0 and str(tmp_path / "absent") in result.stderr

    (tmp_path / "nothing").mkdir()
    result = run_tool(PLOT, str(tmp_path / "nothing"))
    assert result.returncode != 0
    assert os.path.join(str(tmp_path / "nothing"), "metrics.jsonl") in result.stderr

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    result = run_tool(PLOT, str(tmp_path / "empty"))
    assert result.returncode != 0 and "empty" in result.stderr
    assert not (tmp_path / "empty" / "metrics.png").exists()
