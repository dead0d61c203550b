"""Configuration of MG-SSAF runs: yacs defaults, YAML files with ``BASE`` inheritance, overrides.

Every key a run can use is declared below with its default; the defaults reproduce the paper's
ImageNet-1K recipe for MG-SSAF-T. A YAML file (``--cfg``) may name other YAML files under ``BASE``
(paths relative to that file), which are merged first. ``opts`` are ``KEY VALUE`` pairs merged last.
An unknown key, a value of the wrong type or outside what the key allows (``VALUE_RULES``) and a
``BASE`` include cycle are errors that name the key (or the chain of files) and where it came from.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

# The released variants: MODEL.NAME -> (title, MODEL.MGSSAF keys, MODEL.DROP_PATH_RATE), a table
# that lives with the model; this module checks how their names are spelled and fills them in.
from models.mg_ssaf import LOCAL_ATTENTION
from models.variants import RELEASED_NAMES, VARIANTS

_C = CN()

# Base config files, merged before the file that names them (paths relative to that file).
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size per process (per GPU); the total batch is this x world size x accumulation steps.
_C.DATA.BATCH_SIZE = 128
# The recipe's total batch, over all processes and accumulation steps (0: off, DATA.BATCH_SIZE is
# the batch per process as in Swin). When set, a config file must not set DATA.BATCH_SIZE: it
# becomes TOTAL_BATCH_SIZE / (processes x TRAIN.ACCUMULATION_STEPS), so the total batch, the LR
# and the number of steps are the same on any number of GPUs; a training run where that does not
# divide is an error. A batch per process from the command line (--batch-size, --opts
# DATA.BATCH_SIZE) wins; where it changes the total, the run warns with the total batch, LR and
# steps it makes.
_C.DATA.TOTAL_BATCH_SIZE = 0
# Root of the dataset: <root>/train/<class>/* and <root>/val/<class>/* for 'imagenet'.
_C.DATA.DATA_PATH = ""
# 'imagenet' (an ImageFolder layout of any number of classes), 'digits' (scikit-learn's
# bundled 8x8 handwritten digits, no download) or 'cub' (CUB-200-2011's official layout and split:
# DATA_PATH is the CUB_200_2011 folder, see data/cub.py).
_C.DATA.DATASET = "imagenet"
# Input resolution (square).
_C.DATA.IMG_SIZE = 224
# Resize interpolation: 'bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos' or 'random'
# (training picks bilinear or bicubic at random; evaluation uses bicubic).
_C.DATA.INTERPOLATION = "bicubic"
# Pin CPU memory in the loader for faster host-to-device copies.
_C.DATA.PIN_MEMORY = True
# Loader worker processes per rank.
_C.DATA.NUM_WORKERS = 8
# Skip unreadable images (ADE20K: images or annotations) with a warning (and a count per epoch)
# instead of stopping the run.
_C.DATA.SKIP_BAD_IMAGES = False
# Swin Transformer keys accepted for its configs and command lines, without effect here (a run
# names those set to another value in one warning line): zipped ImageNet ('--zip'), its cache
# mode ('no', 'full' or 'part'; '--cache-mode') and SimMIM's masking.
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = "part"
_C.DATA.MASK_PATCH_SIZE = 32
_C.DATA.MASK_RATIO = 0.6

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.TYPE = "mg_ssaf"
# A variant's name stands for its architecture: mg_ssaf_tiny, mg_ssaf_small, mg_ssaf_base, or the
# released repository's spelling MG-SSAF-T, MG-SSAF-S, MG-SSAF-B. The MODEL.MGSSAF keys (and
# DROP_PATH_RATE) that no file or override sets take the variant's values, and one set to another
# value is an error. A near miss of these names (mg_ssaf_s, MG-SSAF-s) is an error too. Give a
# network of your own another name.
_C.MODEL.NAME = "mg_ssaf_tiny"
# Checkpoint whose weights initialise the model (weights only: optimizer and epoch start fresh).
_C.MODEL.PRETRAINED = ""
# Checkpoint to resume from (weights, optimizer, scheduler, scaler, epoch).
_C.MODEL.RESUME = ""
_C.MODEL.NUM_CLASSES = 1000
# Dropout on the embedding, the MLP and attention outputs and before the head.
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth: rises linearly from 0 to this rate over all blocks.
_C.MODEL.DROP_PATH_RATE = 0.2
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.MGSSAF = CN()
_C.MODEL.MGSSAF.IN_CHANS = 3
_C.MODEL.MGSSAF.EMBED_DIM = 96
_C.MODEL.MGSSAF.DEPTHS = [2, 2, 6, 2]
_C.MODEL.MGSSAF.NUM_HEADS = [3, 6, 12, 24]
# Fraction of each stage's heads doing global attention (MG-MSA); the rest do SS-MSA.
_C.MODEL.MGSSAF.GLOBAL_RATIO = [0.0, 0.5, 0.5, 0.0]
# Strip width of MG-MSA's horizontal and vertical strip pooling, per stage (0 where unused).
_C.MODEL.MGSSAF.STRIP_WIDTH = [0, 2, 2, 0]
_C.MODEL.MGSSAF.WINDOW_SIZE = 7
_C.MODEL.MGSSAF.MLP_RATIO = 2.0
_C.MODEL.MGSSAF.QKV_BIAS = True
# Width of the 1x1 convolution before the classifier.
_C.MODEL.MGSSAF.HEAD_HIDDEN_DIM = 1280
# How the local attention (SS-MSA + AF) runs where the CPU's fused C kernels do not apply (CUDA,
# float16 autocast, padded stage maps): 'ops', eager PyTorch ops (about thirty kernel launches
# per block on CUDA), or 'compiled', the same ops through torch.compile (Inductor fuses them into
# a few Triton kernels on CUDA; compiled once per stage shape on first use). Not an architecture
# key: the weights and numbers are the same. 'ops' stays the default until tools/gpu_check.py
# has measured 'compiled' faster on a GPU (docs/performance.md).
_C.MODEL.MGSSAF.LOCAL_ATTENTION = "ops"

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rates for a total batch of 512; scaled linearly with the actual total batch.
_C.TRAIN.BASE_LR = 1e-3
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 1e-6
# Gradient-norm clipping (0 disables it).
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest checkpoint in the output folder, if there is one.
_C.TRAIN.AUTO_RESUME = True
# Micro-batches per optimizer step.
_C.TRAIN.ACCUMULATION_STEPS = 1
# Activation checkpointing of every block (less memory, slower).
_C.TRAIN.USE_CHECKPOINT = False
# Epoch checkpoints kept in the output folder, newest first (0 keeps all); ckpt_best.pth is extra.
_C.TRAIN.KEEP_CHECKPOINTS = 5
# Layer-wise LR decay (BEiT; timm's param_groups_layer_decay over the model's group_matcher: stem,
# each block, head): the LR of group g of n is scaled by LAYER_DECAY ** (n - 1 - g), so the head
# trains at the full LR and the stem at the smallest. 1.0 switches it off.
_C.TRAIN.LAYER_DECAY = 1.0

_C.TRAIN.LR_SCHEDULER = CN()
# 'cosine', 'linear', 'step' or 'multistep'.
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
# Epochs between decays ('step'), counted from the start of training (as in Swin).
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR multiplier at each decay of 'step'.
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# Epochs at which 'multistep' multiplies the LR by GAMMA, counted from the start of training.
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
# 'cosine' and 'linear': whether the decay starts after the warm-up (its length counted from the
# warm-up's end, timm's warmup_prefix) or runs from step 0 under it.
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True

_C.TRAIN.OPTIMIZER = CN()
# 'adamw' or 'sgd'.
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.999]
# SGD momentum.
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# -----------------------------------------------------------------------------
# Augmentation (timm); defaults are the paper's recipe
# -----------------------------------------------------------------------------
_C.AUG = CN()
# RandomResizedCrop's range of crop area, as a fraction of the image (timm's default [0.08, 1.0];
# narrow it for small sources such as the 8x8 digits, where a tiny crop loses the digit).
_C.AUG.SCALE = [0.08, 1.0]
# Probability of a horizontal flip (0 for data that flips change the meaning of, such as digits).
_C.AUG.HFLIP = 0.5
_C.AUG.COLOR_JITTER = 0.4
# RandAugment policy ('' or 'none' disables it).
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
# Random erasing probability, mode and count.
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
# Mixup alpha, CutMix alpha (both 0 disables Mixup/CutMix), CutMix min/max ratio (overrides alpha).
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
# Probability of applying Mixup or CutMix to a batch, and of switching to CutMix when both are on.
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# 'batch', 'pair' or 'elem'.
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Resize to IMG_SIZE / 0.875 then center-crop IMG_SIZE (False: resize straight to IMG_SIZE).
# Validation is always exact: each rank evaluates its own slice, every image counted once.
_C.TEST.CROP = True
# Swin's validation sampler switches, accepted without effect: validation here always reads each
# rank's slice in order.
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False

# -----------------------------------------------------------------------------
# Semantic segmentation (main_seg.py, configs/seg/): UPerNet on an MG-SSAF backbone
# -----------------------------------------------------------------------------
# DATA.DATASET 'ade20k' (DATA.DATA_PATH = the ADEChallengeData2016 folder) or 'digits_seg' (the
# CPU demo); MODEL.NUM_CLASSES is the number of segmentation classes (150 for ADE20K).
_C.SEG = CN()
# Iteration-based schedule: total iterations, evaluation + checkpoint every EVAL_INTERVAL, LR
# warm-up iterations (TRAIN.WARMUP_LR -> TRAIN.BASE_LR, then poly decay to TRAIN.MIN_LR).
_C.SEG.ITERS = 160000
_C.SEG.EVAL_INTERVAL = 16000
_C.SEG.WARMUP_ITERS = 1500
_C.SEG.POLY_POWER = 1.0
# Decode head (UPerHead) and auxiliary FCN head on backbone map AUX_INDEX (2: stride 16); the
# trainer adds AUX_WEIGHT x the auxiliary loss. AUX_CHANNELS 0 removes the auxiliary head.
_C.SEG.CHANNELS = 512
_C.SEG.POOL_SCALES = [1, 2, 3, 6]
_C.SEG.DROPOUT = 0.1
_C.SEG.AUX_CHANNELS = 256
_C.SEG.AUX_INDEX = 2
_C.SEG.AUX_WEIGHT = 0.4
# Initialisation of both heads: 'mmcv' (mmseg 0.11: each conv + BN as mmcv's ConvModule, conv
# Kaiming normal fan_out, BN 1 / 0; each classifier conv_seg normal(0, 0.01), bias 0), the
# recipe's; or 'pytorch' (every layer's PyTorch default), which the CPU digits demo uses (see its
# config: with 'mmcv' it predicts background only for hundreds of iterations).
_C.SEG.HEAD_INIT = "mmcv"
# Label ignored by the loss and the metrics (ADE20K's 'other' class 0 becomes it, and a raw 255
# stays it).
_C.SEG.IGNORE_INDEX = 255
# Training pipeline: resize to SCALE (long side, short side) x a ratio in RATIO_RANGE keeping the
# aspect ratio, random crop CROP_SIZE (h, w) with no class above CAT_MAX_RATIO of it (10 tries),
# flip, photometric distortion, pad to CROP_SIZE (both sides multiples of 32, the network's stride).
_C.SEG.SCALE = [2048, 512]
_C.SEG.RATIO_RANGE = [0.5, 2.0]
_C.SEG.CROP_SIZE = [512, 512]
_C.SEG.CAT_MAX_RATIO = 0.75
_C.SEG.PHOTOMETRIC = True
# Evaluation: 'whole' (resize to SCALE, pad to a multiple of 32), 'slide' (SLIDE_CROP windows at
# SLIDE_STRIDE) or 'ms_flip' (the original image resized to each ratio r of SCALE, fitting
# (int(SCALE[0] r), int(SCALE[1] r)) as mmcv's imrescale, each with its horizontal flip).
_C.SEG.TEST_MODE = "whole"
_C.SEG.SLIDE_CROP = [512, 512]
_C.SEG.SLIDE_STRIDE = [341, 341]
_C.SEG.MS_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
# ms_flip with sliding windows at each ratio (False: each ratio whole).
_C.SEG.MS_SLIDE = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision: float16 (with a GradScaler) or bfloat16 (without one). On CPU, float16 is
# emulated by most processors (about 30x slower than float32 on an AVX-512 EPYC): use bfloat16.
_C.AMP_ENABLE = True
_C.AMP_DTYPE = "float16"
# Swin's apex opt level ('--amp-opt-level'): 'O0' switches AMP off, 'O1'/'O2' leave AMP_ENABLE.
_C.AMP_OPT_LEVEL = ""
# Swin's fused CUDA kernels ('--fused_window_process', '--fused_layernorm'): accepted without
# effect (MG-SSAF has no such kernels).
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False
# Exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer
# step with MODEL_EMA_DECAY, validated beside the model after every epoch (the best accuracy of the
# two is kept) and saved in checkpoints under "model_ema".
_C.MODEL_EMA = False
_C.MODEL_EMA_DECAY = 0.9998
# Output root: runs are written to <OUTPUT>/<MODEL.NAME>/<TAG>.
_C.OUTPUT = "output"
_C.TAG = "default"
# Save a checkpoint every SAVE_FREQ epochs (and always after the last one).
_C.SAVE_FREQ = 1
# Log a training line every PRINT_FREQ steps.
_C.PRINT_FREQ = 10
_C.SEED = 0
# Deterministic algorithms and no cuDNN autotuning: reproducible runs at some cost in speed.
_C.DETERMINISTIC = False
# Seconds a rank waits in a collective operation before failing (a dead peer stops the others).
_C.DIST_TIMEOUT = 600
# Evaluate only / measure throughput only.
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
# 'auto' (CUDA when available), 'cuda' or 'cpu'.
_C.DEVICE = "auto"
# Local rank of this process, set by the launcher.
_C.LOCAL_RANK = 0


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _name_key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


# Spellings close enough to a variant's to be a typo for it (compared without case or separators,
# timm's mg_ssaf_t/s/b included): an error naming the spellings that are accepted.
_NEAR_MISSES = {_name_key(spelling): name for name, (title, _, _) in VARIANTS.items()
                for spelling in (name, title, "mg_ssaf_" + title[-1].lower())}


def variant_name(model_name: str) -> str | None:
    """The VARIANTS key that ``model_name`` (a MODEL.NAME) stands for, or None for a network of
    one's own."""
    if model_name in VARIANTS:
        return model_name
    return RELEASED_NAMES.get(model_name)

