"""Throughput and peak memory of MG-SSAF configs and timm peers, measured in one run.

For every model: inference img/s (forward under ``torch.inference_mode``), training img/s (forward,
cross-entropy, backward, AdamW step) and peak memory of each phase, with the parameter count and
the multiply-add count (GFLOPs in the papers' sense) of one image. Speeds are the median over
``--steps`` timed steps after ``--warmup`` untimed ones, with CUDA synchronised around each step.
Peak memory, over the timed steps, is the CUDA allocator peak on GPU (weights included) and, on
CPU, the growth of the process's peak resident set over its size before the warm-up (with
``--keep-freed-memory``, the default, freed memory stays resident, so this includes the warm-up's
high-water mark). Each (model, phase) runs in a fresh subprocess by default, so no model's memory
or allocator state leaks into another's figures. With ``--rounds N`` the whole sequence of
measurements runs N times and each figure is the median over the rounds (peak memory: the
largest): on a shared machine a busy moment then hits every model alike instead of one row.

Efficiency: once per run the tool measures the machine's matrix-multiply peak in the benchmark's
dtype (the faster of a large ``torch.mm`` and a large 1x1 convolution under the same autocast,
on the same device and threads; see ``gemm_peak_gflops``) and
reports for every row the achieved FLOP/s (2 FLOPs per multiply-add; a training step counted as 3
forward passes: forward, input gradients, weight gradients) and its fraction of that peak, which
carries over between machines better than img/s does.

Prints a markdown table with every model's ratio to the first peer and writes the same as JSON.

    python tools/benchmark.py                                  # MG-SSAF-T/S/B vs Swin-T, ConvNeXt-T
    python tools/benchmark.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --peers resnet50 --threads 1
    python tools/benchmark.py --device cuda --dtype bfloat16 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils import cpu_model, keep_freed_memory, synchronize  # noqa: E402

DEFAULT_CFGS = [os.path.join("configs", "MG-SSAF", f"MG-SSAF-{v}.yaml") for v in "TSB"]
DEFAULT_PEERS = ["swin_tiny_patch4_window7_224", "convnext_tiny"]
# Default batch sizes (inference, training) per device type: the CPU and GPU settings.
DEFAULT_BATCH = {"cpu": (16, 8), "cuda": (128, 128)}
PHASES = ("infer", "train")
ROW_PREFIX = "BENCHMARK_ROW "  # how a worker subprocess hands its result line to the parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchmarkError(ValueError):
    """A model, config or option the benchmark cannot use."""


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def device_description(device: torch.device) -> str:
    """The GPU's or CPU's name, for the table's caption."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} logical cores"


def model_specs(cfgs: Sequence[str], peers: Sequence[str], opts: Sequence[str],
                peers_flag: str = "--peers") -> list[str]:
    """``cfg:<yaml>`` and ``timm:<name>`` specs, checked before anything runs (an unknown timm
    name is an error naming ``peers_flag``, the flag that gave it)."""
    import timm

    from config import load_config

    for path in cfgs:
        load_config(path, opts)  # a missing file or a bad key fails here, naming the file and key
    for name in peers:
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise BenchmarkError(f"{peers_flag}: timm has no model {name!r}"
                                 + (f" (similar: {', '.join(close)})" if close else ""))
    return [f"cfg:{p}" for p in cfgs] + [f"timm:{n}" for n in peers]


def spec_name(spec: str) -> str:
    kind, source = spec.split(":", 1)
    return os.path.splitext(os.path.basename(source))[0] if kind == "cfg" else source


