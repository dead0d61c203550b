"""Image classification (ImageNet-style folders, CUB-200-2011, the digits demo): the task of
``main.py``."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

from data import build_loader
from lr_scheduler import build_scheduler, scale_lrs
from models import build_model
from optimizer import build_optimizer
from models.checkpoint_io import load_pretrained
from utils import all_reduce_sum

from .task import Amp, Loaders, Task
from .trainer import memory_mb


def build_criterion(config: CN, mixup_active: bool) -> nn.Module:
    """Soft-target cross-entropy with Mixup/CutMix (which smooth the labels), else label
    smoothing (MODEL.LABEL_SMOOTHING), else plain cross-entropy."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


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


class ClassificationTask(Task):
    """MG-SSAF classifiers on image folders; Swin's recipe (LR scaled to the total batch,
    Mixup/CutMix, label smoothing, layer decay for fine-tuning)."""
    prog, what = "main.py", "MG-SSAF"
    best_metric, best_metric_name = "acc1", "accuracy"

    def prepare_config(self, config: CN) -> None:
        """Nothing to derive: the classification keys are the config's own."""

    def scale_lrs(self, config: CN, world_size: int) -> None:
        scale_lrs(config, world_size)

    def build_loaders(self, config: CN) -> Loaders:
        dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)
        return Loaders(dataset_val, loader_val, dataset_train, loader_train, mixup_fn)

    def build_model(self, config: CN) -> nn.Module:
        return build_model(config)

    def load_pretrained(self, config: CN, model: nn.Module, logger: logging.Logger) -> None:
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

    def timed_forward(self, config: CN, model: nn.Module, batch: Any,
                      device: torch.device) -> tuple[Callable[[], Any], int]:
        """The model's forward pass on the batch's images."""
        images = batch[0].to(device, non_blocking=True)
        return (lambda: model(images)), images.size(0)

    def metrics_row(self, stats: dict) -> dict:
        return {"val_loss": stats["loss"], "acc1": stats["acc1"], "acc5": stats["acc5"]}
