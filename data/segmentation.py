"""Datasets and loaders of segmentation runs (``main_seg.py``): ADE20K and the digit scenes."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode as CN

from utils import get_rank, get_world_size

from .build import SEGMENTATION_DATASETS, DataError, Loader
from .samplers import ResumableSampler, SeededSamples, ShardSampler
from .seg_pipeline import SegTestTransform, SegTrainTransform, multi_scale_ratios


def seg_class_names(config: CN) -> list[str]:
    """Names of the classes of DATA.DATASET, for the per-class table: ADE20K's from the data
    folder's objectInfo150.txt where it has a readable one; numbers where there are none."""
    if config.DATA.DATASET == "digits_seg":
        from .digits_seg import CLASS_NAMES
        return CLASS_NAMES
    if config.DATA.DATASET == "ade20k" and config.DATA.DATA_PATH:
        from .ade20k import read_class_names
        names = read_class_names(config.DATA.DATA_PATH)
        if names is not None:
            return list(names)
    return [str(k) for k in range(config.MODEL.NUM_CLASSES)]


def build_seg_dataset(config: CN, is_train: bool) -> Dataset:
    """The split of DATA.DATASET."""
    name, seg = config.DATA.DATASET, config.SEG
    if name == "ade20k":
        from .ade20k import NUM_CLASSES, build_ade20k
        if not config.DATA.DATA_PATH:
            raise DataError("DATA.DATA_PATH (--data-path) is not set: give the "
                            "ADEChallengeData2016 folder")
        transform = (SegTrainTransform(seg.SCALE, seg.RATIO_RANGE, seg.CROP_SIZE,
                                       seg.CAT_MAX_RATIO, photometric=seg.PHOTOMETRIC,
                                       ignore_index=seg.IGNORE_INDEX)
                     if is_train else SegTestTransform(seg.SCALE, multi_scale_ratios(seg)))
        dataset = build_ade20k(config.DATA.DATA_PATH, is_train, transform, config.SEED,
                               config.DATA.SKIP_BAD_IMAGES)
    elif name == "digits_seg":
        from .digits_seg import NUM_CLASSES, DigitsSegDataset
        dataset = DigitsSegDataset(is_train, size=seg.CROP_SIZE[0], seed=config.SEED)
    else:
        raise DataError(f"DATA.DATASET {name!r} is unknown to main_seg.py: expected one of "
                        f"{', '.join(repr(n) for n in SEGMENTATION_DATASETS)}")
    if NUM_CLASSES != config.MODEL.NUM_CLASSES:
        raise DataError(f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES} but the {name} dataset "
                        f"has {NUM_CLASSES} classes")
    return dataset


def build_seg_loader(config: CN) -> tuple[Dataset | None, Dataset, DataLoader | None, DataLoader]:
    """``dataset_train, dataset_val, data_loader_train, data_loader_val``; the training parts
    are None in EVAL_MODE and THROUGHPUT_MODE. Validation runs at batch 1 (images differ in
    size), every image once across ranks; training draws SEG.EVAL_INTERVAL optimizer steps'
    worth of crops per engine epoch from seeded permutations (an image may repeat)."""
    rank, world_size = get_rank(), get_world_size()
    dataset_val = build_seg_dataset(config, is_train=False)
    loader_val = Loader(dataset_val, sampler=ShardSampler(dataset_val, world_size, rank),
                        batch_size=1, num_workers=config.DATA.NUM_WORKERS)
    if config.EVAL_MODE or config.THROUGHPUT_MODE:
        return None, dataset_val, None, loader_val
    dataset_train = build_seg_dataset(config, is_train=True)
    per_rank = config.SEG.EVAL_INTERVAL * config.TRAIN.ACCUMULATION_STEPS * config.DATA.BATCH_SIZE
    sampler = ResumableSampler(dataset_train, per_rank, world_size, rank, config.SEED)
    loader_train = Loader(SeededSamples(dataset_train, config.SEED), persistent=True,
                          sampler=sampler, batch_size=config.DATA.BATCH_SIZE,
                          num_workers=config.DATA.NUM_WORKERS,
                          pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
                          drop_last=True)
    return dataset_train, dataset_val, loader_train, loader_val
