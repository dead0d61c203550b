"""Train, evaluate or time MG-SSAF on ImageNet-style folders (Swin Transformer's command line).

    python main.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --data-path <imagenet>
    python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg ... --data-path ...
    torchrun --nproc_per_node 8 main.py --cfg ... --data-path ...
    python main.py --cfg ... --data-path ... --eval --resume ckpt.pth
    python main.py --cfg ... --data-path ... --throughput --disable_amp

Exit codes: 0 done, 1 bad input, a diverged run or a failure (a rank died, a save failed, the run
folder is held by another run: the message says which), 2 bad command line, 75 preempted
(SIGTERM, SIGUSR1 or Ctrl-C: a checkpoint was saved and named in the file PREEMPTED of the run
folder; run the same command again to resume).
"""
from __future__ import annotations

import startup  # standard library only: first, so that stop signals count from the first moment

if __name__ == "__main__":
    startup.record_signals()  # until Preemption.install (torch and timm take seconds to import)

import argparse
import datetime
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

from config import ConfigError, get_config, inert_settings
from data import DataError, build_loader, mixup_enabled
from logger import create_logger, open_log_file
from lr_scheduler import build_scheduler, scale_lrs
from models import build_model
from models.checkpoint_io import (CheckpointError, load_checkpoint_file, load_pretrained,
                                  load_weights)
from optimizer import build_optimizer
from utils import (RunError, RunLock, all_reduce_sum, any_rank, broadcast_buffers, check_in,
                   checkpoint_name, derive_seed, find_resume_checkpoint, get_rank, get_world_size,
                   keep_freed_memory, prepare_output_dir, release_run_locks,
                   remove_leftover_temp_files, restore_training_state, save_checkpoint, seed_all,
                   synchronize)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, resumable
PREEMPTED_MARKER = "PREEMPTED"  # in the run folder while the run stands preempted
METRICS_FILE = "metrics.jsonl"
LOGGER_NAME = "mg_ssaf"
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFiniteLossError(RunError):
    """The loss (or gradient norm) became NaN or infinite."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1/SIGINT after saving a checkpoint."""


