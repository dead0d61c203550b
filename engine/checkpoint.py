"""The checkpoints of a run folder: save, prune, best, the PREEMPTED marker, which checkpoint to
resume from, and restoring the training state from it.

File names, in the run folder (``config.OUTPUT``): ``ckpt_epoch_{e}.pth`` after epoch ``e``,
``ckpt_epoch_{e}_step_{n}.pth`` after ``n`` loader steps of it (a preemption), ``ckpt_best.pth``
(the best validation score), ``PREEMPTED`` (``key=value`` lines naming the checkpoint to resume,
while the run stands preempted). Every checkpoint is written atomically with its SHA-256 inside
(``utils.atomic_save``) and read by the one safe reader (``load_checkpoint_file``).

Contents: ``model, optimizer, lr_scheduler, scaler, epoch, max_accuracy, config`` as the released
(Swin-style) checkpoints have them (``max_accuracy`` holds the task's best score: Acc@1, or mIoU),
plus ``epoch_step`` (loader steps done in ``epoch``; None after the whole epoch), ``num_updates``
(optimizer steps so far), ``train_loss`` (sum and count of the epoch's losses so far, over all
ranks), ``world_size``, ``model_ema`` (with MODEL_EMA) and ``class_names`` (the dataset's classes
in the order of the logits). No RNG state: every random draw of training is a function of SEED,
epoch and step or sample.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from yacs.config import CfgNode as CN

from models.checkpoint_io import CheckpointError, load_checkpoint_file, load_weights
from utils import RunError, atomic_save, check_in, get_rank, get_world_size

from .preemption import PREEMPTED_EXIT_CODE

CHECKPOINT_RE = re.compile(r"^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$")
BEST_CHECKPOINT = "ckpt_best.pth"
PREEMPTED_MARKER = "PREEMPTED"
# What a killed save leaves: atomic_save's temporary files and the marker's.
LEFTOVER_TMP_RE = re.compile(r"^(\.ckpt_.*\.pth\..*\.tmp|PREEMPTED\.tmp)$")


def checkpoint_name(epoch: int, epoch_step: int | None = None) -> str:
    """``ckpt_epoch_{epoch}.pth`` after a whole epoch, ``ckpt_epoch_{epoch}_step_{n}.pth`` after
    ``n`` loader steps of it."""
    if epoch_step is None:
        return f"ckpt_epoch_{epoch}.pth"
    return f"ckpt_epoch_{epoch}_step_{epoch_step}.pth"


def list_checkpoints(folder: str) -> list[tuple[int, float, str]]:
    """``(epoch, step, path)`` of the epoch checkpoints in ``folder``, oldest first; a whole-epoch
    checkpoint has step ``inf`` (it comes after every mid-epoch one of the same epoch)."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = CHECKPOINT_RE.match(name)
        if match:
            step = float("inf") if match.group(2) is None else int(match.group(2))
            found.append((int(match.group(1)), step, os.path.join(folder, name)))
    return sorted(found)


def prune_checkpoints(folder: str, epoch: int, keep: int, logger: logging.Logger) -> None:
    """After the whole-epoch checkpoint of ``epoch`` is saved: removes mid-epoch checkpoints up to
    ``epoch`` and whole-epoch ones older than the newest ``keep`` (``keep`` 0 keeps them all).
    Checkpoints of later epochs (another run's) are left alone, and so is every file that does
    not load (unreadable, corrupt, refused): it is named in a warning, never deleted."""
    older = [(step, path) for e, step, path in list_checkpoints(folder) if e <= epoch]
    whole = [path for step, path in older if step == float("inf")]
    stale = [path for step, path in older if step != float("inf")]
    if keep > 0:
        stale += whole[:-keep]
    for path in stale:
        try:
            load_checkpoint_file(path)
        except CheckpointError as e:
            logger.warning(f"not pruned, as it does not load: {e}; delete it yourself once "
                           "you have looked at it")
            continue
        os.remove(path)
        logger.info(f"removed old checkpoint {path}")


def newest_loadable_checkpoint(folder: str, logger: logging.Logger) -> tuple[str, dict] | None:
    """The newest epoch checkpoint in ``folder`` that loads, with its contents; unreadable or
    refused ones are reported and skipped (left in place)."""
    for _, _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint_file(path)
        except CheckpointError as e:
            logger.warning(f"auto-resume skips {e}")
    return None


def find_resume_checkpoint(folder: str, logger: logging.Logger) -> tuple[str, dict] | None:
    """The checkpoint to auto-resume from, the same on every rank (a collective): rank 0 picks the
    newest loadable one in ``folder`` and sends its path; the other ranks load that path. A rank
    that cannot load it makes every rank raise CheckpointError naming the rank and the file."""
    if get_world_size() == 1:
        return newest_loadable_checkpoint(folder, logger)
    found = newest_loadable_checkpoint(folder, logger) if get_rank() == 0 else None
    chosen = [found[0] if found else None]
    dist.broadcast_object_list(chosen, src=0)
    path, error = chosen[0], None
    if path is not None and get_rank() != 0:
        try:
            found = path, load_checkpoint_file(path)
        except CheckpointError as e:
            error = str(e)
    errors: list[Any] = [None] * get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"auto-resume: rank 0 chose {path}, but rank {rank} cannot load it "
                              f"({message}); the output folder must be one that every node "
                              f"sees (a shared filesystem)")
    return found


