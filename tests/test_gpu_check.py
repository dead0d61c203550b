"""tools/gpu_check.py: its CUDA plan (commands, the compiled row, the merged table) in process, and
the whole tool on the CPU (``--device cpu``: the same steps, small) as a command line."""
import json
import os

import pytest
import torch

from helpers import ROOT, run_tool
from tools import gpu_check

TOOL = os.path.join(ROOT, "tools", "gpu_check.py")


def test_cuda_plan_is_the_issues_check():
    args = gpu_check.parse_args([])
    assert args.device == "cuda" and args.train_dtypes == ["float16", "bfloat16"]
    assert args.bench_dtypes == ["float32", "bfloat16"] and args.batch_size == 128
    assert [os.path.basename(c) for c in args.cfg] == [f"MG-SSAF-{v}.yaml" for v in "TSB"]
    assert args.peers == ["swin_tiny_patch4_window7_224", "convnext_tiny"] and args.compiled
    args.nproc = 8
    cmd = gpu_check.train_command(args, "float16", "out", "tag")
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and "main.py" in cmd
    assert cmd[cmd.index("--device") + 1] == "cuda"
    opts = cmd[cmd.index("--opts") + 1:]
    assert dict(zip(opts[::2], opts[1::2])) == {
        "TRAIN.EPOCHS": "1", "TRAIN.WARMUP_EPOCHS": "0", "TRAIN.AUTO_RESUME": "false",
        "AMP_ENABLE": "true", "AMP_DTYPE": "float16", "PRINT_FREQ": "1", "SAVE_FREQ": "1"}
    # one epoch of the digits' 1437 training images makes at least the steps asked for
    for nproc in (1, 2, 8):
        batch = gpu_check.train_batch_size(nproc, args.train_steps)
        assert gpu_check.DEMO_TRAIN_IMAGES // nproc // batch >= args.train_steps
    compiled = gpu_check.bench_command(args, "bfloat16", args.cfg[:1], [],
                                       gpu_check.COMPILED_OPTS, "x.json")
    assert compiled[compiled.index("--opts") + 1:] == ["MODEL.MGSSAF.LOCAL_ATTENTION", "compiled"]
    assert compiled[compiled.index("--batch-size") + 1] == "128"
    assert compiled[compiled.index("--device") + 1] == "cuda"


def _report(rows, reference):
    return {"rows": rows, "reference": reference, "settings": {"gemm_peak_gflop_s": 1000.0}}


def _row(model, infer, train):
    return {"model": model, "infer_img_s": infer, "train_img_s": train, "gflops": 1.0}


def test_merged_table_puts_the_compiled_row_after_its_eager_twin():
    main = _report([_row("MG-SSAF-T", 100.0, 40.0), _row("MG-SSAF-S", 60.0, 20.0),
                    _row("swin", 50.0, 20.0)], "swin")
    compiled = _report([_row("MG-SSAF-T", 150.0, 30.0)], None)
    merged = gpu_check.merge_tables(main, compiled, "configs/MG-SSAF/MG-SSAF-T.yaml")
    assert [r["model"] for r in merged["rows"]] == [
        "MG-SSAF-T", "MG-SSAF-T (compiled local attention)", "MG-SSAF-S", "swin"]
    assert merged["compiled_over_ops"] == {"infer": 1.5, "train": 0.75}
    row = merged["rows"][1]
    assert row["infer_ratio"] == 3.0 and row["train_ratio"] == 1.5  # to swin
    assert row["infer_gflop_s"] == 300.0 and row["infer_peak_frac"] == 0.3
    lines = merged["table"].splitlines()
    assert len(lines) == 2 + 4 and lines[3].startswith("| MG-SSAF-T (compiled local attention) |")
    assert gpu_check.merge_tables(main, None, "")["compiled_over_ops"] is None


def test_bad_settings_are_command_line_errors(capsys):
    for argv in (["--opts", "MODEL.DROP_RATE"], ["--steps", "0"], ["--skip", "nothing"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(argv)
        assert exit_info.value.code == 2
    assert "--opts expects KEY VALUE pairs" in capsys.readouterr().err


@pytest.mark.cli
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_says_so():
    result = run_tool(TOOL, "--skip", "golden", "train", "bench")
    assert result.returncode == gpu_check.NO_CUDA_EXIT_CODE
    assert "no CUDA device is available" in result.stderr and "--device cpu" in result.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_the_whole_check_runs_on_the_cpu(tmp_path, reference_dir):
    """Golden tests, a 2-process gloo training in bfloat16 autocast and a small table: the tool's
    plumbing on the CPU (the compiled row is left out: Inductor's C++ compilation of every stage
    takes minutes here; its table logic is the merged-table test's)."""
    out = tmp_path / "check"
    result = run_tool(TOOL, "--device", "cpu", "--out", str(out), "--no-compiled",
                      "--reference-dir", reference_dir, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    summary = result.stdout[result.stdout.index("gpu_check summary:"):].splitlines()
    assert [line.split()[:2] for line in summary[1:4]] == [
        ["golden", "PASS"], ["train-bfloat16", "PASS"], ["bench-float32", "PASS"]]
    assert "2 passed" in summary[1] and "on 2 process(es) (gloo, AMP bfloat16)" in summary[2]
    assert "| MG-SSAF-T |" in result.stdout and "| convnext_tiny |" in result.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] is True and report["failed"] == []
    train = next(r for r in report["results"] if r["step"] == "train-bfloat16")
    assert train["optimizer_steps"] >= 2 and train["processes"] == 2
    assert "| bench-float32 | pass |" in (out / "gpu_check.md").read_text()

    # a failing step: exit code 1, FAIL in the summary, the end of its log on stderr
    result = run_tool(TOOL, "--device", "cpu", "--out", str(out), "--skip", "golden", "bench",
                      "--train-opts", "MODEL.NO_SUCH_KEY", "1", timeout=300)
    assert result.returncode == 1
    assert "train-bfloat16  FAIL" in result.stdout and "FAILED: train-bfloat16" in result.stdout
    assert f"--- the end of {out / 'train-bfloat16.log'}" in result.stderr
    assert "MODEL.NO_SUCH_KEY" in (out / "train-bfloat16.log").read_text()