class LoaderDied(Exception):
    """The training loader failed (a worker died, or its pipe broke): ``error``, the cause."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class LoaderBatches:
    """``enumerate(data_loader, start)``, with the loader's own failures (RuntimeError,
    ConnectionError, EOFError) raised as LoaderDied: told apart from a failed collective, which
    is never a preemption."""

    def __init__(self, data_loader: DataLoader, start: int) -> None:
        self.iterator = iter(data_loader)
        self.idx = start - 1

    def __iter__(self) -> "LoaderBatches":
        return self

    def __next__(self) -> tuple[int, object]:
        try:
            batch = next(self.iterator)
        except (RuntimeError, ConnectionError, EOFError) as e:
            raise LoaderDied(e) from e
        self.idx += 1
        return self.idx, batch

    def shutdown(self) -> None:
        """Stops the loader's workers now: after a failure, so that workers dying of a stop
        signal do not raise again (torch's SIGCHLD handler) while the checkpoint is saved."""
        getattr(self.iterator, "_shutdown_workers", lambda: None)()


def is_loader_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from the training loader (a worker that died, or its pipe), not
    from a collective: torch's SIGCHLD handler raises a worker's death anywhere (backward, ...)."""
    return (isinstance(error, (LoaderDied, ConnectionError, EOFError))
            or (isinstance(error, RuntimeError) and "DataLoader worker" in str(error)))


class Preemption:
    """Turns SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) into a request to stop after the current
    optimizer step; a second signal ends the process at once, unless it comes within
    ``REPEAT_WINDOW_S`` of the first (the same request delivered twice, e.g. by Slurm to the
    process group and again by a launcher)."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    REPEAT_WINDOW_S = 1.0

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.received_at = 0.0

    def install(self) -> None:
        """Handles the signals from now on and takes over the first one that came while the
        program started (startup.record_signals), if any."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        if startup.received and self.signal_name is None:
            signum, self.received_at = startup.received[0]
            self.signal_name = signal.Signals(signum).name

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.monotonic()
        elif time.monotonic() - self.received_at > self.REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@dataclass
class Amp:
    """Autocast settings of the run."""
    enabled: bool
    dtype: torch.dtype


@dataclass
class Progress:
    """Where training stands; a mid-epoch checkpoint restores it."""
    num_updates: int = 0      # optimizer steps since the start of training
    epoch_step: int = 0       # loader steps of the current epoch up to the last optimizer step
    loss_sum: float = 0.0     # summed training loss of those steps' samples, over all ranks
    loss_count: int = 0
    preempted: bool = False


def parse_option(argv: list[str] | None = None, prog: str = "main.py",
                 what: str = "MG-SSAF") -> argparse.Namespace:
    """The Swin Transformer command line; every flag overrides the config key it names."""
    parser = argparse.ArgumentParser(
        prog, description=f"Train, evaluate (--eval) or time (--throughput) {what}. Flags "
        "override the config file; --opts overrides any key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--cfg", required=True, metavar="FILE", help="config file (YAML)")
    add("--opts", nargs="+", default=None, metavar="KEY VALUE",
        help="config overrides as KEY VALUE pairs, e.g. TRAIN.EPOCHS 30 DATA.NUM_WORKERS 4")
    add("--batch-size", type=int, help="batch size per process/GPU (DATA.BATCH_SIZE); with a "
        "config that sets DATA.TOTAL_BATCH_SIZE (configs/finetune) it replaces the per-process "
        "batch derived from that total; where that changes the total, the run warns with the "
        "total batch, LR and steps it makes")
    add("--data-path", help="dataset root holding train/<class>/* and val/<class>/*, or the "
        "CUB_200_2011 folder with DATA.DATASET cub (DATA.DATA_PATH)")
    add("--zip", action="store_true", help="Swin's zipped ImageNet: accepted, no effect here "
        "(DATA.ZIP_MODE)")
    add("--cache-mode", choices=("no", "full", "part"), help="Swin's zip cache mode: accepted, no "
        "effect here (DATA.CACHE_MODE)")
    add("--pretrained", help="checkpoint whose weights initialise the model; optimizer, schedule "
        "and epoch start fresh; a head of another class count is re-initialised (MODEL.PRETRAINED)")
    add("--resume", help="checkpoint to resume training from (weights, optimizer, scheduler, "
        "scaler, epoch), or to evaluate with --eval (MODEL.RESUME)")
    add("--accumulation-steps", type=int,
        help="micro-batches per optimizer step (TRAIN.ACCUMULATION_STEPS)")
    add("--use-checkpoint", action="store_true",
        help="activation checkpointing: less GPU memory, slower (TRAIN.USE_CHECKPOINT)")
    add("--disable_amp", action="store_true", help="no mixed precision (AMP_ENABLE false)")
    add("--amp-opt-level", choices=("O0", "O1", "O2"), help="Swin's apex opt level (deprecated "
        "there too): O0 switches AMP off, O1/O2 keep AMP_ENABLE (AMP_OPT_LEVEL)")
    add("--optim", help="optimizer: adamw or sgd (TRAIN.OPTIMIZER.NAME)")
    add("--fused_window_process", action="store_true", help="Swin's fused window kernel: "
        "accepted, no effect here (FUSED_WINDOW_PROCESS)")
    add("--fused_layernorm", action="store_true", help="Swin's fused LayerNorm: accepted, no "
        "effect here (FUSED_LAYERNORM)")
    add("--output", metavar="PATH", help="root of output folders; the run writes to "
        "<output>/<MODEL.NAME>/<tag> (OUTPUT)")
    add("--tag", help="name of the run's folder under <output>/<MODEL.NAME> (TAG)")
    add("--eval", action="store_true",
        help="only evaluate on val/: loss, Acc@1, Acc@5 (EVAL_MODE)")
    add("--throughput", action="store_true",
        help="only measure the model's images/s on val/ batches (THROUGHPUT_MODE)")
    add("--device", choices=("auto", "cuda", "cpu"),
        help="device; auto picks CUDA when available (DEVICE)")
    add("--local_rank", "--local-rank", type=int, default=0, help="GPU of this process on its "
        "node; set by torch.distributed.launch (torchrun sets LOCAL_RANK instead)")
    return parser.parse_args(argv)


def check_config(config: CN) -> None:
    """Rejects settings that cannot work, before anything is built or written."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(config.DATA.BATCH_SIZE >= 1, f"DATA.BATCH_SIZE (--batch-size) must be at least 1, got "
         f"{config.DATA.BATCH_SIZE}")
    need(config.TRAIN.ACCUMULATION_STEPS >= 1, "TRAIN.ACCUMULATION_STEPS (--accumulation-steps) "
         f"must be at least 1, got {config.TRAIN.ACCUMULATION_STEPS}")
    for key, value in (("TRAIN.EPOCHS", config.TRAIN.EPOCHS), ("SAVE_FREQ", config.SAVE_FREQ),
                       ("PRINT_FREQ", config.PRINT_FREQ), ("DIST_TIMEOUT", config.DIST_TIMEOUT)):
        need(value >= 1, f"{key} must be at least 1, got {value}")
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    need(0 <= config.TRAIN.WARMUP_EPOCHS < config.TRAIN.EPOCHS or not training,
         f"TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) must be at least 0 and less than "
         f"TRAIN.EPOCHS ({config.TRAIN.EPOCHS})")
    need(0 <= config.TRAIN.START_EPOCH < config.TRAIN.EPOCHS or not training,
         f"TRAIN.START_EPOCH must be at least 0 and less than TRAIN.EPOCHS "
         f"({config.TRAIN.EPOCHS}), got {config.TRAIN.START_EPOCH}")
    need(config.TRAIN.KEEP_CHECKPOINTS >= 0, "TRAIN.KEEP_CHECKPOINTS must be 0 (keep all) or "
         f"more, got {config.TRAIN.KEEP_CHECKPOINTS}")
    need(config.DATA.NUM_WORKERS >= 0,
         f"DATA.NUM_WORKERS must be 0 or more, got {config.DATA.NUM_WORKERS}")
    need(config.AMP_DTYPE in AMP_DTYPES,
         f"AMP_DTYPE must be 'float16' or 'bfloat16', got {config.AMP_DTYPE!r}")
    need(config.DEVICE in ("auto", "cuda", "cpu"), f"DEVICE must be 'auto', 'cuda' or 'cpu', got "
         f"{config.DEVICE!r}")
    minmax = config.AUG.CUTMIX_MINMAX
    need(minmax is None or (isinstance(minmax, (list, tuple)) and len(minmax) == 2
                            and 0 < minmax[0] < minmax[1] <= 1),
         f"AUG.CUTMIX_MINMAX must be None (CutMix areas from AUG.CUTMIX's beta distribution) or "
         f"[min, max] with 0 < min < max <= 1, got {minmax!r}")
    need(not mixup_enabled(config) or config.DATA.BATCH_SIZE % 2 == 0 or not training,
         f"Mixup/CutMix (AUG.MIXUP {config.AUG.MIXUP}, AUG.CUTMIX {config.AUG.CUTMIX}) needs an "
         f"even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}")
    need(0.0 < config.TRAIN.LAYER_DECAY <= 1.0, f"TRAIN.LAYER_DECAY must be in (0, 1] (1 switches "
         f"it off), got {config.TRAIN.LAYER_DECAY}")
    need(0.0 < config.MODEL_EMA_DECAY < 1.0,
         f"MODEL_EMA_DECAY must be in (0, 1), got {config.MODEL_EMA_DECAY}")
    for key, flag in (("RESUME", "--resume"), ("PRETRAINED", "--pretrained")):
        path = config.MODEL[key]
        need(not path or os.path.isfile(path), f"MODEL.{key} ({flag}) {path}: file not found")


