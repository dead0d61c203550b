"""What differs between the engine's tasks (classification, segmentation): the interface.

The engine (:mod:`engine.run`, :class:`engine.trainer.Trainer`) builds everything through a
task object and never asks which task it runs. A task is a sibling of the others, implementing
every method below (``class_names`` has a default); ``engine/classification.py`` and
``engine/segmentation.py`` are the two.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode as CN


@dataclass
class Amp:
    """Autocast settings of the run."""
    enabled: bool
    dtype: torch.dtype


@dataclass
class Loaders:
    """The datasets and loaders of a run; the training ones are None for --eval/--throughput.
    The training loader's sampler has ``set_epoch(epoch, start_index)`` (data.samplers)."""
    dataset_val: Dataset
    val: DataLoader
    dataset_train: Dataset | None = None
    train: DataLoader | None = None
    mixup_fn: Any = None  # timm's Mixup, applied to each training batch, or None


class Task:
    """The interface; every method is the task's one way to do that job."""
    prog = "main.py"          # for --help
    what = "MG-SSAF"
    best_metric = "acc1"      # the statistic of validate() that ranks checkpoints (ckpt_best.pth)
    best_metric_name = "accuracy"

    def prepare_config(self, config: CN) -> None:
        """Checks the task's own keys and sets those it derives from others (config unfrozen)."""
        raise NotImplementedError

    def scale_lrs(self, config: CN, world_size: int) -> None:
        """Scales the learning rates to the run's total batch, if the task does (unfrozen)."""
        raise NotImplementedError

    def build_loaders(self, config: CN) -> Loaders:
        raise NotImplementedError

    def build_model(self, config: CN) -> nn.Module:
        raise NotImplementedError

    def load_pretrained(self, config: CN, model: nn.Module, logger: logging.Logger) -> None:
        """Initialises ``model`` from ``--pretrained`` (MODEL.PRETRAINED)."""
        raise NotImplementedError

    def build_criterion(self, config: CN, mixup_active: bool) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self, config: CN, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_scheduler(self, config: CN, optimizer: torch.optim.Optimizer,
                        updates_per_epoch: int) -> Any:
        """A timm scheduler, stepped with ``step_update(num_updates)`` after each update."""
        raise NotImplementedError

    def validate(self, config: CN, data_loader: DataLoader, model: nn.Module,
                 device: torch.device, amp: Amp, logger: logging.Logger) -> dict[str, float]:
        """Statistics over the whole validation set (all ranks); ``loss`` and
        ``best_metric`` among them."""
        raise NotImplementedError

    def timed_forward(self, config: CN, model: nn.Module, batch: Any,
                      device: torch.device) -> tuple[Callable[[], Any], int]:
        """What --throughput times (a function of no arguments) on the validation loader's
        first ``batch``, and the number of images it covers."""
        raise NotImplementedError

    def metrics_row(self, stats: dict[str, float]) -> dict[str, float]:
        """The validation statistics that go into a metrics.jsonl line."""
        raise NotImplementedError

    def class_names(self, config: CN, loaders: Loaders) -> list[str] | None:
        """The class names, in the order of the logits, that checkpoints store: the validation
        dataset's ``classes`` (image folders, CUB), where it has them."""
        return getattr(loaders.dataset_val, "classes", None)