@dataclass
class Progress:
    """Where training stands; a mid-epoch checkpoint restores it."""
    num_updates: int = 0      # optimizer steps since the start of training
    epoch_step: int = 0       # loader steps of the current epoch up to the last optimizer step
    loss_sum: float = 0.0     # summed training loss of those steps' samples, over all ranks
    loss_count: int = 0
    preempted: bool = False


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


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value[:4]) + (", ...]" if len(value) > 4 else "]")
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_ABSENT = object()


def setting_changes(saved: Any, current: dict, ignore: tuple[str, ...] = (),
                    one_sided: bool = True) -> list[str]:
    """``name old -> new`` for each setting of ``current`` (a timm scheduler's state: ``t_initial``,
    ``base_values``, ...; an optimizer's param group: ``weight_decay``, ...) that ``saved`` holds
    with another value; with ``one_sided`` also those only one of them holds (shown as ``-``).
    Nothing where ``saved`` is not a dict (a checkpoint without it)."""
    if not isinstance(saved, dict):
        return []
    def shown(value: Any) -> str:
        return "-" if value is _ABSENT else _shown(value)

    changes = []
    for key in [*current, *(k for k in saved if k not in current)]:
        old, new = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        one_side_only = old is _ABSENT or new is _ABSENT
        if key in ignore or (one_side_only and not one_sided) or old == new:
            continue
        changes.append(f"{key} {shown(old)} -> {shown(new)}")
    return changes