def init_device(config: CN) -> torch.device:
    """Picks the device and, when a launcher started this process (RANK and WORLD_SIZE set),
    joins the process group: NCCL on CUDA, gloo on CPU, timeout DIST_TIMEOUT seconds."""
    if config.DEVICE == "cuda" and not torch.cuda.is_available():
        raise RunError("DEVICE (--device) is cuda but CUDA is not available here")
    use_cuda = config.DEVICE == "cuda" or (config.DEVICE == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if use_cuda:
        if config.LOCAL_RANK >= torch.cuda.device_count():
            raise RunError(f"local rank {config.LOCAL_RANK} has no GPU: this node has "
                           f"{torch.cuda.device_count()}")
        torch.cuda.set_device(config.LOCAL_RANK)
        device = torch.device("cuda", config.LOCAL_RANK)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=config.DIST_TIMEOUT),
                                device_id=device if use_cuda else None)
    return device


def seed_everything(config: CN) -> None:
    """Seeds python, NumPy and torch with SEED + rank; DETERMINISTIC trades speed for
    reproducibility (otherwise cuDNN autotunes)."""
    seed = config.SEED + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if config.DETERMINISTIC:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not config.DETERMINISTIC
    torch.backends.cudnn.deterministic = config.DETERMINISTIC


def amp_settings(config: CN, device: torch.device, logger: logging.Logger) -> Amp:
    """AMP_ENABLE/AMP_DTYPE, as configured on every device (float16 with a GradScaler)."""
    if not config.AMP_ENABLE:
        return Amp(False, torch.float32)
    if device.type == "cpu" and config.AMP_DTYPE == "float16":
        logger.warning("AMP_DTYPE float16 on CPU: most CPUs emulate float16 arithmetic (about 30x "
                       "slower than float32 on an AVX-512 EPYC); set AMP_DTYPE bfloat16, or "
                       "--disable_amp for float32")
    return Amp(True, AMP_DTYPES[config.AMP_DTYPE])


def build_criterion(config: CN, mixup_active: bool) -> nn.Module:
    """Soft-target cross-entropy with Mixup/CutMix (which smooth the labels), else label
    smoothing (MODEL.LABEL_SMOOTHING), else plain cross-entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of the process (CPU), in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_batch(config: CN, world_size: int, updates_per_epoch: int,
              logger: logging.Logger) -> None:
    """Logs the total batch of the run, the LR it gives and the number of optimizer steps; as a
    warning where a batch per process from the command line changes the total that
    DATA.TOTAL_BATCH_SIZE asks for."""
    accum = config.TRAIN.ACCUMULATION_STEPS
    total = config.DATA.BATCH_SIZE * world_size * accum
    text = (f"total batch {total} ({config.DATA.BATCH_SIZE} per process x {world_size} "
            f"process(es) x {accum} accumulation step(s)): LR {config.TRAIN.BASE_LR:.6g}, "
            f"{config.TRAIN.EPOCHS * updates_per_epoch} optimizer steps ({config.TRAIN.EPOCHS} "
            f"epochs of {updates_per_epoch})")
    if config.DATA.TOTAL_BATCH_SIZE and total != config.DATA.TOTAL_BATCH_SIZE:
        logger.warning(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} from the command line replaces "
                       f"the config's DATA.TOTAL_BATCH_SIZE {config.DATA.TOTAL_BATCH_SIZE}: "
                       + text)
    else:
        logger.info(text)


def train_one_epoch(config: CN, model: nn.Module, criterion: nn.Module, data_loader: DataLoader,
                    optimizer: torch.optim.Optimizer, epoch: int, mixup_fn, lr_scheduler,
                    scaler: torch.amp.GradScaler, amp: Amp, device: torch.device,
                    progress: Progress, preemption: Preemption, logger: logging.Logger,
                    model_ema: ModelEmaV3 | None = None) -> None:
    """One epoch (or its rest, from ``progress.epoch_step``), updating ``progress`` (and the EMA
    weights) at each optimizer step. Stops early, with ``progress.preempted`` set, after the
    optimizer step during which a preemption signal arrived on any rank; raises
    NonFiniteLossError, before the update, on a NaN/inf loss. Mixup/CutMix, drop path and dropout
    draw from generators seeded from (SEED, epoch, step, rank) at each step, so a resumed epoch
    repeats the uninterrupted one."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    num_steps = progress.epoch_step + len(data_loader)
    batches = LoaderBatches(data_loader, progress.epoch_step)
    try:
        train_steps(config, model, criterion, batches, optimizer, epoch, mixup_fn, lr_scheduler,
                    scaler, amp, device, progress, preemption, logger, model_ema, num_steps)
    except BaseException:
        batches.shutdown()
        raise