def build_benchmark_model(spec: str, img_size: int, opts: Sequence[str]) -> nn.Module:
    """An MG-SSAF from its config (``--opts`` applied, then DATA.IMG_SIZE) or a timm model."""
    kind, source = spec.split(":", 1)
    if kind == "cfg":
        from config import load_config
        from models import build_model

        return build_model(load_config(source, opts, flags={"DATA.IMG_SIZE": img_size}))
    import timm

    if img_size != 224:
        try:  # transformers need the size; convolutional nets take any size and no such argument
            return timm.create_model(source, pretrained=False, img_size=img_size)
        except TypeError:
            pass
    return timm.create_model(source, pretrained=False)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakMemory:
    """Peak memory in MB since the last ``reset()``: the CUDA allocator peak (everything allocated,
    weights included), or on CPU the peak resident set's growth over the resident set when this
    object was made. On Linux the peak is reset through /proc/self/clear_refs; where that is not
    allowed, getrusage's ru_maxrss (monotonic over the process) stands in for it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        self.exact = self._clear_peak()
        self.start_kb = _proc_status_kb("VmRSS") if self.exact else self._peak_kb()

    def _clear_peak(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
            return True
        except OSError:
            return False

    def _peak_kb(self) -> int:
        if self.exact:
            return _proc_status_kb("VmHWM")
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, else kB

    def reset(self) -> None:
        """Forget the peak so far (the baseline of the CPU growth stays)."""
        self._clear_peak()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0, self._peak_kb() - self.start_kb) / 1024


def median_step_seconds(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Median wall time of ``steps`` calls of ``step`` (CUDA synchronised around each)."""

    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int,
                  budget: float = 10.0) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one warm-up call; a warm-up over
    ``budget`` seconds is the measurement (minute-long bfloat16 products on CPUs without
    bfloat16 kernels)."""
    best = float("inf")
    for call in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        if call or seconds > budget:
            best = min(best, seconds)
        if seconds > budget:
            break
    return best


def gemm_peak_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """The machine's matrix-multiply peak in GFLOP/s (2 FLOPs per multiply-add) in ``dtype``, as
    the faster of the two GEMM libraries PyTorch calls: ``torch.mm`` of 2048 x 2048 matrices
    (MKL or OpenBLAS on CPU, cuBLAS on CUDA) and a 1024 -> 1024-channel 1x1 convolution of a
    16 x 16 x 16 channels-last batch under autocast to ``dtype``, as MG-SSAF runs it
    (``models.conv``: oneDNN on CPU, through float32 on CPUs without bfloat16 kernels; cuDNN on
    CUDA). On AMD CPUs MKL runs AVX2 code while oneDNN runs AVX-512, so the two can differ by 2x;
    models reach one or the other."""
    from models.conv import Conv2d

    n = 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    mm = 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), device, repeats) / 1e9
    batch, c, size = 16, 1024, 16
    x = torch.randn(batch, c, size, size, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    layer = Conv2d(c, c, 1, bias=False, device=device).to(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        seconds = _best_seconds(lambda: layer(x), device, repeats)
    conv = 2 * batch * size * size * c * c / seconds / 1e9
    return {"peak": max(mm, conv), "mm": mm, "conv1x1": conv}


def add_efficiency(rows: list[dict], peak_gflops: float) -> None:
    """``<phase>_gflop_s`` (achieved) and ``<phase>_peak_frac`` (of the GEMM peak) per row; a
    training step counts 3 forward passes. None where img/s or the FLOP count is missing."""
    for row in rows:
        for phase, passes in (("infer", 1), ("train", 3)):
            speed, gmacs = row.get(f"{phase}_img_s"), row.get("gflops")
            achieved = 2 * passes * gmacs * speed if speed and gmacs else None
            row[f"{phase}_gflop_s"] = achieved
            row[f"{phase}_peak_frac"] = achieved / peak_gflops if achieved else None


def bench_phase(spec: str, phase: str, args: argparse.Namespace) -> dict:
    """One model's row for one phase: speed, peak memory, and (inference) params and GFLOPs."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and device.type == "cpu" and keep_freed_memory()
    torch.manual_seed(0)
    infer_batch, train_batch = batch_sizes(args, device)
    batch = infer_batch if phase == "infer" else train_batch
    model = build_benchmark_model(spec, args.img_size, args.opts)
    row: dict = {"model": spec_name(spec), "spec": spec, f"{phase}_kept_freed_memory": kept}
    if phase == "infer":
        from tools.model_info import count_gmacs, count_params

        row["params_m"] = count_params(model) / 1e6
        size = (args.img_size, args.img_size)
        row["gflops"] = count_gmacs(model, size) if args.flops else None  # one CPU forward
    model = model.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    runner = torch.compile(model) if args.compile else model

    if phase == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                runner(images)
    else:
        model.train()
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        criterion = nn.CrossEntropyLoss()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = criterion(runner(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    # Memory counts from here (optimizer state included), its peak over the timed steps (on CPU
    # with freed memory kept resident, the warm-up's high-water mark stays in it).
    memory = PeakMemory(device)
    for _ in range(args.warmup):
        step()
    memory.reset()
    row[f"{phase}_img_s"] = batch / median_step_seconds(step, args.steps, device)
    row[f"{phase}_mem_mb"] = memory.peak_mb()
    return row


def batch_sizes(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    infer_default, train_default = DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"]
    return args.batch_size or infer_default, args.train_batch_size or train_default


def run_in_subprocess(spec: str, phase: str, args: argparse.Namespace) -> dict:
    """``bench_phase`` in a fresh Python process (its stderr passes through)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--phase", phase,
           "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--img-size", str(args.img_size),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--train-batch-size", str(args.train_batch_size),
           "--compile" if args.compile else "--no-compile",
           "--channels-last" if args.channels_last else "--no-channels-last",
           "--flops" if args.flops else "--no-flops",
           "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory"]
    if args.opts:
        cmd += ["--opts", *args.opts]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith(ROW_PREFIX)]
    if result.returncode != 0 or not lines:
        raise BenchmarkError(f"exit code {result.returncode}, error printed above")
    return json.loads(lines[-1][len(ROW_PREFIX):])


def merge_rounds(spec: str, results: dict[tuple[str, str], list[dict]]) -> dict:
    """One table row from a model's rounds: median img/s, largest peak memory, the rest (params,
    GFLOPs, settings) from the first round; each round's img/s is kept in ``{phase}_img_s_rounds``."""
    row: dict = {"model": spec_name(spec), "spec": spec}
    for phase in PHASES:
        rounds = results[spec, phase]
        for result in reversed(rounds):
            row.update(result)
        speeds = [r[f"{phase}_img_s"] for r in rounds]
        row[f"{phase}_img_s"] = statistics.median(speeds) if speeds else None
        row[f"{phase}_img_s_rounds"] = speeds
        if rounds:
            row[f"{phase}_mem_mb"] = max(r[f"{phase}_mem_mb"] for r in rounds)
    return row


def add_ratios(rows: list[dict], reference: Optional[str]) -> None:
    """``<phase>_ratio``: each model's img/s over the reference model's (None without one)."""
    ref = next((r for r in rows if r["model"] == reference), None)
    for row in rows:
        for phase in PHASES:
            key = f"{phase}_img_s"
            ok = ref is not None and row.get(key) is not None and ref.get(key)
            row[f"{phase}_ratio"] = row[key] / ref[key] if ok else None


def markdown_table(rows: list[dict], reference: Optional[str]) -> str:
    """One row per model; ``% peak`` columns are fractions of the run's GEMM peak."""
    ref = reference or "first peer"
    columns = [("model", "model", "{}"), ("params_m", "params (M)", "{:.1f}"),
               ("gflops", "GFLOPs", "{:.2f}"), ("infer_img_s", "infer img/s", "{:.1f}"),
               ("train_img_s", "train img/s", "{:.1f}"),
               ("infer_mem_mb", "infer mem (MB)", "{:.0f}"),
               ("train_mem_mb", "train mem (MB)", "{:.0f}"),
               ("infer_ratio", f"infer x {ref}", "{:.2f}"),
               ("train_ratio", f"train x {ref}", "{:.2f}"),
               ("infer_gflop_s", "infer GFLOP/s", "{:.0f}"),
               ("infer_peak_frac", "infer % peak", "{:.0%}"),
               ("train_gflop_s", "train GFLOP/s", "{:.0f}"),
               ("train_peak_frac", "train % peak", "{:.0%}")]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" if key == "model" else "---:" for key, _, _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-"
                 for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_keep_freed_memory_flag(parser: argparse.ArgumentParser) -> None:
    """``--keep-freed-memory`` / ``--no-keep-freed-memory`` (default on), for the benchmarks that
    time CPU steps as ``main.py`` runs them (``utils.keep_freed_memory``)."""
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction,
                        default=True, help="on CPU, let glibc malloc keep freed memory for reuse, "
                                           "as main.py does (no per-step page faults)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cfg", nargs="*", default=DEFAULT_CFGS, metavar="YAML",
                        help="MG-SSAF config files (none: peers only)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides applied to every --cfg")
    parser.add_argument("--peers", nargs="*", default=DEFAULT_PEERS, metavar="TIMM_NAME",
                        help="timm models (random weights); ratios are to the first one")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="inference batch (0: 16 on CPU, 128 on CUDA)")
    parser.add_argument("--train-batch-size", type=int, default=0,
                        help="training batch (0: 8 on CPU, 128 on CUDA)")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution of every model")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="autocast dtype (weights stay float32, as in AMP training); "
                             "float16 training uses a GradScaler")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model (compilation happens in the warm-up)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="channels-last model and input")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every model and phase this many times, one after the "
                             "other, and report the median img/s of the rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                        help="count multiply-adds of one image (one extra batch-1 forward)")
    add_keep_freed_memory_flag(parser)
    parser.add_argument("--models-in-subprocess", action=argparse.BooleanOptionalAction,
                        default=True, help="run each model and phase in a fresh process "
                                           "(clean peak-memory figures)")
    parser.add_argument("--json", default="", metavar="FILE", help="also write the results here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, default="infer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, least in (("steps", 1), ("rounds", 1), ("img_size", 1), ("warmup", 0),
                        ("batch_size", 0),
                        ("train_batch_size", 0), ("threads", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, "
                         f"got {getattr(args, name)}")
    if len(args.opts) % 2:
        parser.error(f"--opts expects KEY VALUE pairs, got {args.opts}")
    if not args.cfg and not args.peers:
        parser.error("nothing to benchmark: give --cfg and/or --peers")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        try:
            row = bench_phase(args.worker, args.phase, args)
        except ValueError as e:  # a config or input size the model refuses
            sys.exit(f"benchmark: error: {e}")
        print(ROW_PREFIX + json.dumps(row), flush=True)
        return
    try:
        device = resolve_device(args.device)
        specs = model_specs(args.cfg, args.peers, args.opts)
    except (BenchmarkError, ValueError) as e:  # config.ConfigError is a ValueError
        sys.exit(f"benchmark: error: {e}")
    infer_batch, train_batch = batch_sizes(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with torch.no_grad():
        gemm = gemm_peak_gflops(device, DTYPES[args.dtype])
    peak = gemm["peak"]
    settings = {"device": str(device), "device_name": device_description(device),
                "torch": torch.__version__, "threads": threads, "dtype": args.dtype,
                "infer_batch": infer_batch, "train_batch": train_batch, "img_size": args.img_size,
                "compile": args.compile, "channels_last": args.channels_last,
                "keep_freed_memory": args.keep_freed_memory and device.type == "cpu",
                "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                "opts": args.opts,
                "models_in_subprocess": args.models_in_subprocess,
                "gemm_peak_gflop_s": peak, "gemm_mm_gflop_s": gemm["mm"],
                "gemm_conv1x1_gflop_s": gemm["conv1x1"],
                "memory": "CUDA allocator peak (MB, weights included)" if device.type == "cuda"
                          else "growth of the process's peak RSS during the phase (MB)"}
    print(f"# {settings['device_name']}; torch {torch.__version__}, {threads} threads, "
          f"{args.dtype}, batch {infer_batch} inference / {train_batch} training, "
          f"{args.img_size}px{', compiled' if args.compile else ''}"
          f"{', channels-last' if args.channels_last else ''}"
          f"{', default malloc' if device.type == 'cpu' and not args.keep_freed_memory else ''}; "
          f"{args.dtype} GEMM peak {peak:.0f} GFLOP/s (mm {gemm['mm']:.0f}, "
          f"1x1 conv {gemm['conv1x1']:.0f}; % peak: achieved FLOP/s over it, a training "
          "step counted as 3 forward passes)", file=sys.stderr)

    results: dict[tuple[str, str], list[dict]] = {(spec, phase): [] for spec in specs
                                                  for phase in PHASES}
    failed = []
    for round_ in range(args.rounds):
        for spec in specs:
            for phase in PHASES:
                name = spec_name(spec) + (f" (round {round_ + 1})" if args.rounds > 1 else "")
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {phase} ...", file=sys.stderr,
                      flush=True)
                try:
                    result = (run_in_subprocess(spec, phase, args) if args.models_in_subprocess
                              else bench_phase(spec, phase, args))
                    results[spec, phase].append(result)
                    print(f"    {result[f'{phase}_img_s']:.1f} img/s, peak memory "
                          f"{result[f'{phase}_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
                except Exception as e:  # measure the others; report the failure at the end
                    failed.append(f"{name} ({phase}): {e}")
    rows = [merge_rounds(spec, results) for spec in specs]
    reference = spec_name(specs[len(args.cfg)]) if args.peers else None
    add_ratios(rows, reference)
    add_efficiency(rows, peak)
    table = markdown_table(rows, reference)
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "reference": reference, "rows": rows,
                       "table": table, "failed": failed}, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if failed:
        sys.exit("benchmark: failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