# Keys kept for Swin Transformer's configs and command lines that change nothing here, with the
# flag that sets each (if any).
INERT_KEYS = {
    "DATA.ZIP_MODE": "--zip",
    "DATA.CACHE_MODE": "--cache-mode",
    "DATA.MASK_PATCH_SIZE": None,
    "DATA.MASK_RATIO": None,
    "TEST.SEQUENTIAL": None,
    "TEST.SHUFFLE": None,
    "FUSED_WINDOW_PROCESS": "--fused_window_process",
    "FUSED_LAYERNORM": "--fused_layernorm",
    "AMP_OPT_LEVEL": "--amp-opt-level",  # apex's: only its 'O0' (AMP off) is honoured
}


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} characters)"


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Returns ``value`` converted to the type of ``default``, or raises ``ConfigError``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: config key {key} expects {expected}, got {_show(value)} "
                           f"({type(value).__name__})")

    if default is None or (value is None and isinstance(default, str)):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail("a boolean (true/false)")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if default:
            value = [_coerce(v, default[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return type(default)(value)
    raise fail(type(default).__name__)


def _merge(node: CN, updates: dict, source: str, seen: dict[str, str], prefix: str = "") -> None:
    """Merges ``updates`` into ``node``, recording each key set in ``seen`` (key -> source)."""
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in node:
            raise ConfigError(f"{source}: unknown config key {key}")
        default = node[name]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {key} is a section; expected a mapping, "
                                  f"got {value!r}")
            _merge(default, value, source, seen, key + ".")
        else:
            node[name] = _coerce(value, default, key, source)
            seen[key] = source


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping (its dotted path and both lines, 1-based)."""


def _refuse_duplicate_keys(node: yaml.Node, prefix: str = "") -> None:
    """Raises _DuplicateKey for a key given twice in one mapping of the composed YAML ``node``,
    naming its dotted path and both lines ('<<' merges may repeat keys on purpose)."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue  # a merge, or a list or mapping as a key (PyYAML's error)
        key, line = prefix + key_node.value, key_node.start_mark.line + 1
        if key in lines:
            raise _DuplicateKey(f"key {key} is given twice (lines {lines[key]} and {line}): the "
                                "second would replace the first; merge them")
        lines[key] = line
        _refuse_duplicate_keys(value_node, key + ".")


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping, where PyYAML keeps the
    last: a second ``TRAIN:`` block would silently replace the first."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node)
        return super().construct_document(node)


def _merge_file(cfg: CN, path: str, seen: dict[str, str], chain: tuple[str, ...] = ()) -> None:
    """Merges the YAML file ``path`` after its ``BASE`` files; ``chain`` holds the files whose
    ``BASE`` led here (a file met again in it is an include cycle)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (
            f" (BASE of {chain[-1]})" if chain else ""))
    if any(os.path.samefile(path, earlier) for earlier in chain):
        raise ConfigError("BASE include cycle: " + " -> ".join((*chain, path)) + ": a config "
                          "file cannot include itself, directly or through other files")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_ConfigLoader) or {}
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        except RecursionError:
            raise ConfigError(f"{path}: its YAML is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    bases = data.pop("BASE", [""]) or [""]
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: BASE expects a file name or a list of file names, got "
                          f"{_show(bases)}")
    for base in bases:
        if base:
            _merge_file(cfg, os.path.join(os.path.dirname(path), base), seen, (*chain, path))
    _merge(cfg, data, path, seen)


def _parse_value(text: Any, key: str) -> Any:
    """An ``--opts`` value as yacs reads it (a Python literal: ``None``, ``(0.9, 0.999)``,
    ``True``), else as YAML (``null``, ``false``, ``[1, 2]``, ``1e-3``), else the string."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except RecursionError:
        raise ConfigError(f"--opts: the value of {key} is nested too deeply: "
                          f"{_show(text)}") from None


def _parse_opts(opts: Sequence[str]) -> dict:
    if len(opts) % 2:
        raise ConfigError(f"--opts expects KEY VALUE pairs, got an odd number of items: "
                          f"{_show(list(opts))}")
    tree: dict = {}
    for key, text in zip(opts[::2], opts[1::2]):
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--opts: {key} and a shorter key that it extends are both set")
        node[leaf] = _parse_value(text, key)
    return tree


def _apply_variant(cfg: CN, seen: dict[str, str]) -> None:
    """Fills the architecture of the variant MODEL.NAME names into the keys nothing set; raises
    ConfigError, naming both values, where a key that was set describes another network, or where
    the name is a near miss of a variant's."""
    name = variant_name(cfg.MODEL.NAME)
    if name is None:
        near = _NEAR_MISSES.get(_name_key(cfg.MODEL.NAME))
        if near is not None:
            title = VARIANTS[near][0]
            raise ConfigError(
                f"MODEL.NAME {cfg.MODEL.NAME!r} ({seen.get('MODEL.NAME', 'the default')}) is not a "
                f"variant's name: write {near} or {title} (exactly) to build {title}, or give a "
                "network of your own a name of its own")
        return
    title, arch, drop_path = VARIANTS[name]
    conflicts = []
    for name, value in arch.items():
        key = f"MODEL.MGSSAF.{name}"
        if key not in seen:
            cfg.MODEL.MGSSAF[name] = value
        elif cfg.MODEL.MGSSAF[name] != value:
            conflicts.append(f"{key} is {cfg.MODEL.MGSSAF[name]} ({seen[key]}) where {title} has "
                             f"{value}")
    if conflicts:
        raise ConfigError(f"MODEL.NAME {cfg.MODEL.NAME} ({seen.get('MODEL.NAME', 'the default')}) "
                          f"names {title}, but " + "; ".join(conflicts) + ". Give a network of "
                          "your own another MODEL.NAME, or drop the keys to build " + title)
    if "MODEL.DROP_PATH_RATE" not in seen:
        cfg.MODEL.DROP_PATH_RATE = drop_path


def _derive_batch_size(cfg: CN, seen: dict[str, str], world_size: int) -> None:
    """DATA.BATCH_SIZE from DATA.TOTAL_BATCH_SIZE (when set) for ``world_size`` processes, unless
    the command line gives the batch per process; raises ConfigError where a config file sets
    both keys, or where the total does not split over the processes of a training run."""
    total = cfg.DATA.TOTAL_BATCH_SIZE
    if total == 0:
        return
    where = seen.get("DATA.TOTAL_BATCH_SIZE", "the default")
    if total < 0:
        raise ConfigError(f"DATA.TOTAL_BATCH_SIZE ({where}) must be 0 (off) or a positive total "
                          f"batch, got {total}")
    source = seen.get("DATA.BATCH_SIZE")
    if source is not None and (source.startswith("--") or source == "command line"):
        return  # the batch per process given for this run wins; main.py warns with its total
    if source is not None:
        raise ConfigError(f"DATA.BATCH_SIZE {cfg.DATA.BATCH_SIZE} ({source}) and "
                          f"DATA.TOTAL_BATCH_SIZE {total} ({where}) are both set: a config file "
                          "gives one of them (DATA.TOTAL_BATCH_SIZE 0 makes DATA.BATCH_SIZE the "
                          "batch per process); --batch-size sets the batch per process of a run")
    accum = max(cfg.TRAIN.ACCUMULATION_STEPS, 1)
    training = not (cfg.EVAL_MODE or cfg.THROUGHPUT_MODE)
    if total % (world_size * accum) and training:
        raise ConfigError(
            f"DATA.TOTAL_BATCH_SIZE {total} ({where}) does not split over {world_size} "
            f"process(es) x TRAIN.ACCUMULATION_STEPS {accum}: use processes x accumulation steps "
            f"that divide {total}, or give the batch per process with --batch-size (the LR and "
            "the number of steps then follow the total batch it makes)")
    cfg.DATA.BATCH_SIZE = max(total // (world_size * accum), 1)


# The allowed values of single keys, checked by load_config (rules that tie several keys together
# are check_config's). Each rule: (test, what is allowed), applied to the value or, for a list
# key marked EACH, to each of its items.
def _number(low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> tuple[Any, str]:
    def test(v: Any) -> bool:
        return (math.isfinite(v) and (low < v if low_open else low <= v)
                and (v < high if high_open else v <= high))
    if high == math.inf:
        what = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        what = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    return test, what


def _choice(*names: str, any_case: bool = False) -> tuple[Any, str]:
    listed = "one of " + ", ".join(map(repr, names))
    if any_case:  # as Swin's build_optimizer, which lower-cases the name ('AdamW')
        return (lambda v: isinstance(v, str) and v.lower() in names), listed + " (any case)"
    return (lambda v: v in names), listed


PROBABILITY = _number(0.0, 1.0)
RATE = _number(0.0)  # learning rates, weight decay, strengths: finite and >= 0
POSITIVE = _number(0.0, low_open=True)
SIZE = ((lambda v: v >= 1), "at least 1")  # sizes and counts
# input sides: the network halves the map 5 times (stem 4x, 3 patch mergings)
STRIDE_MULTIPLE = ((lambda v: v >= 32 and v % 32 == 0), "a multiple of 32 (the network's stride)")
COUNT = ((lambda v: v >= 0), "0 or more")
AMP_DTYPES = ("float16", "bfloat16")
EACH = "each item"
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random")
VALUE_RULES: dict[str, tuple] = {
    "DATA.IMG_SIZE": STRIDE_MULTIPLE,
    "DATA.INTERPOLATION": _choice(*INTERPOLATIONS),
    "MODEL.NUM_CLASSES": ((lambda v: v >= 0), "at least 0 (0: no classifier, pooled features)"),
    "MODEL.DROP_RATE": PROBABILITY,
    "MODEL.DROP_PATH_RATE": PROBABILITY,
    "MODEL.LABEL_SMOOTHING": _number(0.0, 1.0, high_open=True),
    "MODEL.MGSSAF.IN_CHANS": SIZE,
    "MODEL.MGSSAF.EMBED_DIM": SIZE,
    "MODEL.MGSSAF.WINDOW_SIZE": SIZE,
    "MODEL.MGSSAF.MLP_RATIO": POSITIVE,
    "MODEL.MGSSAF.HEAD_HIDDEN_DIM": SIZE,
    "MODEL.MGSSAF.GLOBAL_RATIO": (EACH, PROBABILITY),
    "MODEL.MGSSAF.LOCAL_ATTENTION": _choice(*LOCAL_ATTENTION),
    "TRAIN.WEIGHT_DECAY": RATE,
    "TRAIN.BASE_LR": RATE,
    "TRAIN.WARMUP_LR": RATE,
    "TRAIN.MIN_LR": RATE,
    "TRAIN.CLIP_GRAD": RATE,
    "TRAIN.LR_SCHEDULER.NAME": _choice("cosine", "linear", "step", "multistep"),
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": SIZE,
    "TRAIN.LR_SCHEDULER.DECAY_RATE": RATE,
    "TRAIN.LR_SCHEDULER.GAMMA": RATE,
    "TRAIN.OPTIMIZER.NAME": _choice("adamw", "sgd", any_case=True),
    "TRAIN.OPTIMIZER.EPS": POSITIVE,
    "TRAIN.OPTIMIZER.BETAS": (EACH, _number(0.0, 1.0, high_open=True)),
    "TRAIN.OPTIMIZER.MOMENTUM": PROBABILITY,
    "AUG.SCALE": (EACH, _number(0.0, 1.0, low_open=True)),
    "AUG.HFLIP": PROBABILITY,
    "AUG.COLOR_JITTER": RATE,
    "AUG.REPROB": PROBABILITY,
    "AUG.REMODE": _choice("const", "rand", "pixel"),
    "AUG.RECOUNT": SIZE,
    "AUG.MIXUP": RATE,
    "AUG.CUTMIX": RATE,
    "AUG.MIXUP_PROB": PROBABILITY,
    "AUG.MIXUP_SWITCH_PROB": PROBABILITY,
    "AUG.MIXUP_MODE": _choice("batch", "pair", "elem"),
    "SEG.POLY_POWER": RATE,
    "SEG.WARMUP_ITERS": ((lambda v: v >= 0), "at least 0"),
    "SEG.CHANNELS": SIZE,
    "SEG.DROPOUT": PROBABILITY,
    "SEG.AUX_WEIGHT": RATE,
    "SEG.SCALE": (EACH, SIZE),
    "SEG.RATIO_RANGE": (EACH, POSITIVE),
    "SEG.CROP_SIZE": (EACH, STRIDE_MULTIPLE),
    "SEG.CAT_MAX_RATIO": _number(0.0, 1.0, low_open=True),
    "SEG.TEST_MODE": _choice("whole", "slide", "ms_flip"),
    "SEG.SLIDE_CROP": (EACH, SIZE),
    "SEG.SLIDE_STRIDE": (EACH, SIZE),
    "SEG.MS_RATIOS": (EACH, POSITIVE),
    "DATA.BATCH_SIZE": SIZE,
    "DATA.NUM_WORKERS": COUNT,
    "TRAIN.EPOCHS": SIZE,
    "TRAIN.ACCUMULATION_STEPS": SIZE,
    "TRAIN.KEEP_CHECKPOINTS": ((lambda v: v >= 0), "0 (keep all) or more"),
    "TRAIN.LAYER_DECAY": ((lambda v: 0.0 < v <= 1.0), "in (0, 1] (1 switches it off)"),
    "MODEL_EMA_DECAY": _number(0.0, 1.0, low_open=True, high_open=True),
    "AMP_DTYPE": _choice(*AMP_DTYPES),
    "DEVICE": _choice("auto", "cuda", "cpu"),
    "SAVE_FREQ": SIZE,
    "PRINT_FREQ": SIZE,
    "DIST_TIMEOUT": SIZE,
}
# Lists of two numbers that are a [min, max] range.
RANGE_KEYS = ("AUG.SCALE", "SEG.RATIO_RANGE")


def check_values(cfg: CN, seen: dict[str, str] | None = None) -> None:
    """Raises ConfigError for the first key of ``VALUE_RULES`` whose value is not allowed, naming
    the key, where it was set (``seen``: key -> source), the value and what is allowed."""
    seen = seen or {}
    for key, rule in VALUE_RULES.items():
        value = _get_key(cfg, key)
        where = f" ({seen[key]})" if key in seen else ""
        each = rule[0] == EACH
        test, allowed = rule[1] if each else rule
        items = value if each else [value]
        if not all(test(v) for v in items):
            raise ConfigError(f"{key}{where} must be {allowed}" + (" (each item)" if each else "")
                              + f", got {_show(value)}")
    for key in RANGE_KEYS:
        value = _get_key(cfg, key)
        if len(value) != 2 or value[0] > value[1]:
            where = f" ({seen[key]})" if key in seen else ""
            raise ConfigError(f"{key}{where} must be [min, max] with min <= max, got "
                              f"{_show(value)}")


def mixup_enabled(cfg: CN) -> bool:
    """Whether ``AUG.*`` turns Mixup or CutMix on."""
    return cfg.AUG.MIXUP > 0 or cfg.AUG.CUTMIX > 0 or cfg.AUG.CUTMIX_MINMAX is not None


def check_config(cfg: CN) -> None:
    """Rejects settings that cannot work together (the rules of single keys are VALUE_RULES'), and
    a --resume or --pretrained file that is not there, before anything is built or written."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    training = not (cfg.EVAL_MODE or cfg.THROUGHPUT_MODE)
    need(0 <= cfg.TRAIN.WARMUP_EPOCHS < cfg.TRAIN.EPOCHS or not training,
         f"TRAIN.WARMUP_EPOCHS ({cfg.TRAIN.WARMUP_EPOCHS}) must be at least 0 and less than "
         f"TRAIN.EPOCHS ({cfg.TRAIN.EPOCHS})")
    need(0 <= cfg.TRAIN.START_EPOCH < cfg.TRAIN.EPOCHS or not training,
         f"TRAIN.START_EPOCH must be at least 0 and less than TRAIN.EPOCHS "
         f"({cfg.TRAIN.EPOCHS}), got {cfg.TRAIN.START_EPOCH}")
    minmax = cfg.AUG.CUTMIX_MINMAX
    need(minmax is None or (isinstance(minmax, (list, tuple)) and len(minmax) == 2
                            and 0 < minmax[0] < minmax[1] <= 1),
         f"AUG.CUTMIX_MINMAX must be None (CutMix areas from AUG.CUTMIX's beta distribution) or "
         f"[min, max] with 0 < min < max <= 1, got {minmax!r}")
    need(not mixup_enabled(cfg) or cfg.DATA.BATCH_SIZE % 2 == 0 or not training,
         f"Mixup/CutMix (AUG.MIXUP {cfg.AUG.MIXUP}, AUG.CUTMIX {cfg.AUG.CUTMIX}) needs an "
         f"even DATA.BATCH_SIZE, got {cfg.DATA.BATCH_SIZE}")
    for key, flag in (("RESUME", "--resume"), ("PRETRAINED", "--pretrained")):
        path = cfg.MODEL[key]
        need(not path or os.path.isfile(path), f"MODEL.{key} ({flag}) {path}: file not found")


def _get_key(cfg: CN, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def inert_settings(cfg: CN) -> list[str]:
    """The Swin keys of ``INERT_KEYS`` that ``cfg`` sets to another value than the default, as
    ``KEY value (--flag)`` strings: accepted, but they change nothing here."""
    found = []
    for key, flag in INERT_KEYS.items():
        value = _get_key(cfg, key)
        if value != _get_key(_C, key) and not (key == "AMP_OPT_LEVEL" and value == "O0"):
            found.append(f"{key} {value!r}" + (f" ({flag})" if flag else ""))
    return found


def get_defaults() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def load_config(path: str | None = None, opts: Iterable[str] = (),
                flags: dict[str, Any] | None = None, world_size: int = 1) -> CN:
    """Defaults, then ``path`` (with its ``BASE`` files), then ``opts``, then ``flags`` (a mapping
    of dotted keys to values, not parsed); then the architecture of a variant's MODEL.NAME fills
    the keys none of them set, and DATA.TOTAL_BATCH_SIZE (when set) the batch per process of a
    run on ``world_size`` processes. Returns a frozen CfgNode."""
    cfg = get_defaults()
    seen: dict[str, str] = {}
    if path:
        _merge_file(cfg, path, seen)
    _merge(cfg, _parse_opts(list(opts)), "--opts", seen)
    for key, value in (flags or {}).items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = _coerce(value, node[leaf], key, "command line")
        seen[key] = _FLAG_NAMES.get(key, "command line")
    _apply_variant(cfg, seen)
    _derive_batch_size(cfg, seen, world_size)
    if cfg.AMP_OPT_LEVEL not in ("", "O0", "O1", "O2"):
        raise ConfigError(f"AMP_OPT_LEVEL (--amp-opt-level) must be O0, O1 or O2, got "
                          f"{cfg.AMP_OPT_LEVEL!r}")
    if cfg.AMP_OPT_LEVEL == "O0":
        cfg.AMP_ENABLE = False
    check_values(cfg, seen)
    cfg.freeze()
    return cfg


# The command line of main.py and main_seg.py (Swin Transformer's flags): one row per flag,
# (flag names, config key, value set by an on/off flag or None for a flag that takes a value,
# argparse options, help). Flags win over --cfg and --opts.
_MAIN_FLAGS: tuple[tuple[tuple[str, ...], str, Any, dict, str], ...] = (
    (("--batch-size",), "DATA.BATCH_SIZE", None, dict(type=int), "batch size per "
     "process/GPU; with a config that sets DATA.TOTAL_BATCH_SIZE (configs/finetune) it replaces "
     "the per-process batch derived from that total; where that changes the total, the run "
     "warns with the total batch, LR and steps it makes"),
    (("--data-path",), "DATA.DATA_PATH", None, {}, "dataset root: a folder holding "
     "train/<class>/* and val/<class>/*, the CUB_200_2011 folder (DATA.DATASET cub), or "
     "ADEChallengeData2016 (main_seg.py, DATA.DATASET ade20k)"),
    (("--zip",), "DATA.ZIP_MODE", True, {}, "Swin's zipped ImageNet: accepted, no effect here"),
    (("--cache-mode",), "DATA.CACHE_MODE", None, dict(choices=("no", "full", "part")),
     "Swin's zip cache mode: accepted, no effect here"),
    (("--pretrained",), "MODEL.PRETRAINED", None, {}, "checkpoint whose weights initialise the "
     "model; optimizer, schedule and epoch start fresh; a head of another class count is "
     "re-initialised"),
    (("--resume",), "MODEL.RESUME", None, {}, "checkpoint to resume training from (weights, "
     "optimizer, scheduler, scaler, epoch), or to evaluate with --eval"),
    (("--accumulation-steps",), "TRAIN.ACCUMULATION_STEPS", None, dict(type=int),
     "micro-batches per optimizer step"),
    (("--use-checkpoint",), "TRAIN.USE_CHECKPOINT", True, {},
     "activation checkpointing: less GPU memory, slower"),
    (("--disable_amp",), "AMP_ENABLE", False, {}, "no mixed precision"),
    (("--amp-opt-level",), "AMP_OPT_LEVEL", None, dict(choices=("O0", "O1", "O2")),
     "Swin's apex opt level (deprecated there too): O0 switches AMP off, O1/O2 keep AMP_ENABLE"),
    (("--optim",), "TRAIN.OPTIMIZER.NAME", None, {}, "optimizer: adamw or sgd"),
    (("--fused_window_process",), "FUSED_WINDOW_PROCESS", True, {},
     "Swin's fused window kernel: accepted, no effect here"),
    (("--fused_layernorm",), "FUSED_LAYERNORM", True, {},
     "Swin's fused LayerNorm: accepted, no effect here"),
    (("--output",), "OUTPUT", None, dict(metavar="PATH"), "root of output folders; the run "
     "writes to <output>/<MODEL.NAME>/<tag>"),
    (("--tag",), "TAG", None, {}, "name of the run's folder under <output>/<MODEL.NAME>"),
    (("--eval",), "EVAL_MODE", True, {}, "only evaluate the weights of --resume (or "
     "--pretrained; with neither, the run folder's newest checkpoint) on the validation set: "
     "loss, Acc@1, Acc@5 (main.py); aAcc, mAcc, mIoU (main_seg.py)"),
    (("--throughput",), "THROUGHPUT_MODE", True, {},
     "only measure images/s on the first validation batch: of the model's forward pass "
     "(main.py), of --eval's inference by SEG.TEST_MODE (main_seg.py)"),
    (("--device",), "DEVICE", None, dict(choices=("auto", "cuda", "cpu")),
     "device; auto picks CUDA when available"),
)
# the flag that sets a key (for messages about its value)
_FLAG_NAMES = {key: names[0] for names, key, *_ in _MAIN_FLAGS}


def _flag_dest(names: tuple[str, ...]) -> str:
    return names[0].lstrip("-").replace("-", "_")


def parse_option(argv: list[str] | None = None, prog: str = "main.py",
                 what: str = "MG-SSAF") -> argparse.Namespace:
    """The Swin Transformer command line; every flag overrides the config key it names."""
    parser = argparse.ArgumentParser(
        prog, description=f"Train, evaluate (--eval) or time (--throughput) {what}. Flags "
        "override the config file; --opts overrides any key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file (YAML)")
    parser.add_argument("--opts", nargs="+", default=None, metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. TRAIN.EPOCHS 30 "
                        "DATA.NUM_WORKERS 4")
    for names, key, switch_value, options, text in _MAIN_FLAGS:
        action = {"action": "store_true"} if switch_value is not None else {}
        setting = key if switch_value is None else f"{key} {switch_value}"
        parser.add_argument(*names, **action, **options, help=f"{text} ({setting})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help="GPU of this process on its node; set by torch.distributed.launch "
                        "(torchrun sets LOCAL_RANK instead)")
    return parser.parse_args(argv)


def get_config(args: Any) -> CN:
    """The config of a ``main.py`` run: defaults, ``args.cfg``, ``args.opts``, then the flags
    (which win). ``OUTPUT`` becomes ``OUTPUT/MODEL.NAME/TAG``, the run's folder. ``LOCAL_RANK``
    comes from the launcher's environment (``LOCAL_RANK``) or ``--local-rank``, the number of
    processes (for DATA.TOTAL_BATCH_SIZE) from its ``WORLD_SIZE`` (1 without a launcher)."""
    flags: dict[str, Any] = {}
    for names, key, switch_value, _, _ in _MAIN_FLAGS:
        given = getattr(args, _flag_dest(names), None)
        if switch_value is None and given is not None:
            flags[key] = given
        elif switch_value is not None and given:
            flags[key] = switch_value
    flags["LOCAL_RANK"] = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # as engine.run.init_device
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    cfg = load_config(args.cfg, args.opts or (), flags, world_size)
    cfg.defrost()
    cfg.OUTPUT = os.path.join(cfg.OUTPUT, cfg.MODEL.NAME, cfg.TAG)
    cfg.freeze()
    return cfg