def train_steps(config: CN, model: nn.Module, criterion: nn.Module, batches: LoaderBatches,
                optimizer: torch.optim.Optimizer, epoch: int, mixup_fn, lr_scheduler,
                scaler: torch.amp.GradScaler, amp: Amp, device: torch.device,
                progress: Progress, preemption: Preemption, logger: logging.Logger,
                model_ema: ModelEmaV3 | None, num_steps: int) -> None:
    """The loop of :func:`train_one_epoch` over ``batches``."""
    accum = config.TRAIN.ACCUMULATION_STEPS
    batch_time, loss_meter, norm_meter, scale_meter = (AverageMeter() for _ in range(4))
    nonfinite = ""
    group_loss = group_count = 0.0  # this rank's losses since the last optimizer step
    end = time.time()
    for idx, (samples, targets) in batches:
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        seed_all(derive_seed(config.SEED, epoch, idx, get_rank()))
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        group_start = idx - idx % accum
        group_size = min(accum, num_steps - group_start)
        is_update = idx == group_start + group_size - 1
        skip_sync = isinstance(model, DistributedDataParallel) and not is_update
        with model.no_sync() if skip_sync else nullcontext():
            with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
                outputs = model(samples)
                loss = criterion(outputs, targets)
            scaler.scale(loss / group_size).backward()
        loss_value = loss.item()
        if not math.isfinite(loss_value) and not nonfinite:
            nonfinite = f"loss is {loss_value}"
        loss_meter.update(loss_value, samples.size(0))
        group_loss += loss_value * samples.size(0)
        group_count += samples.size(0)

        stop = False
        if is_update:
            scaler.unscale_(optimizer)
            max_norm = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            if not math.isfinite(grad_norm) and not scaler.is_enabled() and not nonfinite:
                nonfinite = f"gradient norm is {grad_norm}"
            diverged, requested, loss_sum, loss_count = all_reduce_sum(
                [float(bool(nonfinite)), float(preemption.requested), group_loss, group_count],
                device)
            stop = requested > 0
            if diverged:
                raise NonFiniteLossError(
                    f"training {nonfinite or 'loss is not finite on another rank'} at epoch "
                    f"{epoch} step {idx}/{num_steps} (rank {get_rank()}): stopped before this "
                    "update")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.num_updates += 1
            progress.epoch_step = idx + 1
            progress.loss_sum += loss_sum
            progress.loss_count += int(loss_count)
            group_loss = group_count = 0.0
            if model_ema is not None:
                model_ema.update(model, step=progress.num_updates)
            lr_scheduler.step_update(progress.num_updates)
            norm_meter.update(grad_norm)
            scale_meter.update(scaler.get_scale() if scaler.is_enabled() else 1.0)

        batch_time.update(time.time() - end)
        end = time.time()
        if idx % config.PRINT_FREQ == 0:
            lr = optimizer.param_groups[0]["lr"]
            wd = optimizer.param_groups[0]["weight_decay"]
            eta = datetime.timedelta(seconds=int(batch_time.avg * (num_steps - idx - 1)))
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                f"eta {eta} lr {lr:.6f}\t wd {wd:.4f}\t"
                f"time {batch_time.val:.4f} ({batch_time.avg:.4f})\t"
                f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t"
                f"grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
                f"loss_scale {scale_meter.val:.4f} ({scale_meter.avg:.4f})\t"
                f"mem {memory_mb(device):.0f}MB")
        if stop and idx + 1 < num_steps:
            progress.preempted = True
            return


