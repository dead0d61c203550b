"""One run of a task, as ``main.py`` and ``main_seg.py`` start it: the device and process group,
the run folder's lock and log, the model and loaders, then training (:class:`Trainer`),
evaluation (--eval) or timing (--throughput)."""
from __future__ import annotations

import datetime
import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

import startup
from config import ConfigError, inert_settings
from logger import create_logger, open_log_file
from models.checkpoint_io import load_model_weights, load_weights
from models.conv import cpu_bfloat16_native
from utils import (RunError, RunLock, all_reduce_sum, any_rank, cpu_model, get_rank,
                   get_world_size, keep_freed_memory, prepare_output_dir, remove_empty_folders,
                   seed_all, synchronize)

from .checkpoint import CheckpointSaver
from .preemption import Preemption
from .task import Amp, Loaders, Task
from .trainer import Trainer

LOGGER_NAME = "mg_ssaf"


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


def seed_run(config: CN) -> None:
    """Seeds python, NumPy and torch with SEED + rank (``utils.seed_all``); DETERMINISTIC trades
    speed for reproducibility (otherwise cuDNN autotunes)."""
    seed_all(config.SEED + get_rank())
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
    if device.type == "cpu" and config.AMP_DTYPE == "bfloat16" and not cpu_bfloat16_native():
        logger.warning(f"AMP_DTYPE bfloat16 on a CPU ({cpu_model()}) without the "
                       "instructions oneDNN runs bfloat16 on (AVX-512 or AMX on x86): the "
                       "model's convolutions run it through float32 and its other bf16 products "
                       "on generic code, so bf16 gains nothing over float32 here (0.7-0.95x its "
                       "speed on an AVX2-only EPYC); --disable_amp for float32")
    return Amp(True, getattr(torch, config.AMP_DTYPE))  # float16 or bfloat16


def log_batch(config: CN, updates_per_epoch: int, logger: logging.Logger) -> None:
    """Logs the total batch of the run, the LR it gives and the number of optimizer steps; as a
    warning where a batch per process from the command line changes the total that
    DATA.TOTAL_BATCH_SIZE asks for."""
    accum, world_size = config.TRAIN.ACCUMULATION_STEPS, get_world_size()
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


@torch.no_grad()
def throughput(task: Task, config: CN, data_loader: DataLoader, model: nn.Module,
               device: torch.device, amp: Amp, logger: logging.Logger, warmup: int = 50,
               repeats: int = 30) -> float:
    """Images per second of the task's timed forward (``Task.timed_forward``) on the loader's
    first batch (data loading excluded), timed between device synchronisations; summed over
    ranks."""
    model.eval()
    forward, batch_size = task.timed_forward(config, model, next(iter(data_loader)), device)
    logger.info(f"throughput: {warmup} warm-up passes, then {repeats} timed passes of batch "
                f"size {batch_size}")
    with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
        for _ in range(warmup):
            forward()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            forward()
        synchronize(device)
    rate = repeats * batch_size / (time.perf_counter() - start)
    total = all_reduce_sum([rate], device)[0]
    overall = f" ({total:.1f} images/s over {get_world_size()} processes)"
    overall = overall if get_world_size() > 1 else ""
    logger.info(f"batch_size {batch_size} throughput {rate:.1f} images/s{overall}")
    return total