class CheckpointSaver:
    """The checkpoints of the run folder ``config.OUTPUT``. Rank 0 writes; the other ranks return
    from :meth:`save` at once (no collective, so a rank can save while its peers are gone)."""

    def __init__(self, config: CN, logger: logging.Logger) -> None:
        self.config, self.folder, self.logger = config, config.OUTPUT, logger
        self.writes = get_rank() == 0

    # -- saving -------------------------------------------------------------------------------
    def save(self, state: dict, epoch: int, epoch_step: int | None = None, is_best: bool = False,
             save_epoch: bool = True) -> str:
        """Saves ``state`` (see the module docstring) as the epoch (or mid-epoch) checkpoint and,
        with ``is_best``, as ``ckpt_best.pth``; after a whole epoch, prunes older checkpoints
        (TRAIN.KEEP_CHECKPOINTS). Returns the epoch checkpoint's path."""
        path = os.path.join(self.folder, checkpoint_name(epoch, epoch_step))
        if not self.writes:
            return path
        if is_best:
            # Before the epoch checkpoint: a crash in between leaves the epoch to run again (its
            # checkpoint is not there), which saves the best again. The other order would leave an
            # epoch checkpoint whose max_accuracy no later epoch beats, and no best checkpoint.
            best = os.path.join(self.folder, BEST_CHECKPOINT)
            atomic_save(state, best)
            self.logger.info(f"{best} saved (best validation score {state['max_accuracy']:.3f})")
        if save_epoch:
            self._keep_existing(path)
            self.logger.info(f"saving {path}")
            atomic_save(state, path)
            self.logger.info(f"{path} saved")
            if epoch_step is None:
                prune_checkpoints(self.folder, epoch, self.config.TRAIN.KEEP_CHECKPOINTS,
                                  self.logger)
        return path

    def _keep_existing(self, path: str) -> None:
        """Moves an existing file at ``path`` aside rather than write over it: only after a resume
        from an older checkpoint, e.g. when auto-resume skipped this one as unreadable."""
        if os.path.exists(path):
            kept = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path, kept)
            self.logger.warning(f"{path} already exists (auto-resume skipped it, or the run "
                                f"resumed from an older checkpoint): kept as {kept}")

    def remove_leftover_temp_files(self) -> None:
        """Removes the temporary files of saves that a kill interrupted (rank 0, which holds the
        run's lock)."""
        if not self.writes or not os.path.isdir(self.folder):
            return
        for name in sorted(os.listdir(self.folder)):
            if LEFTOVER_TMP_RE.match(name):
                os.remove(os.path.join(self.folder, name))
                self.logger.info(f"removed {os.path.join(self.folder, name)}, left by an "
                                 "interrupted save")

    # -- the PREEMPTED marker ---------------------------------------------------------------
    def write_preempted_marker(self, checkpoint: str, signal_source: str, epoch: int | str,
                               epoch_step: int | str | None) -> None:
        """Writes ``PREEMPTED`` (rank 0), ``key=value`` lines naming the checkpoint just saved and
        the signal: what a requeue script reads, whatever exit code the launcher reports. Only once
        every rank has passed the save (checked in, see ``utils.check_in``): a rank that died
        meanwhile makes the stop a failure (RunError), with no marker."""
        # Rank 0 checks in after its save and waits for the others (who have nothing to save).
        missing = check_in(f"saved/{epoch}/{epoch_step}", min(self.config.DIST_TIMEOUT, 60),
                           wait=get_rank() == 0)
        if missing:
            raise RunError(f"rank(s) {', '.join(map(str, missing))} did not reach the end of the "
                           f"save of {checkpoint} (died or stuck): a failure, not a preemption; "
                           "no PREEMPTED marker written")
        if missing is None:
            raise RunError(f"the ranks could not confirm that each passed the save of "
                           f"{checkpoint} (the process group's store is gone): no PREEMPTED "
                           "marker written")
        if not self.writes:
            return
        lines = {"checkpoint": checkpoint, "signal": signal_source, "epoch": epoch,
                 "step": "end" if epoch_step is None else epoch_step,
                 "exit_code": PREEMPTED_EXIT_CODE, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = os.path.join(self.folder, PREEMPTED_MARKER)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(f"{key}={value}\n" for key, value in lines.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def remove_preempted_marker(self) -> None:
        """Removes ``PREEMPTED`` (rank 0) once training runs again: from then on the run either
        completes, or stops and writes a new one."""
        path = os.path.join(self.folder, PREEMPTED_MARKER)
        if self.writes and os.path.exists(path):
            os.remove(path)

    # -- resuming -----------------------------------------------------------------------------
    def to_resume(self) -> tuple[str, dict] | None:
        """The checkpoint to start from: with TRAIN.AUTO_RESUME the newest loadable one in the run
        folder (it wins over --resume when training, so a requeued job continues where it
        stopped; with --eval the weights given by --resume or --pretrained win), else
        MODEL.RESUME, else none. A --resume that is not a loadable checkpoint stops the run
        (CheckpointError) either way."""
        config = self.config
        explicit = config.MODEL.RESUME
        loaded = (explicit, load_checkpoint_file(explicit)) if explicit else None
        if config.TRAIN.AUTO_RESUME and not (config.EVAL_MODE and (explicit or
                                                                  config.MODEL.PRETRAINED)):
            found = find_resume_checkpoint(self.folder, self.logger)
            if found:
                if explicit:
                    self.logger.warning(f"auto-resume: continuing from {found[0]} instead of "
                                        f"--resume {explicit}")
                return found
        return loaded

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict, path: str) -> None:
        """Loads the optimizer's state (moments, step counts) from a checkpoint's ``state`` and
        keeps the hyperparameters of this run's param groups (weight decay, betas, layer-decay
        scales, ...), with a warning naming those the checkpoint had otherwise."""
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this run: "
                                  f"{e}") from None
        changed: dict[str, None] = {}  # in order, once each
        for group, settings in zip(optimizer.param_groups, configured):
            changed.update(dict.fromkeys(setting_changes(
                group, settings, ignore=("params", "lr", "initial_lr"), one_sided=False)))
            group.update(settings)
        if changed:
            shown = list(changed)[:6] + (["..."] if len(changed) > 6 else [])
            self.logger.warning(f"the checkpoint's optimizer settings differ from this run's "
                                f"config ({', '.join(shown)}): this run's apply, with the "
                                "checkpoint's moments")

    def restore(self, trainer: Any, ckpt: dict, path: str,
                updates_per_epoch: int) -> tuple[int, float, Progress]:
        """Restores ``trainer``'s model (and EMA) weights, optimizer state and loss scaler from
        ``ckpt``; returns the epoch to start, the best score so far and the progress. The
        optimizer's hyperparameters and the LR scheduler stay those this run's config built (the
        LR is a function of the progress's optimizer steps), with a warning where the
        checkpoint's differ."""
        load_weights(trainer.module, ckpt, path)
        if trainer.ema is not None:
            if "model_ema" in ckpt:
                load_weights(trainer.ema.module, {**ckpt, "model": ckpt["model_ema"]}, path)
            else:
                self.logger.warning(f"{path} has no EMA weights: the EMA restarts from the model's")
                trainer.ema.module.load_state_dict(trainer.module.state_dict())
        if "optimizer" not in ckpt:
            raise CheckpointError(f"{path}: has no 'optimizer' entry: it holds weights only; use "
                                  "--pretrained to start training from it")
        self._load_optimizer(trainer.optimizer, ckpt["optimizer"], path)
        if trainer.scaler.is_enabled() and ckpt.get("scaler"):
            trainer.scaler.load_state_dict(ckpt["scaler"])
        start_epoch, progress = resume_position(ckpt, self.config, updates_per_epoch,
                                                self.logger)
        # The LR schedule is this run's (a function of the optimizer steps done), not the saved
        # one: a longer TRAIN.EPOCHS, another BASE_LR or batch layout takes effect on resume.
        changed = setting_changes(ckpt.get("lr_scheduler"), trainer.lr_scheduler.state_dict(),
                                  ignore=("metric",))
        if changed:
            self.logger.warning(f"the checkpoint's LR schedule differs from this run's config "
                                f"({', '.join(changed)}): the LR follows this run's from "
                                f"optimizer step {progress.num_updates}")
        return start_epoch, float(ckpt.get("max_accuracy", 0.0)), progress
