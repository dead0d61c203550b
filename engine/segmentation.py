"""Semantic segmentation with UPerNet on an MG-SSAF backbone (ADE20K; the digits demo): the task
of ``main_seg.py``. Training counts iterations (optimizer steps): an engine "epoch" is
SEG.EVAL_INTERVAL of them, each followed by evaluation (aAcc / mAcc / mIoU) and a checkpoint."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.scheduler import PolyLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

from config import ConfigError
from data.build import SEGMENTATION_DATASETS
from data.segmentation import build_seg_loader, seg_class_names
from models.seg_inference import inference
from models.upernet import (HEAD_INITS, build_segmentor, convert_sync_batchnorm,
                            load_backbone_weights)
from optimizer import build_optimizer, keyword_decay_groups
from seg_metrics import SegMetrics, format_table, summarize
from models.checkpoint_io import CheckpointError, holds_segmenter, load_checkpoint_file
from utils import get_world_size

from .task import Amp, Loaders, Task


class SegLoss(nn.Module):
    """Cross-entropy of the decode head's logits plus ``aux_weight`` x that of the auxiliary
    head's, as mmseg 0.11 (``CrossEntropyLoss``, reduction 'mean', no ``avg_factor``; the aux
    head's ``loss_weight`` 0.4; the two summed): each is the mean over ALL pixels of the batch,
    a pixel labelled ``ignore_index`` contributing 0. A batch whose pixels are all ignored gives
    0 (PyTorch's default reduction, the mean over the non-ignored pixels, gives nan there)."""

    def __init__(self, ignore_index: int, aux_weight: float) -> None:
        super().__init__()
        self.ignore_index, self.aux_weight = ignore_index, aux_weight

    def pixel_mean(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel cross-entropy (0 where ignored), averaged over all pixels, in fp32."""
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                               reduction="none").mean()

    def forward(self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                target: torch.Tensor) -> torch.Tensor:
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = self.pixel_mean(logits, target)
        if aux is not None:
            loss = loss + self.aux_weight * self.pixel_mean(aux, target)
        return loss


def _on_device(image: torch.Tensor | list[torch.Tensor], device: torch.device
               ) -> torch.Tensor | list[torch.Tensor]:
    """A validation batch's image(s) on ``device``: one batch, or one per scale (ms_flip)."""
    return ([x.to(device) for x in image] if isinstance(image, (list, tuple))
            else image.to(device))


@torch.no_grad()
def validate(config: CN, data_loader: DataLoader, model: nn.Module, device: torch.device,
             amp: Amp, logger: logging.Logger) -> dict[str, float]:
    """aAcc / mAcc / mIoU from intersection / union totals summed over all ranks (every image
    once), by SEG.TEST_MODE; loss: the cross-entropy of the predicted probabilities."""
    model.eval()
    seg = config.SEG
    metrics = SegMetrics(config.MODEL.NUM_CLASSES, seg.IGNORE_INDEX, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x pixels, pixels, images
    for image, label in data_loader:  # image: a batch, or one per scale (ms_flip)
        image, label = _on_device(image, device), label.to(device)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            probs = inference(model, image, label.shape[-2:], seg).float()
        valid = int((label != seg.IGNORE_INDEX).sum())
        if valid:
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), label, ignore_index=seg.IGNORE_INDEX)
            sums += torch.tensor([loss.item() * valid, valid, 0], device=device,
                                 dtype=torch.float64)
        sums[2] += 1
        metrics.update(probs.argmax(1), label)
    if get_world_size() > 1:
        torch.distributed.all_reduce(metrics.totals)
        torch.distributed.all_reduce(sums)
    summary = summarize(metrics.totals)
    logger.info("per-class results:\n" + format_table(summary, seg_class_names(config)))
    loss = float(sums[0] / sums[1].clamp_min(1))
    images = int(sums[2])
    logger.info(f" * mIoU {summary['mIoU']:.2f} mAcc {summary['mAcc']:.2f} "
                f"aAcc {summary['aAcc']:.2f} loss {loss:.4f} over {images} images")
    return {"loss": loss, "aAcc": summary["aAcc"], "mAcc": summary["mAcc"],
            "mIoU": summary["mIoU"], "images": images}


class SegmentationTask(Task):
    """UPerNet + MG-SSAF on ADE20K or the digit scenes, trained by iterations."""
    prog, what = "main_seg.py", "UPerNet + MG-SSAF semantic segmentation"
    best_metric, best_metric_name = "mIoU", "mIoU"

    def prepare_config(self, config: CN) -> None:
        """The iteration schedule onto the engine's epochs: SEG.ITERS / SEG.EVAL_INTERVAL epochs
        of SEG.EVAL_INTERVAL optimizer steps; warm-up is in iterations (build_scheduler)."""
        seg = config.SEG
        if seg.EVAL_INTERVAL < 1 or seg.ITERS < 1 or seg.ITERS % seg.EVAL_INTERVAL:
            raise ConfigError(f"SEG.ITERS ({seg.ITERS}) must be a positive multiple of "
                              f"SEG.EVAL_INTERVAL ({seg.EVAL_INTERVAL})")
        if config.DATA.DATASET not in SEGMENTATION_DATASETS:
            raise ConfigError(f"DATA.DATASET {config.DATA.DATASET!r} is not a segmentation "
                              "dataset: expected one of "
                              + ", ".join(map(repr, SEGMENTATION_DATASETS)))
        if seg.HEAD_INIT not in HEAD_INITS:
            raise ConfigError(f"SEG.HEAD_INIT {seg.HEAD_INIT!r}: expected one of "
                              + ", ".join(map(repr, HEAD_INITS)))
        if config.EVAL_MODE and config.MODEL.PRETRAINED and not config.MODEL.RESUME:
            raise ConfigError(
                f"--eval --pretrained {config.MODEL.PRETRAINED}: --pretrained gives the backbone "
                "ImageNet weights for training (the decode heads would be evaluated at their "
                "initialisation); evaluate a main_seg.py checkpoint with --eval --resume")
        if config.TRAIN.LAYER_DECAY < 1.0:
            raise ConfigError(f"TRAIN.LAYER_DECAY {config.TRAIN.LAYER_DECAY}: main_seg.py has no "
                              "layer-wise LR decay (the recipe's paramwise_cfg has none)")
        config.TRAIN.EPOCHS = seg.ITERS // seg.EVAL_INTERVAL
        config.TRAIN.WARMUP_EPOCHS = 0

    def scale_lrs(self, config: CN, world_size: int) -> None:
        """None: the recipe's LR is for its total batch (16 images), as in mmsegmentation."""

    def build_loaders(self, config: CN) -> Loaders:
        dataset_train, dataset_val, loader_train, loader_val = build_seg_loader(config)
        return Loaders(dataset_val, loader_val, dataset_train, loader_train)

    def build_model(self, config: CN) -> nn.Module:
        device = torch.device("cuda" if torch.cuda.is_available() and config.DEVICE != "cpu"
                              else "cpu")
        return convert_sync_batchnorm(build_segmentor(config), get_world_size(), device)

    def load_pretrained(self, config: CN, model: nn.Module, logger: logging.Logger) -> None:
        """ImageNet MG-SSAF weights into ``model.backbone``; its final norm and classifier are not
        used, the backbone's output norms (norm0..norm3) and the heads start from their
        initialisation."""
        path = config.MODEL.PRETRAINED
        weights = load_checkpoint_file(path)["model"]
        if holds_segmenter(weights):
            raise CheckpointError(f"--pretrained {path}: it holds a whole segmentation model "
                                  "(UPerNet, main_seg.py), where --pretrained takes an ImageNet "
                                  "MG-SSAF checkpoint (main.py) for the backbone: to continue "
                                  "that run give it to --resume, or --eval --resume to evaluate it")
        try:
            new, unused = load_backbone_weights(model, weights)
        except RuntimeError as e:
            raise CheckpointError(f"--pretrained {path}: {e}") from None
        logger.info(f"loaded the backbone from {path}; new in the backbone (initialised here): "
                    f"{', '.join(new) or 'nothing'}; not used: {', '.join(unused) or 'nothing'}; "
                    "heads start from their initialisation")

    def build_criterion(self, config: CN, mixup_active: bool) -> nn.Module:
        return SegLoss(config.SEG.IGNORE_INDEX, config.SEG.AUX_WEIGHT)

    def build_optimizer(self, config: CN, model: nn.Module) -> torch.optim.Optimizer:
        """Weight decay as the recipe's ``paramwise_cfg``: none for parameter names containing
        'norm', 'relative_position_bias_table' or 'absolute_pos_embed', TRAIN.WEIGHT_DECAY for
        every other parameter, biases and the heads' BatchNorm included."""
        return build_optimizer(config, model,
                               keyword_decay_groups(model, config.TRAIN.WEIGHT_DECAY))

    def build_scheduler(self, config: CN, optimizer: torch.optim.Optimizer,
                        updates_per_epoch: int):
        """Per optimizer step: linear warm-up over SEG.WARMUP_ITERS from TRAIN.WARMUP_LR, then
        poly (SEG.POLY_POWER) to TRAIN.MIN_LR at SEG.ITERS. Unlike mmseg, which multiplies the
        poly curve by the warm-up factor, timm's warm-up is a line to the base LR; the poly
        curve counts from step 0 (warmup_prefix False), so at the warm-up's end the LR steps
        down from the base LR to the poly value (by WARMUP_ITERS / ITERS: 0.9% in the recipe)."""
        return PolyLRScheduler(optimizer, t_initial=config.SEG.ITERS, power=config.SEG.POLY_POWER,
                               lr_min=config.TRAIN.MIN_LR, warmup_t=config.SEG.WARMUP_ITERS,
                               warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_prefix=False,
                               t_in_epochs=False)

    def validate(self, config: CN, data_loader: DataLoader, model: nn.Module,
                 device: torch.device, amp: Amp, logger: logging.Logger) -> dict:
        return validate(config, data_loader, model, device, amp, logger)

    def timed_forward(self, config: CN, model: nn.Module, batch: Any,
                      device: torch.device) -> tuple[Callable[[], Any], int]:
        """--eval's inference of the batch's image(s) by SEG.TEST_MODE (padding to a multiple of
        32, windows, scales and flips included), at the size the validation pipeline gives
        them."""
        image, label = _on_device(batch[0], device), batch[1]
        size = label.shape[-2:]
        return (lambda: inference(model, image, size, config.SEG)), label.size(0)

    def metrics_row(self, stats: dict) -> dict:
        return {"val_loss": stats["loss"], "aAcc": stats["aAcc"], "mAcc": stats["mAcc"],
                "mIoU": stats["mIoU"]}
