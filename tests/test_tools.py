"""The tools' command lines: plot_metrics.py, benchmark.py and the micro-benchmarks."""
import json
import os
import re
import types

import pytest
import torch

from helpers import ROOT, run_tool
from utils import uses_glibc_malloc

pytestmark = pytest.mark.cli

PLOT = os.path.join(ROOT, "tools", "plot_metrics.py")


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


BENCH = os.path.join(ROOT, "tools", "benchmark.py")
# A tiny MG-SSAF and a tiny timm net at 64px, one timed step each: checks the table and JSON,
# not the speeds.
TINY_BENCH = ["--img-size", "64", "--steps", "1", "--warmup", "1", "--batch-size", "2",
              "--train-batch-size", "2", "--threads", "1"]
TINY_MGSSAF = """BASE: ["{base}"]
MODEL:
  NAME: mg_ssaf_pico
  MGSSAF: {{EMBED_DIM: 24, DEPTHS: [1, 1, 1, 1], NUM_HEADS: [1, 6, 6, 2], HEAD_HIDDEN_DIM: 64}}
"""


def test_benchmark_table_and_json(tmp_path):
    cfg = tmp_path / "MG-SSAF-pico.yaml"
    cfg.write_text(TINY_MGSSAF.format(base=os.path.join(ROOT, "configs", "MG-SSAF",
                                                        "MG-SSAF-T.yaml")))
    out = tmp_path / "bench.json"
    result = run_tool(BENCH, "--cfg", str(cfg), "--opts", "MODEL.NUM_CLASSES", "10",
                      "--peers", "test_resnet", *TINY_BENCH, "--rounds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "test_resnet (round 2): train" in result.stderr
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| model | params (M) | GFLOPs | infer img/s | train img/s")
    assert "infer x test_resnet" in table[0] and len(table) == 2 + 2
    assert table[0].endswith("| infer GFLOP/s | infer % peak | train GFLOP/s | train % peak |")
    assert "GEMM peak" in result.stderr
    assert table[2].startswith("| MG-SSAF-pico |") and table[3].startswith("| test_resnet |")

    report = json.loads(out.read_text())
    assert report["reference"] == "test_resnet" and report["failed"] == []
    assert report["settings"]["infer_batch"] == 2 and report["settings"]["device"] == "cpu"
    assert report["settings"]["keep_freed_memory"] is True
    peak = report["settings"]["gemm_peak_gflop_s"]
    assert peak == max(report["settings"]["gemm_mm_gflop_s"],
                       report["settings"]["gemm_conv1x1_gflop_s"]) > 0
    assert report["table"] == result.stdout.strip()
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"MG-SSAF-pico", "test_resnet"}
    for row in rows.values():
        for key in ("infer_img_s", "train_img_s", "infer_mem_mb", "train_mem_mb", "gflops"):
            assert row[key] >= 0, (row["model"], key)
        assert 0.1 < row["params_m"] < 1
        # achieved FLOP/s: 2 FLOPs per multiply-add, a training step as 3 forward passes
        assert row["infer_gflop_s"] == pytest.approx(2 * row["gflops"] * row["infer_img_s"])
        assert row["train_gflop_s"] == pytest.approx(6 * row["gflops"] * row["train_img_s"])
        for phase in ("infer", "train"):
            assert row[f"{phase}_peak_frac"] == pytest.approx(row[f"{phase}_gflop_s"] / peak)
        kept = uses_glibc_malloc()
        assert row["infer_kept_freed_memory"] is row["train_kept_freed_memory"] is kept
        for phase in ("infer", "train"):  # the median of the two rounds
            assert len(row[f"{phase}_img_s_rounds"]) == 2
            assert row[f"{phase}_img_s"] == pytest.approx(sum(row[f"{phase}_img_s_rounds"]) / 2)
    assert rows["test_resnet"]["infer_ratio"] == rows["test_resnet"]["train_ratio"] == 1.0
    assert rows["MG-SSAF-pico"]["infer_ratio"] > 0


def test_benchmark_rejects_unknown_peer_and_config(tmp_path):
    result = run_tool(BENCH, "--cfg", "--peers", "no_such_net", *TINY_BENCH)
    assert result.returncode != 0 and "no_such_net" in result.stderr
    missing = str(tmp_path / "missing.yaml")
    result = run_tool(BENCH, "--cfg", missing, "--peers", *TINY_BENCH)
    assert result.returncode != 0 and missing in result.stderr
    result = run_tool(BENCH, "--opts", "MODEL.NO_SUCH_KEY", "1", "--peers", *TINY_BENCH)
    assert result.returncode != 0 and "MODEL.NO_SUCH_KEY" in result.stderr