class Run:
    """One run of ``task`` with ``config``: :meth:`execute` trains, evaluates or times."""

    def __init__(self, config: CN, task: Task, preemption: Preemption) -> None:
        self.config, self.task, self.preemption = config, task, preemption
        self.training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
        self.device = torch.device("cpu")
        self.logger = logging.getLogger(LOGGER_NAME)

    def execute(self) -> None:
        """Sets up the process (device, process group, logger, threads, seeds) and runs;
        training holds the run folder's lock (utils.RunLock) throughout. A one-process run that
        fails before writing anything leaves no folder of its own behind (with several, a rank
        that failed alone would remove the folder under the others)."""
        created = prepare_output_dir(self.config.OUTPUT)
        try:
            self.set_up_and_run()
        except BaseException:
            if os.environ.get("WORLD_SIZE", "1") == "1":
                remove_empty_folders(created)
            raise

    def set_up_and_run(self) -> None:
        """:meth:`execute` in the output folder it prepared."""
        config = self.config
        self.device = init_device(config)
        # The log file opens once the checks have passed (open_log_file): a run that fails before
        # leaves an existing run folder as it was.
        self.logger = create_logger(config.OUTPUT, get_rank(), LOGGER_NAME, defer=True)
        if self.device.type == "cpu":
            self.logger.info(startup.choose_cpu_threads(
                int(os.environ.get("LOCAL_WORLD_SIZE", 1)), adapt=not config.DETERMINISTIC))
        seed_run(config)
        if not self.training:
            self.build_and_run()
            return
        lock, refused = RunLock(config.OUTPUT), ""
        if get_rank() == 0:
            try:
                lock.acquire(self.logger)
            except RunError as e:
                refused = str(e)
        if any_rank([bool(refused)], self.device)[0]:
            raise RunError(refused or "rank 0 could not lock the run folder (see its message)")
        try:
            self.build_and_run()
        finally:
            if get_rank() == 0:
                lock.release()

    def build_and_run(self) -> None:
        """Builds the loaders and the model, then trains, evaluates or times it (the log file
        opened once the inputs passed their checks)."""
        config, task, logger = self.config, self.task, self.logger
        if self.training:
            task.scale_lrs(config, get_world_size())
        self.log_setup()
        amp = amp_settings(config, self.device, logger)
        loaders = task.build_loaders(config)
        logger.info(f"{len(loaders.dataset_val)} validation images" + (
            f", {len(loaders.dataset_train)} training images" if self.training else ""))
        model = self.build_model()
        if not self.training:
            self.evaluate_or_time(model, loaders, amp)
            return
        trainer = Trainer(config, task, model, loaders, self.device, amp, self.preemption, logger)
        log_batch(config, trainer.updates_per_epoch, logger)
        trainer.resume()
        open_log_file(logger, config.OUTPUT, get_rank())
        trainer.saver.remove_leftover_temp_files()
        logger.info("Start training")
        trainer.fit()

    def log_setup(self) -> None:
        config, logger = self.config, self.logger
        logger.info(f"rank {get_rank()} of {get_world_size()} on {self.device}; full config:\n"
                    f"{config.dump()}")
        inert = inert_settings(config)
        if inert:
            logger.warning("Swin Transformer settings accepted but without effect here: "
                           + ", ".join(inert))
        if self.device.type == "cpu" and keep_freed_memory():
            logger.info("glibc malloc keeps freed memory for reuse (no per-step page faults)")

    def build_model(self) -> nn.Module:
        """The task's model on the device, initialised from --pretrained if given (for training
        and --throughput; --eval loads it whole, see ``evaluate_or_time``)."""
        config, logger = self.config, self.logger
        try:
            model = self.task.build_model(config)
        except ValueError as e:
            raise ConfigError(f"cannot build {config.MODEL.NAME}: {e}") from None
        model.to(self.device)
        logger.info(str(model))
        n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"number of params: {n_parameters}")
        if config.MODEL.PRETRAINED and not config.EVAL_MODE:
            self.task.load_pretrained(config, model, logger)
        return model

    def evaluate_or_time(self, model: nn.Module, loaders: Loaders, amp: Amp) -> None:
        """--eval: the task's validation of the checkpoint to resume (or the pretrained weights);
        --throughput: images/s of the model."""
        config, logger = self.config, self.logger
        if config.THROUGHPUT_MODE and not config.EVAL_MODE:
            open_log_file(logger, config.OUTPUT, get_rank())
            throughput(self.task, config, loaders.val, model, self.device, amp, logger)
            return
        resume = CheckpointSaver(config, logger).to_resume()
        if resume:
            load_weights(model, resume[1], resume[0])
        elif config.MODEL.PRETRAINED:  # evaluated as it is: it must fit whole, head included
            load_model_weights(model, config.MODEL.PRETRAINED)
        open_log_file(logger, config.OUTPUT, get_rank())
        if resume:
            logger.info(f"evaluating the weights of {resume[0]}")
        elif config.MODEL.PRETRAINED:
            logger.info(f"evaluating the weights of {config.MODEL.PRETRAINED} (--pretrained)")
        else:
            searched = (f", no checkpoint in {config.OUTPUT} (check --output and --tag)"
                        if config.TRAIN.AUTO_RESUME else "")
            logger.warning("evaluating a randomly initialised model: no --resume, no --pretrained"
                           f"{searched}")
        self.task.validate(config, loaders.val, model, self.device, amp, logger)