@torch.no_grad()
def validate(config: CN, data_loader: DataLoader, model: nn.Module, device: torch.device,
             amp: Amp, logger: logging.Logger) -> dict[str, float]:
    """Loss, Acc@1 and Acc@5 over the whole validation set, from counts summed over all ranks
    (each rank evaluates its own images, every image once)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    k = min(5, config.MODEL.NUM_CLASSES)
    loss_sum = correct1 = correct5 = count = 0.0
    batch_time = AverageMeter()
    end = time.time()
    for idx, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            output = model(images)
        output = output.float()
        hits = output.topk(k, dim=1).indices.eq(targets[:, None])
        loss_sum += criterion(output, targets).item()
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.sum().item()
        count += targets.size(0)
        batch_time.update(time.time() - end)
        end = time.time()
        if idx % config.PRINT_FREQ == 0:
            logger.info(f"Test: [{idx}/{len(data_loader)}]\ttime {batch_time.val:.3f} "
                        f"({batch_time.avg:.3f})\tmem {memory_mb(device):.0f}MB")
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count],
                                                         device)
    stats = {"loss": loss_sum / max(count, 1), "acc1": 100.0 * correct1 / max(count, 1),
             "acc5": 100.0 * correct5 / max(count, 1), "images": int(count),
             "correct1": int(correct1), "correct5": int(correct5)}
    logger.info(f" * Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
                f"({stats['images']} images: {stats['correct1']} top-1 and {stats['correct5']} "
                f"top-5 correct)")
    logger.info(f"Accuracy of the network on the {stats['images']} test images: "
                f"{stats['acc1']:.1f}%")
    return stats


@torch.no_grad()
def throughput(data_loader: DataLoader, model: nn.Module, device: torch.device, amp: Amp,
               logger: logging.Logger, warmup: int = 50, repeats: int = 30) -> float:
    """Images per second of the model's forward pass on the loader's first batch (data loading
    excluded), timed between device synchronisations; summed over ranks."""
    model.eval()
    images = next(iter(data_loader))[0].to(device, non_blocking=True)
    batch_size = images.size(0)
    with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
        for _ in range(warmup):
            model(images)
        synchronize(device)
        logger.info(f"throughput averaged over {repeats} forward passes of batch size {batch_size}")
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
        synchronize(device)
    rate = repeats * batch_size / (time.perf_counter() - start)
    total = all_reduce_sum([rate], device)[0]
    overall = f" ({total:.1f} images/s over {get_world_size()} processes)"
    overall = overall if get_world_size() > 1 else ""
    logger.info(f"batch_size {batch_size} throughput {rate:.1f} images/s{overall}")
    return total


def append_metrics(config: CN, row: dict) -> None:
    """Appends one JSON line to OUTPUT/metrics.jsonl (rank 0)."""
    if get_rank() != 0:
        return
    with open(os.path.join(config.OUTPUT, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_preempted_marker(config: CN, checkpoint: str, preemption: Preemption, epoch: int,
                           epoch_step: int | None) -> None:
    """Writes OUTPUT/PREEMPTED (rank 0), ``key=value`` lines naming the checkpoint just saved and
    the signal: what a requeue script reads, whatever exit code the launcher reports. Only once
    every rank has passed the save (checked in, see utils.check_in): a rank that died meanwhile
    makes the stop a failure (RunError), with no marker."""
    # Rank 0 checks in after its save and waits for the others (who have nothing to save).
    missing = check_in(f"saved/{epoch}/{epoch_step}", min(config.DIST_TIMEOUT, 60),
                       wait=get_rank() == 0)
    if missing:
        raise RunError(f"rank(s) {', '.join(map(str, missing))} did not reach the end of the "
                       f"save of {checkpoint} (died or stuck): a failure, not a preemption; "
                       "no PREEMPTED marker written")
    if missing is None:
        raise RunError(f"the ranks could not confirm that each passed the save of {checkpoint} "
                       "(the process group's store is gone): no PREEMPTED marker written")
    if get_rank() != 0:
        return
    lines = {"checkpoint": checkpoint, "signal": preemption.signal_name or "on another rank",
             "epoch": epoch, "step": "end" if epoch_step is None else epoch_step,
             "exit_code": PREEMPTED_EXIT_CODE, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = os.path.join(config.OUTPUT, PREEMPTED_MARKER)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(f"{key}={value}\n" for key, value in lines.items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def remove_preempted_marker(config: CN) -> None:
    """Removes OUTPUT/PREEMPTED (rank 0) once training runs again: from then on the run either
    completes, or stops and writes a new one."""
    path = os.path.join(config.OUTPUT, PREEMPTED_MARKER)
    if get_rank() == 0 and os.path.exists(path):
        os.remove(path)


def checkpoint_to_resume(config: CN, logger: logging.Logger) -> tuple[str, dict] | None:
    """The checkpoint to start from: with TRAIN.AUTO_RESUME the newest loadable one in the output
    folder (it wins over --resume when training, so a requeued job continues where it stopped;
    with --eval the weights given by --resume or --pretrained win), else MODEL.RESUME, else none.
    A --resume that is not a loadable checkpoint stops the run (CheckpointError) either way."""
    explicit = config.MODEL.RESUME
    loaded = (explicit, load_checkpoint_file(explicit)) if explicit else None
    if config.TRAIN.AUTO_RESUME and not (config.EVAL_MODE and (explicit or
                                                              config.MODEL.PRETRAINED)):
        found = find_resume_checkpoint(config.OUTPUT, logger)
        if found:
            if explicit:
                logger.warning(f"auto-resume: continuing from {found[0]} instead of --resume "
                               f"{explicit}")
            return found
    return loaded


def evaluate_or_time(config: CN, task: "ClassificationTask", model: nn.Module,
                     data_loader_val: DataLoader, device: torch.device, amp: Amp,
                     logger: logging.Logger) -> None:
    """--eval: the task's validation of the checkpoint to resume (or the pretrained weights);
    --throughput: images/s of the model."""
    if config.THROUGHPUT_MODE and not config.EVAL_MODE:
        open_log_file(logger, config.OUTPUT, get_rank())
        throughput(data_loader_val, model, device, amp, logger)
        return
    resume = checkpoint_to_resume(config, logger)
    if resume:
        load_weights(model, resume[1], resume[0])
    open_log_file(logger, config.OUTPUT, get_rank())
    if resume:
        logger.info(f"evaluating the weights of {resume[0]}")
    elif config.MODEL.PRETRAINED:
        logger.info(f"evaluating the weights of {config.MODEL.PRETRAINED} (--pretrained)")
    else:
        logger.warning("evaluating a randomly initialised model: no --resume or --pretrained")
    task.validate(config, data_loader_val, model, device, amp, logger)


def batch_layout(ckpt: dict) -> tuple[int, int, int] | None:
    """(DATA.BATCH_SIZE, processes, TRAIN.ACCUMULATION_STEPS) of the run that saved ``ckpt``, or
    None where the checkpoint does not say (released ones)."""
    try:
        config = ckpt["config"]
        world_size = ckpt.get("world_size") or len(ckpt["rng"])  # "rng": one state per rank
        return config.DATA.BATCH_SIZE, world_size, config.TRAIN.ACCUMULATION_STEPS
    except (KeyError, AttributeError, TypeError):
        return None


def resume_position(ckpt: dict, config: CN, updates_per_epoch: int,
                    logger: logging.Logger) -> tuple[int, Progress]:
    """The epoch and progress to continue from after ``ckpt``. When the batch layout (batch size,
    processes, accumulation steps) differs from the saving run's, the position is recomputed from
    the samples seen (epoch_step x batch x processes): the epoch continues after the largest
    number of whole new optimizer steps that fit in them (the rest, less than one step's
    samples, is seen again), and the LR schedule is placed at the optimizer steps that the new
    layout makes up to there."""
    mid_epoch = ckpt.get("epoch_step") is not None
    start_epoch = ckpt["epoch"] if mid_epoch else ckpt["epoch"] + 1
    done = ckpt.get("num_updates", (ckpt["epoch"] + 1) * updates_per_epoch)  # released: estimated
    progress = Progress(num_updates=int(done))
    if mid_epoch:
        progress.epoch_step = ckpt["epoch_step"]
        progress.loss_sum, progress.loss_count = ckpt["train_loss"]
    old = batch_layout(ckpt)
    new = (config.DATA.BATCH_SIZE, get_world_size(), config.TRAIN.ACCUMULATION_STEPS)
    if old is None or old == new:
        return start_epoch, progress
    batch, world_size, accum = new
    seen = progress.epoch_step * old[0] * old[1]
    progress.epoch_step = seen // (batch * world_size) // accum * accum
    progress.num_updates = start_epoch * updates_per_epoch + progress.epoch_step // accum
    skipped = progress.epoch_step * batch * world_size
    logger.warning(
        f"the checkpoint's run had DATA.BATCH_SIZE {old[0]} x {old[1]} process(es) x "
        f"TRAIN.ACCUMULATION_STEPS {old[2]}, this one {batch} x {world_size} x {accum}: "
        + (f"epoch {start_epoch} continues after {skipped} of the {seen} samples seen "
           f"({seen - skipped} to be seen again), " if mid_epoch else "")
        + f"the LR schedule continues at optimizer step {progress.num_updates} (not bit-exact)")
    return start_epoch, progress


def resume_training(config: CN, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
                    scaler: torch.amp.GradScaler, updates_per_epoch: int,
                    logger: logging.Logger, model_ema: ModelEmaV3 | None = None
                    ) -> tuple[int, float, Progress]:
    """Restores the checkpoint to resume, if any (the EMA weights too); returns the epoch to
    start, the best accuracy so far and the progress (within the epoch too, after a mid-epoch
    checkpoint)."""
    resume = checkpoint_to_resume(config, logger)
    if not resume:
        if config.TRAIN.AUTO_RESUME:
            logger.info(f"no checkpoint in {config.OUTPUT}: training from scratch")
        # The schedule stands where TRAIN.START_EPOCH begins, as if the epochs before it ran.
        progress = Progress(num_updates=config.TRAIN.START_EPOCH * updates_per_epoch)
        lr_scheduler.step_update(progress.num_updates)
        if config.TRAIN.START_EPOCH:
            logger.info(f"TRAIN.START_EPOCH {config.TRAIN.START_EPOCH}: the LR schedule starts "
                        f"at optimizer step {progress.num_updates}")
        return config.TRAIN.START_EPOCH, 0.0, progress
    path, ckpt = resume
    load_weights(model, ckpt, path)
    if model_ema is not None:
        if "model_ema" in ckpt:
            load_weights(model_ema.module, {**ckpt, "model": ckpt["model_ema"]}, path)
        else:
            logger.warning(f"{path} has no EMA weights: the EMA restarts from the model's")
            model_ema.module.load_state_dict(model.state_dict())
    restore_training_state(ckpt, path, optimizer, lr_scheduler, scaler)
    max_accuracy = float(ckpt.get("max_accuracy", 0.0))
    start_epoch, progress = resume_position(ckpt, config, updates_per_epoch, logger)
    lr_scheduler.step_update(progress.num_updates)
    logger.info(f"resumed from {path}: epoch {start_epoch}, step {progress.epoch_step}, "
                f"{progress.num_updates} optimizer steps done, max accuracy {max_accuracy:.2f}%")
    if start_epoch >= config.TRAIN.EPOCHS:
        logger.info(f"nothing to train: the checkpoint has reached TRAIN.EPOCHS "
                    f"{config.TRAIN.EPOCHS}")
    return start_epoch, max_accuracy, progress


class ClassificationTask:
    """What :func:`run` builds, trains and measures for image classification (ImageNet-style
    folders, the digits demo, CUB). ``main_seg.SegmentationTask`` is the other task on the same
    engine; each method is the task's one way to do that job."""
    prog, what = "main.py", "MG-SSAF"  # for --help
    best_metric = "acc1"  # the statistic of validate() that ranks checkpoints (ckpt_best.pth)
    best_metric_name = "accuracy"

    def prepare_config(self, config: CN) -> None:
        """Sets the keys that the task derives from others (nothing here), before checks."""

    def scale_lrs(self, config: CN, world_size: int) -> None:
        scale_lrs(config, world_size)

    def build_loader(self, config: CN) -> tuple:
        return build_loader(config)

    def build_model(self, config: CN) -> nn.Module:
        return build_model(config)

    def load_pretrained(self, config: CN, model: nn.Module, logger: logging.Logger) -> None:
        """Initialises ``model`` from ``--pretrained`` (MODEL.PRETRAINED)."""
        load_pretrained(config.MODEL.PRETRAINED, model, logger)

    def build_criterion(self, config: CN, mixup_active: bool) -> nn.Module:
        return build_criterion(config, mixup_active)

    def build_optimizer(self, config: CN, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(config, model)

    def build_scheduler(self, config: CN, optimizer: torch.optim.Optimizer,
                        updates_per_epoch: int):
        return build_scheduler(config, optimizer, updates_per_epoch)

    def validate(self, config: CN, data_loader: DataLoader, model: nn.Module,
                 device: torch.device, amp: Amp, logger: logging.Logger) -> dict:
        return validate(config, data_loader, model, device, amp, logger)

    def metrics_row(self, stats: dict) -> dict:
        """The validation statistics that go into a metrics.jsonl line."""
        return {"val_loss": stats["loss"], "acc1": stats["acc1"], "acc5": stats["acc5"]}


def run(config: CN, preemption: Preemption, task: ClassificationTask) -> None:
    """Builds everything from ``config`` and trains, evaluates or times the ``task``'s model;
    training holds the run folder's lock (utils.RunLock) throughout."""
    prepare_output_dir(config.OUTPUT)
    device = init_device(config)
    rank, world_size = get_rank(), get_world_size()
    # The log file opens once the checks have passed (open_log_file): a run that fails before
    # leaves an existing run folder as it was.
    logger = create_logger(config.OUTPUT, rank, LOGGER_NAME, defer=True)
    if device.type == "cpu":
        logger.info(startup.choose_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                               adapt=not config.DETERMINISTIC))
    seed_everything(config)
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if training:
        lock, refused = RunLock(config.OUTPUT), ""
        if rank == 0:
            try:
                lock.acquire(logger)
            except RunError as e:
                refused = str(e)
        if any_rank([bool(refused)], device)[0]:
            raise RunError(refused or "rank 0 could not lock the run folder (see its message)")
        try:
            run_body(config, preemption, task, device, logger)
        finally:
            if rank == 0:
                lock.release()
        return
    run_body(config, preemption, task, device, logger)


