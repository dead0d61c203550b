"""The training loop of every task: :class:`Trainer` holds the model, optimizer, loss scaler, LR
scheduler, EMA weights, autocast settings and progress, and runs epochs of optimizer steps,
validation, metrics and checkpoints."""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import resource
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from timm.utils import AverageMeter, ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

from utils import (RunError, all_reduce_sum, any_rank, broadcast_buffers, derive_seed, get_rank,
                   get_world_size, seed_all)

from .checkpoint import CheckpointSaver, Progress, checkpoint_name
from .preemption import Preempted, Preemption
from .task import Amp, Loaders, Task

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RunError):
    """The loss (or gradient norm) became NaN or infinite."""


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
        """Stops the loader's workers now, after a failure (persistent workers would otherwise
        live until the process exits)."""
        getattr(self.iterator, "shutdown", lambda: None)()


def is_loader_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from the training loader (a worker that died, or its pipe), not
    from a collective: where workers are this process's children (spawn), torch's SIGCHLD
    handler raises a worker's death anywhere (backward, ...)."""
    return (isinstance(error, (LoaderDied, ConnectionError, EOFError))
            or (isinstance(error, RuntimeError) and "DataLoader worker" in str(error)))


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of the process (CPU), in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_metrics(folder: str, row: dict) -> None:
    """Appends one JSON line to ``folder``/metrics.jsonl (rank 0)."""
    if get_rank() != 0:
        return
    with open(os.path.join(folder, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _last_and_mean(meter: AverageMeter) -> str:
    """``last (mean)`` of a meter of optimizer steps; ``- (-)`` before the first step of the
    epoch (micro-batches of gradient accumulation)."""
    return f"{meter.val:.4f} ({meter.avg:.4f})" if meter.count else "- (-)"


class _StepMeters:
    """Running averages of the step log line."""

    def __init__(self) -> None:
        self.batch_time, self.loss, self.norm, self.scale = (AverageMeter() for _ in range(4))
        self.end = time.time()

    def tick(self) -> None:
        self.batch_time.update(time.time() - self.end)
        self.end = time.time()


class Trainer:
    """Trains ``model`` (on ``device``, unwrapped) for ``task``: builds its optimizer, loss
    scaler, LR scheduler, criterion and EMA from the config, wraps it in DDP when a process group
    exists, and runs the epochs (:meth:`fit`)."""

    def __init__(self, config: CN, task: Task, model: nn.Module, loaders: Loaders,
                 device: torch.device, amp: Amp, preemption: Preemption,
                 logger: logging.Logger) -> None:
        self.config, self.task, self.loaders = config, task, loaders
        self.device, self.amp, self.preemption, self.logger = device, amp, preemption, logger
        model.to(memory_format=torch.channels_last)  # weights laid out as their gradients
        self.module = model
        self.optimizer = task.build_optimizer(config, model)
        self.ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if config.MODEL_EMA else None
        self.model = model
        if dist.is_initialized():
            self.model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=amp.enabled and amp.dtype == torch.float16)
        self.steps_per_epoch = len(loaders.train)  # loader steps of a whole epoch
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / config.TRAIN.ACCUMULATION_STEPS)
        self.lr_scheduler = task.build_scheduler(config, self.optimizer, self.updates_per_epoch)
        self.criterion = task.build_criterion(config, loaders.mixup_fn is not None)
        self.saver = CheckpointSaver(config, logger)
        self.class_names = task.class_names(config, loaders)
        self.start_epoch, self.best, self.progress = config.TRAIN.START_EPOCH, 0.0, Progress()

    # -- starting -----------------------------------------------------------------------------
    def resume(self) -> None:
        """Restores the checkpoint to resume, if any (``CheckpointSaver.to_resume``), else places
        the LR schedule at TRAIN.START_EPOCH, as if the epochs before it ran."""
        config, logger = self.config, self.logger
        resume = self.saver.to_resume()
        if not resume:
            if config.TRAIN.AUTO_RESUME:
                logger.info(f"no checkpoint in {config.OUTPUT}: training from scratch")
            self.progress = Progress(num_updates=config.TRAIN.START_EPOCH * self.updates_per_epoch)
            self.lr_scheduler.step_update(self.progress.num_updates)
            if config.TRAIN.START_EPOCH:
                logger.info(f"TRAIN.START_EPOCH {config.TRAIN.START_EPOCH}: the LR schedule starts "
                            f"at optimizer step {self.progress.num_updates}")
            return
        path, ckpt = resume
        self.start_epoch, self.best, self.progress = self.saver.restore(
            self, ckpt, path, self.updates_per_epoch)
        self.lr_scheduler.step_update(self.progress.num_updates)
        logger.info(f"resumed from {path}: epoch {self.start_epoch}, step "
                    f"{self.progress.epoch_step}, {self.progress.num_updates} optimizer steps "
                    f"done, max accuracy {self.best:.2f}%")
        if self.start_epoch >= config.TRAIN.EPOCHS:
            logger.info(f"nothing to train: the checkpoint has reached TRAIN.EPOCHS "
                        f"{config.TRAIN.EPOCHS}")

    def state(self, epoch: int, epoch_step: int | None = None) -> dict:
        """The checkpoint contents (see engine/checkpoint.py)."""
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "max_accuracy": float(self.best),
            "config": self.config,
            "epoch_step": epoch_step,
            "num_updates": self.progress.num_updates,
            "train_loss": ((self.progress.loss_sum, self.progress.loss_count)
                           if epoch_step is not None else (0.0, 0.0)),
            "world_size": get_world_size(),
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        if self.class_names is not None:
            state["class_names"] = [str(name) for name in self.class_names]
        return state

    # -- the epochs ---------------------------------------------------------------------------
    def fit(self) -> None:
        """Trains from ``start_epoch`` to TRAIN.EPOCHS: each epoch, its optimizer steps, then
        validation, a metrics.jsonl line and the checkpoints. Raises Preempted after saving when
        a stop signal arrived (mid-epoch: after the current optimizer step)."""
        config = self.config
        self.saver.remove_preempted_marker()
        start_time = time.time()
        for epoch in range(self.start_epoch, config.TRAIN.EPOCHS):
            first_step = self.progress.epoch_step
            self.loaders.train.sampler.set_epoch(epoch, first_step * config.DATA.BATCH_SIZE)
            epoch_start = time.time()
            self.train_epoch_or_stop(epoch)
            epoch_time = time.time() - epoch_start
            if self.progress.preempted:
                self.stop(epoch, self.progress.epoch_step)
            skipped = all_reduce_sum(
                [getattr(self.loaders.dataset_train, "pop_skipped", lambda: 0)()], self.device)[0]
            if skipped:
                self.logger.warning(f"epoch {epoch}: {int(skipped)} unreadable training image(s) "
                                    "skipped")
            self.logger.info(f"EPOCH {epoch} training takes "
                             f"{datetime.timedelta(seconds=int(epoch_time))}")
            is_best = self.evaluate(epoch, epoch_time, first_step)
            stop = any_rank([self.preemption.requested], self.device)[0]
            save_epoch = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or stop
            if save_epoch or is_best:
                self.saver.save(self.state(epoch), epoch, is_best=is_best, save_epoch=save_epoch)
            self.progress = Progress(num_updates=self.progress.num_updates)
            if stop:  # the epoch's checkpoint is saved (stop forces save_epoch)
                self.stop(epoch, None, saved=True)
        self.logger.info(f"Training time "
                         f"{datetime.timedelta(seconds=int(time.time() - start_time))}")

    def stop(self, epoch: int, epoch_step: int | None, saved: bool = False) -> None:
        """Saves the checkpoint of where training stands (unless ``saved``: the epoch's own),
        writes the PREEMPTED marker and raises Preempted."""
        if saved:
            path = os.path.join(self.config.OUTPUT, checkpoint_name(epoch, epoch_step))
        else:
            path = self.saver.save(self.state(epoch, epoch_step), epoch, epoch_step)
        self.saver.write_preempted_marker(path, self.preemption.signal_name or "on another rank",
                                          epoch, epoch_step)
        where = (f"after epoch {epoch}" if epoch_step is None else
                 f"at epoch {epoch} step {epoch_step}/{self.steps_per_epoch}")
        raise Preempted(f"{self.preemption.source} received: stopped {where} and saved {path}")

    def evaluate(self, epoch: int, epoch_time: float, first_step: int) -> bool:
        """Validates the model (and its EMA weights) after ``epoch``, appends the metrics.jsonl
        line and returns whether the score is the best so far."""
        config, task, logger = self.config, self.task, self.logger
        for module in (self.module, self.ema.module if self.ema is not None else None):
            if module is not None:
                broadcast_buffers(module)  # every rank evaluates the state rank 0 saves
        stats = task.validate(config, self.loaders.val, self.module, self.device, self.amp, logger)
        if not math.isfinite(stats["loss"]):
            raise NonFiniteLossError(f"validation loss is {stats['loss']} after epoch {epoch}: the "
                                     "model diverged and is not saved")
        row, ema_row, best = task.metrics_row(stats), {}, stats[task.best_metric]
        if self.ema is not None:
            logger.info("EMA weights:")
            ema_stats = task.validate(config, self.loaders.val, self.ema.module, self.device,
                                      self.amp, logger)
            ema_row = {f"{key.removeprefix('val_')}_ema": value
                       for key, value in task.metrics_row(ema_stats).items()}
            best = max(best, ema_stats[task.best_metric])
        is_best, self.best = best > self.best, max(self.best, best)
        logger.info(f"Max {task.best_metric_name}: {self.best:.2f}%" + (
            " (model or EMA weights)" if self.ema is not None else ""))
        # Metrics first: a crash in between repeats this line after the resume (the last one of an
        # epoch counts), it never leaves an epoch out.
        progress = self.progress
        images = (progress.epoch_step - first_step) * config.DATA.BATCH_SIZE * get_world_size()
        append_metrics(config.OUTPUT, {
            "epoch": epoch, "train_loss": progress.loss_sum / max(progress.loss_count, 1),
            "lr": self.optimizer.param_groups[0]["lr"], **row, "epoch_time": epoch_time,
            "images_per_sec": images / epoch_time, "num_updates": progress.num_updates,
            **ema_row})
        return is_best

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch_or_stop(self, epoch: int) -> None:
        """:meth:`train_one_epoch`; a loader worker that dies of a stop signal ends the epoch as
        preempted (the state of the last optimizer step is intact). A failed collective (a peer
        rank died) is not caught: it is a failure, signal or not (torchrun itself SIGTERMs the
        survivors of a dead rank)."""
        try:
            self.train_one_epoch(epoch)
        except (LoaderDied, RuntimeError, ConnectionError, EOFError) as caught:
            e = caught.error if isinstance(caught, LoaderDied) else caught
            if not (self.preemption.requested and is_loader_failure(caught)):
                if isinstance(caught, LoaderDied):
                    raise e from None
                raise
            # One that dies while handing over a batch's shared memory shows as
            # ConnectionResetError, or EOFError.
            self.logger.warning(f"{type(e).__name__} while stopping on "
                                f"{self.preemption.signal_name}: "
                                f"{(str(e).splitlines() or [''])[0]}")
            self.progress.preempted = True

    def train_one_epoch(self, epoch: int) -> None:
        """One epoch (or its rest, from ``progress.epoch_step``), updating ``progress`` (and the
        EMA weights) at each optimizer step. Stops early, with ``progress.preempted`` set, after
        the optimizer step during which a preemption signal arrived on any rank; raises
        NonFiniteLossError, before the update, on a NaN/inf loss. Mixup/CutMix, drop path and
        dropout draw from generators seeded from (SEED, epoch, step, rank) at each step, so a
        resumed epoch repeats the uninterrupted one."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_steps = self.progress.epoch_step + len(self.loaders.train)
        batches = LoaderBatches(self.loaders.train, self.progress.epoch_step)
        try:
            self._train_steps(batches, epoch, num_steps)
        except BaseException:
            batches.shutdown()
            raise

    def _train_steps(self, batches: LoaderBatches, epoch: int, num_steps: int) -> None:
        """The loop of :meth:`train_one_epoch` over ``batches``."""
        config, device = self.config, self.device
        accum = config.TRAIN.ACCUMULATION_STEPS
        meters, nonfinite = _StepMeters(), ""
        group = [0.0, 0.0]  # this rank's summed loss and samples since the last optimizer step
        for idx, (samples, targets) in batches:
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            seed_all(derive_seed(config.SEED, epoch, idx, get_rank()))
            if self.loaders.mixup_fn is not None:
                samples, targets = self.loaders.mixup_fn(samples, targets)
            group_start = idx - idx % accum
            group_size = min(accum, num_steps - group_start)
            is_update = idx == group_start + group_size - 1
            loss_value = self._forward_backward(samples, targets, group_size, is_update)
            if not math.isfinite(loss_value) and not nonfinite:
                nonfinite = f"loss is {loss_value}"
            meters.loss.update(loss_value, samples.size(0))
            group[0] += loss_value * samples.size(0)
            group[1] += samples.size(0)
            stop = False
            if is_update:
                stop = self._optimizer_step(group, nonfinite, meters, epoch, idx, num_steps)
                group = [0.0, 0.0]
            meters.tick()
            if idx % config.PRINT_FREQ == 0:
                self._log_step(meters, epoch, idx, num_steps)
            if stop and idx + 1 < num_steps:
                self.progress.preempted = True
                return

    def _forward_backward(self, samples: torch.Tensor, targets: torch.Tensor, group_size: int,
                          is_update: bool) -> float:
        """Forward, loss and backward of one micro-batch (DDP syncs gradients only on the last
        of an optimizer step's); returns the loss."""
        skip_sync = isinstance(self.model, DistributedDataParallel) and not is_update
        with self.model.no_sync() if skip_sync else nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
                outputs = self.model(samples)
                loss = self.criterion(outputs, targets)
            self.scaler.scale(loss / group_size).backward()
        return loss.item()

    def _optimizer_step(self, group: list[float], nonfinite: str, meters: _StepMeters,
                        epoch: int, idx: int, num_steps: int) -> bool:
        """Clips, checks every rank for a non-finite loss or a stop request, steps the optimizer,
        scaler, EMA and LR schedule and advances ``progress``; returns whether to stop."""
        config, progress = self.config, self.progress
        self.scaler.unscale_(self.optimizer)
        max_norm = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled() and not nonfinite:
            nonfinite = f"gradient norm is {grad_norm}"
        diverged, requested, loss_sum, loss_count = all_reduce_sum(
            [float(bool(nonfinite)), float(self.preemption.requested), *group], self.device)
        if diverged:
            raise NonFiniteLossError(
                f"training {nonfinite or 'loss is not finite on another rank'} at epoch "
                f"{epoch} step {idx}/{num_steps} (rank {get_rank()}): stopped before this update")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        progress.num_updates += 1
        progress.epoch_step = idx + 1
        progress.loss_sum += loss_sum
        progress.loss_count += int(loss_count)
        if self.ema is not None:
            self.ema.update(self.model, step=progress.num_updates)
        self.lr_scheduler.step_update(progress.num_updates)
        meters.norm.update(grad_norm)
        meters.scale.update(self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        return requested > 0

    def _log_step(self, meters: _StepMeters, epoch: int, idx: int, num_steps: int) -> None:
        group = self.optimizer.param_groups[0]
        eta = datetime.timedelta(seconds=int(meters.batch_time.avg * (num_steps - idx - 1)))
        self.logger.info(
            f"Train: [{epoch}/{self.config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
            f"eta {eta} lr {group['lr']:.6f}\t wd {group['weight_decay']:.4f}\t"
            f"time {meters.batch_time.val:.4f} ({meters.batch_time.avg:.4f})\t"
            f"loss {meters.loss.val:.4f} ({meters.loss.avg:.4f})\t"
            f"grad_norm {_last_and_mean(meters.norm)}\t"
            f"loss_scale {_last_and_mean(meters.scale)}\t"
            f"mem {memory_mb(self.device):.0f}MB")