def test_benchmark_names_an_input_size_the_model_refuses():
    result = run_tool(BENCH, "--cfg", os.path.join(ROOT, "configs", "MG-SSAF", "MG-SSAF-T.yaml"),
                      "--peers", *TINY_BENCH, "--img-size", "100")
    assert result.returncode == 1
    assert ("benchmark: error: DATA.IMG_SIZE (command line) must be a multiple of 32 (the "
            "network's stride), got 100") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_compile_trains_the_compiled_model(tmp_path):
    """A whole MG-SSAF training step (forward, backward, AdamW) through torch.compile, timed
    against eager by tools/bench_compile.py: compiles and runs (minutes with an empty Inductor
    cache on 2 cores), and the tool prints both runners' times and their ratio."""
    cfg = tmp_path / "MG-SSAF-pico.yaml"
    cfg.write_text(TINY_MGSSAF.format(base=os.path.join(ROOT, "configs", "MG-SSAF",
                                                        "MG-SSAF-T.yaml")))
    result = run_tool(os.path.join(ROOT, "tools", "bench_compile.py"), "--cfg", str(cfg),
                      "--opts", "MODEL.NUM_CLASSES", "10", "--img-size", "64", "--steps", "1",
                      "--warmup", "1", "--train-batch-size", "2", "--threads", "2",
                      timeout=None)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].endswith(f"freed memory kept: {uses_glibc_malloc()}")
    assert lines[-1].startswith("MG-SSAF-pico train float32 batch 2: eager ")
    assert re.search(r"compiled [\d.]+ s/step \([\d.]+ img/s\); compiled/eager speed [\d.]+x$",
                     lines[-1]), lines[-1]


def test_bench_compile_rejects_unknown_model_config_and_keys(tmp_path):
    tool = os.path.join(ROOT, "tools", "bench_compile.py")
    result = run_tool(tool, "--model", "no_such_net")
    assert result.returncode == 2 and "--model: timm has no model 'no_such_net'" in result.stderr
    missing = str(tmp_path / "missing.yaml")
    result = run_tool(tool, "--cfg", missing)
    assert result.returncode == 2 and missing in result.stderr
    result = run_tool(tool, "--cfg", "configs/MG-SSAF/MG-SSAF-T.yaml", "--opts",
                      "MODEL.NO_SUCH_KEY", "1")
    assert result.returncode == 2 and "MODEL.NO_SUCH_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_tool(tool, "--img-size", "100", "--steps", "1")  # before anything compiles
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "bench_compile.py: error: DATA.IMG_SIZE 100 must be a multiple of 32" in result.stderr


def test_bench_compile_help_says_the_default_phase_and_every_default():
    """--help says that by default only the training step is timed (inference takes --phases
    infer), and every option has a help text with its default."""
    result = run_tool(os.path.join(ROOT, "tools", "bench_compile.py"), "--help")
    assert result.returncode == 0, result.stderr
    description = " ".join(result.stdout.split("options:")[0].split())
    assert ("training step (AdamW; the default, ``--phases train``) and inference "
            "(``--phases infer``, or ``--phases train infer`` for both)") in description
    options = re.split(r"\n(?=  -)", result.stdout.split("options:\n")[1])
    assert len(options) > 10 and options[0].startswith("  -h, --help")
    for option in (" ".join(option.split()) for option in options[1:]):
        assert "(default: " in option, f"no help text with the default: {option}"


LOADER_SPEED = os.path.join(ROOT, "tools", "loader_speed.py")


