"""Learning-rate schedules (timm), updated after every optimizer step, and the linear LR scaling."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from yacs.config import CfgNode as CN

from config import ConfigError

# Total batch for which TRAIN.BASE_LR, WARMUP_LR and MIN_LR are given.
REFERENCE_BATCH = 512


def scale_lrs(config: CN, world_size: int) -> None:
    """Scales ``TRAIN.BASE_LR``, ``WARMUP_LR`` and ``MIN_LR`` in place by the total batch
    (``DATA.BATCH_SIZE x world_size x TRAIN.ACCUMULATION_STEPS``) / 512."""
    factor = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / REFERENCE_BATCH
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def build_scheduler(config: CN, optimizer: torch.optim.Optimizer,
                    updates_per_epoch: int) -> Scheduler:
    """``TRAIN.LR_SCHEDULER.NAME`` with a linear warm-up from ``WARMUP_LR`` over ``WARMUP_EPOCHS``,
    counted in optimizer steps: call ``step_update(num_updates)`` after every optimizer step.

    'cosine' and 'linear' decay to ``MIN_LR``, after the warm-up with ``WARMUP_PREFIX`` (over the
    remaining steps) or under it. As in Swin, 'step' multiplies the LR by ``DECAY_RATE`` every
    ``DECAY_EPOCHS`` and 'multistep' by ``GAMMA`` at each epoch of ``MULTISTEPS``, both counted
    from the start of training; the warm-up overrides the first epochs."""
    sched = config.TRAIN.LR_SCHEDULER
    total = config.TRAIN.EPOCHS * updates_per_epoch
    warmup = config.TRAIN.WARMUP_EPOCHS * updates_per_epoch
    common = dict(warmup_t=warmup, warmup_lr_init=config.TRAIN.WARMUP_LR, t_in_epochs=False)
    name = sched.NAME.lower()
    if name in ("cosine", "linear"):
        t_initial = total - warmup if sched.WARMUP_PREFIX else total
        if name == "cosine":
            return CosineLRScheduler(optimizer, t_initial=t_initial, lr_min=config.TRAIN.MIN_LR,
                                     cycle_limit=1, warmup_prefix=sched.WARMUP_PREFIX, **common)
        return PolyLRScheduler(optimizer, t_initial=t_initial, power=1.0,
                               lr_min=config.TRAIN.MIN_LR, cycle_limit=1,
                               warmup_prefix=sched.WARMUP_PREFIX, **common)
    if name == "step":
        if sched.DECAY_EPOCHS < 1:
            raise ConfigError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be at least 1, got "
                              f"{sched.DECAY_EPOCHS}")
        return StepLRScheduler(optimizer, decay_t=sched.DECAY_EPOCHS * updates_per_epoch,
                               decay_rate=sched.DECAY_RATE, warmup_prefix=False, **common)
    if name == "multistep":
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in sched.MULTISTEPS):
            raise ConfigError(f"TRAIN.LR_SCHEDULER.MULTISTEPS expects a list of epochs (integers), "
                              f"got {list(sched.MULTISTEPS)}")
        # timm applies milestone m from step m - 1 on (its documented convention); Swin, like
        # torch's MultiStepLR, from step m: hence the + 1.
        milestones = sorted(e * updates_per_epoch + 1 for e in sched.MULTISTEPS)
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=sched.GAMMA,
                                    warmup_prefix=False, **common)
    raise ConfigError(f"TRAIN.LR_SCHEDULER.NAME {sched.NAME!r} is unknown: expected 'cosine', "
                     "'linear', 'step' or 'multistep'")