def run_body(config: CN, preemption: Preemption, task: ClassificationTask, device: torch.device,
             logger: logging.Logger) -> None:
    """Builds everything from ``config`` and trains, evaluates or times the ``task``'s model
    (the log file opened once the inputs passed their checks)."""
    rank, world_size = get_rank(), get_world_size()
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if training:
        task.scale_lrs(config, world_size)
    logger.info(f"rank {rank} of {world_size} on {device}; full config:\n{config.dump()}")
    inert = inert_settings(config)
    if inert:
        logger.warning("Swin Transformer settings accepted but without effect here: "
                       + ", ".join(inert))
    if device.type == "cpu" and keep_freed_memory():
        logger.info("glibc malloc keeps freed memory for reuse (no per-step page faults)")
    amp = amp_settings(config, device, logger)

    dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn = task.build_loader(
        config)
    logger.info(f"{len(dataset_val)} validation images" + (f", {len(dataset_train)} training images"
                                                           if training else ""))
    try:
        model = task.build_model(config)
    except ValueError as e:
        raise ConfigError(f"cannot build {config.MODEL.NAME}: {e}") from None
    model.to(device)
    logger.info(str(model))
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"number of params: {n_parameters}")
    if config.MODEL.PRETRAINED:
        task.load_pretrained(config, model, logger)

    if not training:
        evaluate_or_time(config, task, model, data_loader_val, device, amp, logger)
        return

    model.to(memory_format=torch.channels_last)  # weights laid out as their gradients (DDP buckets)
    optimizer = task.build_optimizer(config, model)
    model_ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if config.MODEL_EMA else None
    model_without_ddp = model
    if dist.is_initialized():
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.enabled and amp.dtype == torch.float16)
    num_steps = len(data_loader_train)
    updates_per_epoch = math.ceil(num_steps / config.TRAIN.ACCUMULATION_STEPS)
    log_batch(config, world_size, updates_per_epoch, logger)
    lr_scheduler = task.build_scheduler(config, optimizer, updates_per_epoch)
    criterion = task.build_criterion(config, mixup_fn is not None)
    start_epoch, max_accuracy, progress = resume_training(
        config, model_without_ddp, optimizer, lr_scheduler, scaler, updates_per_epoch, logger,
        model_ema)

    open_log_file(logger, config.OUTPUT, rank)
    if rank == 0:
        remove_leftover_temp_files(config.OUTPUT, logger)
    logger.info("Start training")
    remove_preempted_marker(config)
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        first_step = progress.epoch_step
        data_loader_train.sampler.set_epoch(epoch, first_step * config.DATA.BATCH_SIZE)
        epoch_start = time.time()
        try:
            train_one_epoch(config, model, criterion, data_loader_train, optimizer, epoch,
                            mixup_fn, lr_scheduler, scaler, amp, device, progress, preemption,
                            logger, model_ema)
        except (LoaderDied, RuntimeError, ConnectionError, EOFError) as caught:
            e = caught.error if isinstance(caught, LoaderDied) else caught
            if not (preemption.requested and is_loader_failure(caught)):
                if isinstance(caught, LoaderDied):
                    raise e from None
                raise
            # A loader worker died of the signal (one that dies while handing over a batch's
            # shared memory shows as ConnectionResetError, or EOFError): the state of the last
            # optimizer step (progress) is intact, save that. A failed collective (a peer rank
            # died) is not caught here: it is a failure, signal or not (torchrun itself
            # SIGTERMs the survivors of a dead rank).
            logger.warning(f"{type(e).__name__} while stopping on {preemption.signal_name}: "
                           f"{(str(e).splitlines() or [''])[0]}")
            progress.preempted = True
        epoch_time = time.time() - epoch_start
        if progress.preempted:
            save_checkpoint(config, epoch, model_without_ddp, max_accuracy, optimizer, lr_scheduler,
                            scaler, logger, num_updates=progress.num_updates,
                            epoch_step=progress.epoch_step,
                            train_loss=(progress.loss_sum, progress.loss_count),
                            model_ema=model_ema.module if model_ema is not None else None,
                            class_names=getattr(dataset_val, "classes", None))
            saved = os.path.join(config.OUTPUT, checkpoint_name(epoch, progress.epoch_step))
            write_preempted_marker(config, saved, preemption, epoch, progress.epoch_step)
            raise Preempted(f"{preemption.signal_name or 'a signal on another rank'} received: "
                            f"stopped at epoch {epoch} step "
                            f"{progress.epoch_step}/{num_steps} and saved {saved}")
        skipped = all_reduce_sum([getattr(dataset_train, "pop_skipped", lambda: 0)()], device)[0]
        if skipped:
            logger.warning(f"epoch {epoch}: {int(skipped)} unreadable training image(s) skipped")
        logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}")

        for module in (model_without_ddp, model_ema.module if model_ema is not None else None):
            if module is not None:
                broadcast_buffers(module)  # every rank evaluates the state rank 0 saves
        stats = task.validate(config, data_loader_val, model_without_ddp, device, amp, logger)
        if not math.isfinite(stats["loss"]):
            raise NonFiniteLossError(f"validation loss is {stats['loss']} after epoch {epoch}: the "
                                     "model diverged and is not saved")
        row, ema_row = task.metrics_row(stats), {}
        best = stats[task.best_metric]
        if model_ema is not None:
            logger.info("EMA weights:")
            ema_stats = task.validate(config, data_loader_val, model_ema.module, device, amp,
                                      logger)
            ema_row = {f"{key.removeprefix('val_')}_ema": value
                       for key, value in task.metrics_row(ema_stats).items()}
            best = max(best, ema_stats[task.best_metric])
        is_best = best > max_accuracy
        max_accuracy = max(max_accuracy, best)
        logger.info(f"Max {task.best_metric_name}: {max_accuracy:.2f}%" + (
            " (model or EMA weights)" if model_ema is not None else ""))
        # Metrics first: a crash in between repeats this line after the resume (the last one of an
        # epoch counts), it never leaves an epoch out.
        images = (progress.epoch_step - first_step) * config.DATA.BATCH_SIZE * world_size
        append_metrics(config, {
            "epoch": epoch, "train_loss": progress.loss_sum / max(progress.loss_count, 1),
            "lr": optimizer.param_groups[0]["lr"], **row, "epoch_time": epoch_time,
            "images_per_sec": images / epoch_time, "num_updates": progress.num_updates, **ema_row})
        stop = any_rank([preemption.requested], device)[0]
        save_epoch = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or stop
        if save_epoch or is_best:
            save_checkpoint(config, epoch, model_without_ddp, max_accuracy, optimizer, lr_scheduler,
                            scaler, logger, num_updates=progress.num_updates,
                            is_best=is_best, save_epoch=save_epoch,
                            model_ema=model_ema.module if model_ema is not None else None,
                            class_names=getattr(dataset_val, "classes", None))
        progress = Progress(num_updates=progress.num_updates)
        if stop:
            saved = os.path.join(config.OUTPUT, checkpoint_name(epoch))
            write_preempted_marker(config, saved, preemption, epoch, None)
            raise Preempted(f"{preemption.signal_name or 'a signal on another rank'} received: "
                            f"stopped after epoch {epoch} and saved {saved}")
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def stop_before_training(config: CN, preemption: Preemption) -> None:
    """Stops a run that received a stop signal while it started, before it builds or trains
    anything: the marker PREEMPTED (rank 0) says so (``checkpoint=none``, ``step=start``: this
    run saved nothing; the rerun resumes from the folder's newest checkpoint, if any)."""
    if os.environ.get("RANK", "0") == "0":  # the process group does not exist yet
        prepare_output_dir(config.OUTPUT)
        write_preempted_marker(config, "none", preemption, "none", "start")
    raise Preempted(f"{preemption.signal_name} received while the run started: stopped before "
                    "training, nothing saved")