def test_loader_speed_times_batches_after_the_warmup_of_a_whole_epoch():
    """--warmup untimed batches, then --batches timed ones: an epoch of 3 batches (the digits'
    1,437 training images in batches of 479) holds --warmup 1 --batches 2, and not 1 + 3."""
    from data.digits import digits_split
    assert len(digits_split()[0]) == 3 * 479
    cfg = os.path.join(ROOT, "configs", "demo", "MG-SSAF-nano-digits.yaml")
    args = [LOADER_SPEED, "--cfg", cfg, "--epochs", "1", "--warmup", "1", "--opts", "DATA.BATCH_SIZE", "479",
            "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0"]
    result = run_tool(*args, "--batches", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0 workers, batch 479, 32px: "), result.stdout
    result = run_tool(*args, "--batches", "3")
    assert result.returncode == 1 and result.stderr == (
        "loader_speed.py: error: --warmup + --batches is 4, more than the 3 batches of an epoch "
        "(DATA.BATCH_SIZE 479)\n")
    result = run_tool(*args, "--batches", "2", "--warmup", "0")
    assert result.returncode == 2 and "--warmup must be at least 1, got 0" in result.stderr


def test_loader_speed_counts_the_images_of_the_timed_batches_only(monkeypatch):
    """time_epoch: the clock starts when the --warmup-th batch has arrived and stops at the last
    timed one; only the timed batches' images count, and no batch after them is drawn."""
    from tools import loader_speed

    class Loader:
        def __init__(self, sizes):
            self.sizes, self.drawn, self.epochs = sizes, 0, []
            self.sampler = types.SimpleNamespace(set_epoch=self.epochs.append)

        def __iter__(self):
            for size in self.sizes:
                self.drawn += 1
                yield torch.zeros(size, 1), None

    clock = iter([10.0, 13.0])  # start, then end: 3 s
    monkeypatch.setattr(loader_speed.time, "perf_counter", lambda: next(clock))
    loader = Loader([1, 2, 4, 8, 16, 32])
    assert loader_speed.time_epoch(loader, 5, warmup=2, batches=2) == (4 + 8) / 3.0
    assert loader.drawn == 4 and loader.epochs == [5]


def test_loader_speed_refuses_a_segmentation_config():
    """It measures the classification loaders only, and says so for a segmentation config."""
    cfg = os.path.join(ROOT, "configs", "seg", "upernet_mg_ssaf_t_512x512_160k_ade20k.yaml")
    result = run_tool(LOADER_SPEED, "--cfg", cfg, "--data-path", ROOT)
    assert result.returncode == 1 and result.stderr == (
        f"loader_speed.py: error: {cfg} is a segmentation config (DATA.DATASET 'ade20k', "
        "main_seg.py): loader_speed.py measures the classification training loaders only "
        "(DATA.DATASET 'imagenet', 'cub' or 'digits', main.py's)\n")


def test_bench_attention_times_both_paths_at_every_stage():
    result = run_tool(os.path.join(ROOT, "tools", "bench_attention.py"), "--batch-size", "1",
                      "--repeats", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert rows[0].startswith("| stage (map, local heads) | fwd ops | fwd fused |")
    # MG-SSAF-T: 3 local heads on 56x56, 3 on 28x28, 6 on 14x14, 24 on 7x7; every stage fused
    assert [r.split("|")[1].strip() for r in rows[2:]] == [
        "0 (56x56, 3)", "1 (28x28, 3)", "2 (14x14, 6)", "3 (7x7, 24)"]
    for row in rows[2:]:
        assert row.count("x |") == 2, row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_depthwise_times_both_implementations_at_every_shape(dtype):
    result = run_tool(os.path.join(ROOT, "tools", "bench_depthwise.py"), "--batch-size", "1",
                      "--repeats", "1", "--threads", "1", "--dtype", dtype)
    assert result.returncode == 0, result.stderr
    assert ("bfloat16 autocast" in result.stderr) == (dtype == "bfloat16"), result.stderr
    rows = result.stdout.strip().splitlines()
    assert rows[0].startswith("| shape (C x H x W, kernel) | fwd | bwd nn.Conv2d |")
    # MG-SSAF-T's ConvMlp: a 3x3 on C and a 7x7 on 2C channels per stage; only 7x7 is fast
    assert [r.split("|")[1].strip() for r in rows[2:]] == [
        f"{c}x{s}x{s} 3x3 (no fast path)" if k == 3 else f"{c}x{s}x{s} 7x7"
        for stage in range(4) for c, s, k in ((96 << stage, 56 >> stage, 3),
                                               (192 << stage, 56 >> stage, 7))]
    for row in rows[2:]:
        assert row.endswith("x |"), row


def test_mutation_check_smoke_one_mutant_is_caught():
    """tools/mutation_check.py applies a mutant in a scratch copy, and its test catches it (the
    whole list is run before resolving an issue; see tests/mutants.py)."""
    with open(os.path.join(ROOT, "config.py"), encoding="utf-8") as f:
        before = f.read()
    result = run_tool("tools/mutation_check.py", "--only", "released-names-ignored",
                      timeout=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "caught   released-names-ignored" in result.stdout
    assert result.stdout.rstrip().endswith("1 of 1 mutants caught")
    with open(os.path.join(ROOT, "config.py"), encoding="utf-8") as f:
        assert f.read() == before  # the mutant was applied to a scratch copy only


def test_every_mutant_applies_to_exactly_one_place():
    """A refactoring that moves the code a mutant breaks must move the mutant too (otherwise
    tools/mutation_check.py reports it as not applicable instead of testing the property)."""
    import mutants
    for mutant in mutants.MUTANTS:
        with open(os.path.join(ROOT, mutant.file), encoding="utf-8") as f:
            assert f.read().count(mutant.old) == 1, (mutant.name, mutant.file)


def test_benchmark_times_a_slow_call_once():
    """A peak measurement whose warm-up call takes longer than the budget (a bfloat16 product
    on a CPU without bfloat16 kernels takes about a minute) is that call; faster ones are
    repeated and the fastest timed call counts."""
    import time

    import torch

    from tools.benchmark import _best_seconds

    calls = []
    seconds = _best_seconds(lambda: (calls.append(1), time.sleep(0.05)), torch.device("cpu"),
                            repeats=5, budget=0.01)
    assert len(calls) == 1 and seconds >= 0.05
    calls.clear()  # a fast warm-up is not a measurement: later calls take 20 ms
    seconds = _best_seconds(lambda: (calls.append(1), len(calls) > 1 and time.sleep(0.02)),
                            torch.device("cpu"), repeats=5, budget=1.0)
    assert len(calls) == 6 and 0.02 <= seconds < 1.0
