"""One command that checks MG-SSAF on a GPU machine: the golden tests on CUDA, NCCL training with
AMP float16 and bfloat16, and the benchmark's CUDA tables (about 6 minutes on one H100).

    python tools/gpu_check.py                          # every GPU of the machine
    python tools/gpu_check.py --out gpu_check --nproc 2
    python tools/gpu_check.py --skip bench             # golden tests and training only
    python tools/gpu_check.py --device cpu             # the same steps, scaled down, on the CPU

Steps, each in subprocesses, each reported pass or fail (a failing step does not stop the next):

1. ``golden``: ``tests/test_model.py::test_golden_logits`` with ``MGSSAF_TEST_DEVICE=cuda``:
   the golden logits on the GPU (float64 to 1e-9, float32 without TF32 to 1e-4), in PyTorch ops
   and through the compiled local attention (MODEL.MGSSAF.LOCAL_ATTENTION compiled), and
   ``tests/test_local_attention.py``'s compiled-against-ops test (outputs and gradients, Triton
   against the eager CUDA ops). Needs the golden files (../shared/reference or --reference-dir).
2. ``train-float16``, ``train-bfloat16``: ``torchrun --nproc_per_node <GPUs> main.py`` on the
   digits demo (configs/demo/MG-SSAF-nano-digits.yaml, which makes its own data), one epoch with
   AMP in that dtype and a batch per process that makes about ``--train-steps`` optimizer steps;
   NCCL on CUDA. Passes when the run exits 0 with finite losses and a metrics line.
3. ``bench-float32``, ``bench-bfloat16``: ``tools/benchmark.py --device cuda`` at batch 128 (224
   px, channels-last) for MG-SSAF-T/S/B against swin_tiny_patch4_window7_224 and convnext_tiny,
   and MG-SSAF-T again with ``--opts MODEL.MGSSAF.LOCAL_ATTENTION compiled``: its row and its
   speed over the eager MG-SSAF-T tell whether the compiled local attention should become the
   default (docs/performance.md).

Prints a pass/fail summary and the tables, writes them to ``<out>/gpu_check.json`` and
``<out>/gpu_check.md`` (step logs beside them). Exit codes: 0 every step passed, 1 a step failed,
2 bad command line, 3 no CUDA device (without ``--device cpu``).

``--device cpu`` runs the same steps small, to check the tool itself (tests/test_gpu_check.py):
golden tests on the CPU, 2 gloo processes with bfloat16 autocast at 32 px, and a float32 table
of MG-SSAF-T and convnext_tiny at 64 px, batch 2 (each default can be changed: see --help).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NO_CUDA_EXIT_CODE = 3
STEPS = ("golden", "train", "bench")
DEMO_CFG = os.path.join("configs", "demo", "MG-SSAF-nano-digits.yaml")
DEMO_TRAIN_IMAGES = 1437  # the digits' training split (data/digits.py)
CFG_DIR = os.path.join("configs", "MG-SSAF")
COMPILED_OPTS = ["MODEL.MGSSAF.LOCAL_ATTENTION", "compiled"]
COMPILED_SUFFIX = " (compiled local attention)"
GOLDEN_TESTS = {"cuda": ["tests/test_model.py::test_golden_logits",
                         "tests/test_local_attention.py::test_compiled_equals_the_ops_with_gradients"],
                # on the CPU the compiled path's test is part of the suite (Inductor's C++, slow)
                "cpu": ["tests/test_model.py::test_golden_logits"]}
# The settings of each device: (CUDA, the checked machine; CPU, a small run of the tool itself).
DEFAULTS = {
    "cuda": dict(train_dtypes=["float16", "bfloat16"], train_steps=5, train_opts=[],
                 bench_dtypes=["float32", "bfloat16"], batch_size=128, img_size=224, steps=10,
                 warmup=3, cfg=[os.path.join(CFG_DIR, f"MG-SSAF-{v}.yaml") for v in "TSB"],
                 peers=["swin_tiny_patch4_window7_224", "convnext_tiny"], timeout=900),
    # 32 px training and a float32 table: bfloat16 is emulated on CPUs without AVX-512 bf16, and
    # the benchmark's bfloat16 GEMM-peak measurement alone then takes minutes
    "cpu": dict(train_dtypes=["bfloat16"], train_steps=2, train_opts=["DATA.IMG_SIZE", "32"],
                bench_dtypes=["float32"],
                batch_size=2, img_size=64, steps=1, warmup=1,
                cfg=[os.path.join(CFG_DIR, "MG-SSAF-T.yaml")], peers=["convnext_tiny"],
                timeout=900),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: Sequence[str], log: str, timeout: float,
               env: Optional[dict] = None) -> tuple[Optional[int], float]:
    """Runs ``cmd`` in the repository with stdout and stderr to the file ``log``; returns (exit
    code, seconds), exit code None after ``timeout`` (then SIGTERM, which torchrun passes to its
    ranks, and SIGKILL to the process group 30 s later)."""
    start = time.time()
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        process = subprocess.Popen(list(cmd), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            code: Optional[int] = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = None
    return code, time.time() - start


def tail(path: str, lines: int = 25) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def ended(code: Optional[int], timeout: float) -> str:
    return f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"


# -- 1. golden tests ----------------------------------------------------------------------------
def golden_step(args: argparse.Namespace) -> dict:
    log = os.path.join(args.out, "golden.log")
    env = {"MGSSAF_TEST_DEVICE": args.device}
    if args.reference_dir:
        env["MGSSAF_REFERENCE_DIR"] = os.path.abspath(args.reference_dir)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           *GOLDEN_TESTS[args.device]]
    code, seconds = run_logged(cmd, log, args.timeout, env)
    text = tail(log, 400)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    detail = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or ended(code, args.timeout)
    ok = code == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    if code == 0 and counts.get("skipped"):
        detail += " (a skipped golden test checks nothing: see the log for why)"
    return dict(step="golden", ok=ok, seconds=seconds, detail=detail, log=log, counts=counts)


# -- 2. NCCL (gloo) training of the digits demo --------------------------------------------------
def train_batch_size(nproc: int, steps: int) -> int:
    """The batch per process that makes at least ``steps`` optimizer steps of one epoch of the
    digits' training split on ``nproc`` processes."""
    return max(1, DEMO_TRAIN_IMAGES // (nproc * steps))


def train_command(args: argparse.Namespace, dtype: str, output: str, tag: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(args.nproc), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "main.py", "--cfg", DEMO_CFG,
            "--output", output, "--tag", tag, "--device", args.device,
            "--batch-size", str(train_batch_size(args.nproc, args.train_steps)),
            "--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.AUTO_RESUME", "false",
            "AMP_ENABLE", "true", "AMP_DTYPE", dtype, "PRINT_FREQ", "1", "SAVE_FREQ", "1",
            *args.train_opts]


def train_step(args: argparse.Namespace, dtype: str) -> dict:
    name = f"train-{dtype}"
    log = os.path.join(args.out, f"{name}.log")
    output = os.path.join(args.out, "train")
    tag = f"{dtype}-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run folder: nothing to resume
    code, seconds = run_logged(train_command(args, dtype, output, tag), log, args.timeout)
    folder = os.path.join(output, "mg_ssaf_nano_digits", tag)
    backend = "nccl" if args.device == "cuda" else "gloo"
    result = dict(step=name, ok=False, seconds=seconds, log=log, run_folder=folder,
                  backend=backend, processes=args.nproc)
    rank0 = os.path.join(folder, "log_rank0.txt")
    metrics_file = os.path.join(folder, "metrics.jsonl")
    if code != 0 or not os.path.isfile(rank0) or not os.path.isfile(metrics_file):
        result["detail"] = ended(code, args.timeout) + (
            "" if os.path.isfile(rank0) else f"; no {rank0}")
        return result
    with open(rank0, encoding="utf-8") as f:
        losses = [float(v) for v in re.findall(r"Train: \[0/1\]\[\d+/\d+\].*?\bloss (\S+) ",
                                                f.read())]
    with open(metrics_file, encoding="utf-8") as f:
        metrics = json.loads(f.read().strip().splitlines()[-1])
    updates = metrics.get("num_updates")
    finite = bool(losses) and all(math.isfinite(v) for v in losses + [metrics["train_loss"]])
    result.update(ok=finite, optimizer_steps=updates, losses=losses, acc1=metrics.get("acc1"),
                  train_loss=metrics.get("train_loss"),
                  detail=(f"{updates} optimizer steps on {args.nproc} process(es) ({backend}, "
                          f"AMP {dtype}), loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                          f"val Acc@1 {metrics.get('acc1', float('nan')):.1f}%"
                          if losses else "no training step was logged")
                  + ("" if finite else "; a loss is not finite"))
    return result


# -- 3. the benchmark's tables -------------------------------------------------------------------
def bench_command(args: argparse.Namespace, dtype: str, cfgs: Sequence[str],
                  peers: Sequence[str], opts: Sequence[str], json_path: str) -> list[str]:
    cmd = [sys.executable, os.path.join("tools", "benchmark.py"), "--device", args.device,
           "--dtype", dtype, "--batch-size", str(args.batch_size),
           "--train-batch-size", str(args.batch_size), "--img-size", str(args.img_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--channels-last",
           "--no-models-in-subprocess", "--json", json_path, "--cfg", *cfgs, "--peers", *peers]
    if args.device == "cpu":
        cmd += ["--threads", "1"]
    if opts:
        cmd += ["--opts", *opts]
    return cmd


def compiled_name(cfg: str) -> str:
    return os.path.splitext(os.path.basename(cfg))[0] + COMPILED_SUFFIX


def merge_tables(main: dict, compiled: Optional[dict], compiled_cfg: str) -> dict:
    """One table from benchmark.py's JSON reports: the rows of ``main`` with the compiled run's
    row (renamed, after its eager twin), ratios to ``main``'s reference model and efficiency
    against ``main``'s GEMM peak; ``compiled_over_ops``: its img/s over the eager twin's."""
    from tools.benchmark import add_efficiency, add_ratios, markdown_table

    rows = [dict(row) for row in main["rows"]]
    twin_name = os.path.splitext(os.path.basename(compiled_cfg))[0]
    speedup = None
    if compiled is not None and compiled.get("rows"):
        row = dict(compiled["rows"][0], model=compiled_name(compiled_cfg))
        index = next((i for i, r in enumerate(rows) if r["model"] == twin_name), len(rows) - 1)
        rows.insert(index + 1, row)
        twin = rows[index] if rows[index]["model"] == twin_name else None
        if twin is not None:
            speedup = {phase: (row[f"{phase}_img_s"] / twin[f"{phase}_img_s"]
                               if row.get(f"{phase}_img_s") and twin.get(f"{phase}_img_s")
                               else None) for phase in ("infer", "train")}
    reference = main.get("reference")
    add_ratios(rows, reference)
    add_efficiency(rows, main["settings"]["gemm_peak_gflop_s"])
    return dict(rows=rows, reference=reference, table=markdown_table(rows, reference),
                compiled_over_ops=speedup, settings=main["settings"])


def bench_step(args: argparse.Namespace, dtype: str) -> dict:
    name = f"bench-{dtype}"
    result = dict(step=name, ok=False, seconds=0.0)
    reports = {}
    runs = [("main", args.cfg, args.peers, args.opts)]
    if args.compiled and args.cfg:
        runs.append(("compiled", args.cfg[:1], [], [*args.opts, *COMPILED_OPTS]))
    failures = []
    for kind, cfgs, peers, opts in runs:
        log = os.path.join(args.out, f"{name}-{kind}.log")
        json_path = os.path.join(args.out, f"{name}-{kind}.json")
        if os.path.exists(json_path):
            os.remove(json_path)
        code, seconds = run_logged(bench_command(args, dtype, cfgs, peers, opts, json_path), log,
                                   args.timeout)
        result["seconds"] += seconds
        result[f"log_{kind}"] = log
        if os.path.isfile(json_path):
            with open(json_path, encoding="utf-8") as f:
                reports[kind] = json.load(f)
        if code != 0 or kind not in reports:
            failures.append(f"{kind} run: {ended(code, args.timeout)} (log {log})")
    if "main" in reports:
        merged = merge_tables(reports["main"], reports.get("compiled"),
                              args.cfg[0] if args.cfg else "")
        result.update(table=merged["table"], rows=merged["rows"],
                      reference=merged["reference"], compiled_over_ops=merged["compiled_over_ops"],
                      settings=merged["settings"])
    speedup = result.get("compiled_over_ops")
    detail = [f"{len(result.get('rows', []))} rows"]
    if speedup and all(speedup.values()):
        detail.append(f"compiled local attention / ops: infer {speedup['infer']:.2f}x, "
                      f"train {speedup['train']:.2f}x")
    result.update(ok=not failures, detail="; ".join(detail + failures))
    return result


# -- the run ------------------------------------------------------------------------------------
def summary_lines(results: list[dict]) -> list[str]:
    width = max(len(r["step"]) for r in results)
    return [f"{r['step']:<{width}}  {'PASS' if r['ok'] else 'FAIL'}  {r['seconds']:6.0f} s  "
            f"{r['detail']}" for r in results]


def markdown_report(results: list[dict], settings: dict) -> str:
    lines = ["# tools/gpu_check.py", "", f"{settings['device_name']}; torch {settings['torch']}; "
             f"{settings['nproc']} training process(es); {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| step | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {r['step']} | {'pass' if r['ok'] else 'FAIL'} | {r['seconds']:.0f} | "
              f"{r['detail']} |" for r in results]
    for r in results:
        if r.get("table"):
            s = r["settings"]
            lines += ["", f"## {r['step']}", "", f"{s['device_name']}, {s['dtype']}, batch "
                      f"{s['infer_batch']} inference / {s['train_batch']} training, "
                      f"{s['img_size']} px, channels-last, median of {s['steps']} steps after "
                      f"{s['warmup']} warm-up steps; GEMM peak {s['gemm_peak_gflop_s']:.0f} "
                      "GFLOP/s", "", r["table"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults (CUDA / --device cpu): " + "; ".join(
            f"{key.replace('_', '-')} {DEFAULTS['cuda'][key]} / {DEFAULTS['cpu'][key]}"
            for key in DEFAULTS["cuda"]))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the check) or cpu (a small run of the same steps, to test "
                             "the tool)")
    parser.add_argument("--out", default=os.path.join("output", "gpu_check"), metavar="DIR",
                        help="folder of the report (gpu_check.json, gpu_check.md), the steps' "
                             "logs and the training runs")
    parser.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="steps to leave out")
    parser.add_argument("--nproc", type=int, default=0,
                        help="training processes (0: one per GPU; 2 on the CPU)")
    parser.add_argument("--reference-dir", default="", metavar="DIR",
                        help="folder of the golden files (default: ../shared/reference beside "
                             "the checkout, or MGSSAF_REFERENCE_DIR)")
    parser.add_argument("--train-dtypes", nargs="+", choices=("float16", "bfloat16"),
                        help="AMP dtypes of the training runs")
    parser.add_argument("--train-steps", type=int,
                        help="optimizer steps (at least) of each training run: one epoch of "
                             "the digits with the batch per process that makes them")
    parser.add_argument("--train-opts", nargs="+", metavar="KEY VALUE",
                        help="training: more config overrides of main.py (after the check's own)")
    parser.add_argument("--bench-dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
                        help="benchmark tables, one per autocast dtype")
    parser.add_argument("--batch-size", type=int, help="benchmark batch (inference and training)")
    parser.add_argument("--img-size", type=int, help="benchmark input size")
    parser.add_argument("--steps", type=int, help="benchmark: timed steps per model and phase")
    parser.add_argument("--warmup", type=int,
                        help="benchmark: untimed steps first (the compiled row compiles in them)")
    parser.add_argument("--cfg", nargs="*", metavar="YAML",
                        help="benchmark: MG-SSAF configs; the first is also run with the "
                             "compiled local attention")
    parser.add_argument("--peers", nargs="*", metavar="TIMM_NAME",
                        help="benchmark: timm models; ratios are to the first")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="benchmark: config overrides for every --cfg")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="benchmark the first --cfg with MODEL.MGSSAF.LOCAL_ATTENTION "
                             "compiled too")
    parser.add_argument("--timeout", type=float, help="seconds allowed to each subprocess")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("train_steps", "batch_size", "img_size", "steps", "nproc", "timeout"):
        if getattr(args, name) < (0 if name == "nproc" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least "
                         f"{0 if name == 'nproc' else 1}, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    for name in ("opts", "train_opts"):
        if len(getattr(args, name)) % 2:
            parser.error(f"--{name.replace('_', '-')} expects KEY VALUE pairs, got "
                         f"{getattr(args, name)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device is available here (torch "
              f"{torch.__version__}, torch.cuda.is_available() is False): run it on a GPU "
              "machine, or with --device cpu to check the tool itself", file=sys.stderr)
        return NO_CUDA_EXIT_CODE
    if args.nproc == 0:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.device == "cuda":
        device_name = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        from utils import cpu_model

        device_name = f"{cpu_model()}, {os.cpu_count()} logical cores"
    settings = dict(device=args.device, device_name=device_name, torch=torch.__version__,
                    nproc=args.nproc, args=vars(args))
    print(f"gpu_check: {device_name}, torch {torch.__version__}; report in {args.out}",
          file=sys.stderr, flush=True)

    plan = []
    if "golden" not in args.skip:
        plan.append(("golden", lambda: golden_step(args)))
    if "train" not in args.skip:
        plan += [(f"train-{d}", lambda d=d: train_step(args, d)) for d in args.train_dtypes]
    if "bench" not in args.skip:
        plan += [(f"bench-{d}", lambda d=d: bench_step(args, d)) for d in args.bench_dtypes]
    results = []
    for name, run in plan:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        result = run()
        results.append(result)
        print(f"    {'PASS' if result['ok'] else 'FAIL'} in {result['seconds']:.0f} s: "
              f"{result['detail']}", file=sys.stderr, flush=True)
        if not result["ok"]:
            for key in ("log", "log_main", "log_compiled"):
                if result.get(key) and os.path.isfile(result[key]):
                    print(f"    --- the end of {result[key]}:\n" + tail(result[key], 60),
                          file=sys.stderr, flush=True)
    if not results:
        print("gpu_check: every step skipped", file=sys.stderr)
        return 0
    print("\n".join(["", "gpu_check summary:"] + summary_lines(results)))
    for result in results:
        if result.get("table"):
            print(f"\n{result['step']} (ratios to {result['reference']}):\n{result['table']}")
    failed = [r["step"] for r in results if not r["ok"]]
    report = dict(settings=settings, results=results, failed=failed, passed=not failed)
    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(results, settings))
    print(f"\n{'all ' + str(len(results)) + ' steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}"
          f"; wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