def report(message: str, level: int = logging.ERROR) -> None:
    """Logs why the run ends (console on rank 0, every rank's log file); ranks without a console,
    and runs that failed before their logger existed, print it to stderr as well."""
    logger = logging.getLogger(LOGGER_NAME)
    prefix = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
    if logger.handlers:
        logger.log(level, prefix + message)
    if get_rank() != 0 or not logger.handlers:
        print(f"{prefix}{logging.getLevelName(level).lower()}: {message}", file=sys.stderr,
              flush=True)


def main(argv: list[str] | None = None, task: ClassificationTask | None = None) -> int:
    """Runs ``task`` (classification by default) with the command line ``argv``; returns the exit
    code."""
    task = task or ClassificationTask()
    args = parse_option(argv, task.prog, task.what)
    preemption = Preemption()
    try:
        config = get_config(args)
        config.defrost()
        task.prepare_config(config)
        config.freeze()
        check_config(config)
        if not (config.EVAL_MODE or config.THROUGHPUT_MODE):
            preemption.install()
            if preemption.requested:
                stop_before_training(config, preemption)
        else:
            startup.restore_signal_defaults()  # a signal ends --eval/--throughput as before
        run(config, preemption, task)
        code = 0
    except Preempted as e:
        report(f"preempted: {e}; run the same command again to resume (exit code "
               f"{PREEMPTED_EXIT_CODE})", logging.WARNING)
        code = PREEMPTED_EXIT_CODE
    except NonFiniteLossError as e:
        report(f"{e}; the checkpoints already in the output folder are untouched")
        return 1
    except (ConfigError, DataError, RunError, CheckpointError) as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a loader worker: keep the message itself
            message = message.strip().splitlines()[-1]
        report(message)
        return 1
    except Exception as e:
        if get_world_size() == 1:
            raise
        # With several processes a failure is most often a collective that broke because a peer
        # died or hung: say so, keep the traceback in the log, and exit without waiting for the
        # process group's threads (which could hang or abort the interpreter at exit).
        logging.getLogger(LOGGER_NAME).exception("traceback")
        # Every rank still alive checks in (through the store, not a collective): those that
        # do not are named. Never a preemption, even after a signal: no PREEMPTED marker.
        missing = check_in("failed", 5.0)
        who = (f"rank(s) {', '.join(map(str, missing))} died or hung (no answer from it within "
               "5 s of the failure)" if missing else
               "every rank is alive: one of them failed (see its log)" if missing == [] else
               "could not tell which rank failed (the process group's store is gone too: "
               "rank 0 holds it without torchrun)")
        report(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}\nWith "
               f"{get_world_size()} processes this usually means another rank failed or did not "
               f"answer within DIST_TIMEOUT ({config.DIST_TIMEOUT} s): {who}; a failure, not a "
               "preemption (no PREEMPTED marker)")
        release_run_locks()
        logging.shutdown()
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
