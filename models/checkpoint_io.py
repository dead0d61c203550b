"""The one reader of checkpoints: safe loading, checksum verification and weight loading.

Everything that reads a checkpoint goes through :func:`load_checkpoint_file` (training and
segmentation runs, tools/, tests/, and timm's ``pretrained=True`` path through
:meth:`models.mg_ssaf.MGSSAF.load_pretrained`). It loads with ``torch.load(weights_only=True)``,
so no pickled code runs, and verifies the SHA-256 that the training side's ``atomic_save``
(utils.py) writes into the file with :func:`append_checksum`. :func:`load_weights` and
:func:`load_pretrained` load a checkpoint's weights into a model and name, when they do not fit,
the dimensions (and the released variant) that differ. Depends on torch, yacs and the variant
table (models/variants.py) only.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import pickle
import re
import struct
from typing import IO, Any

import torch
from timm.models import clean_state_dict
from yacs.config import CfgNode as CN

from .variants import VARIANTS

__all__ = ["CHECKSUM_TAG", "CheckpointError", "TORCH_SAVE_MAGIC", "append_checksum",
           "load_checkpoint_file", "load_model_weights", "load_pretrained", "load_weights",
           "model_state_dict", "verify_checksum", "weight_differences"]

TORCH_SAVE_MAGIC = (b"PK", b"\x80")  # torch.save's zip format; its legacy format (a pickle)
# The SHA-256 of a checkpoint, inside the file: the comment of its zip archive (the last bytes of
# the file), over every byte before the comment's 2-byte length field. Written by
# append_checksum (utils.atomic_save, before the rename), verified by load_checkpoint_file.
CHECKSUM_TAG = b"mg-ssaf-sha256:"
_CHECKSUM_LEN = len(CHECKSUM_TAG) + 64
_EOCD_SIG, _EOCD_LEN = b"PK\x05\x06", 22  # zip end-of-central-directory record, without comment


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, unsafe or does not fit the model (the entry
    points report it in one line, as they do utils.RunError)."""


# ---------------------------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------------------------
def _sha256(f: IO[bytes], size: int) -> str:
    """SHA-256 of the first ``size`` bytes of the binary file ``f``."""
    digest = hashlib.sha256()
    f.seek(0)
    left = size
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def append_checksum(f: IO[bytes]) -> None:
    """Writes the SHA-256 of the zip archive ``f`` (just written by torch.save) as its comment."""
    size = f.seek(0, os.SEEK_END)
    f.seek(size - _EOCD_LEN)
    eocd = f.read(_EOCD_LEN)
    if not eocd.startswith(_EOCD_SIG) or eocd[-2:] != b"\0\0":
        return  # not the zip layout torch.save writes: saved without a checksum
    comment = CHECKSUM_TAG + _sha256(f, size - 2).encode()
    f.seek(size - 2)
    f.write(struct.pack("<H", len(comment)) + comment)


def verify_checksum(path: str) -> bool:
    """Checks the SHA-256 that atomic_save wrote into ``path``: True when it matches, False when
    the file has none (released checkpoints, older ones); a mismatch raises CheckpointError."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = _EOCD_LEN + _CHECKSUM_LEN
        if size < tail_len:
            return False
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        comment = tail[_EOCD_LEN:]
        if (not tail.startswith(_EOCD_SIG) or not comment.startswith(CHECKSUM_TAG)
                or struct.unpack("<H", tail[_EOCD_LEN - 2:_EOCD_LEN])[0] != _CHECKSUM_LEN):
            return False
        stored = comment[len(CHECKSUM_TAG):].decode("ascii", "replace")
        actual = _sha256(f, size - _CHECKSUM_LEN - 2)
    if stored != actual:
        raise CheckpointError(f"{path}: corrupt: its SHA-256 checksum does not match its contents "
                              f"(stored {stored[:12]}..., computed {actual[:12]}...)")
    return True



# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class _ConfigAsMapping:
    """Stands in for ``yacs.config.CfgNode`` while unpickling: the stored config is rebuilt as
    plain ordered mappings, so no yacs code runs during the load."""

    def __new__(cls, *args: Any) -> collections.OrderedDict:
        return collections.OrderedDict()


def _to_cfgnode(value: Any) -> Any:
    if isinstance(value, dict):
        return CN({k: _to_cfgnode(v) for k, v in value.items()})
    return value


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Loads a checkpoint with ``torch.load(weights_only=True)``: tensors, plain containers and
    numbers, and the yacs config of released checkpoints (returned as a CfgNode under "config").
    Anything else (a pickled object that could run code) is refused, and so is a file whose
    checksum (written by atomic_save) does not match; files without one load as before. The
    one reader of checkpoints in the repository (tools included)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_SAVE_MAGIC):
        found = f"it starts with {head!r}" if head else "it is empty"
        raise CheckpointError(f"{path}: not a checkpoint (not a torch.save file: {found})")
    verify_checksum(path)
    try:
        with torch.serialization.safe_globals([(_ConfigAsMapping, "yacs.config.CfgNode")]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: cannot be read (truncated or corrupt?): {e}") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors, plain "
            f"containers and a yacs config, which could run code when loaded ({reason})") from None
    except Exception as e:  # zip/pickle decoding errors of every kind mean the same here
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot be read (truncated or corrupt?): "
                              f"{type(e).__name__}: {first_line}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        keys = f" with keys {sorted(map(str, ckpt))[:10]}" if isinstance(ckpt, dict) else ""
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict with the weights under "
                              f"'model', got {type(ckpt).__name__}{keys}")
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = _to_cfgnode(ckpt["config"])
    return ckpt



# ---------------------------------------------------------------------------------------------
# Loading weights into a model
# ---------------------------------------------------------------------------------------------
def _describe(ckpt: dict) -> str:
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("MODEL"), dict):
        return (f" (it was saved by a run of MODEL.NAME {config['MODEL'].get('NAME')}, "
                f"NUM_CLASSES {config['MODEL'].get('NUM_CLASSES')})")
    return ""


# (embedding width, blocks per stage) of the released variants, to name a checkpoint's variant
RELEASED_VARIANTS = {(arch["EMBED_DIM"], tuple(arch["DEPTHS"])): title
                     for title, arch, _ in VARIANTS.values()}
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_NETWORK = "network"
_SEGMENTER = "a segmentation model (UPerNet, main_seg.py)"
_CLASSIFIER = "a classifier (main.py)"
_WIDTH = "embedding width (MODEL.MGSSAF.EMBED_DIM)"
_CLASSES = "classes (MODEL.NUM_CLASSES)"


def holds_segmenter(weights: dict[str, Any]) -> bool:
    """Whether a state dict is a whole UPerNet segmentation model's (``main_seg.py``)."""
    return any(key.startswith("decode_head.") for key in weights)


def _architecture(weights: dict[str, Any]) -> dict[str, Any]:
    """What the keys and shapes of a state dict say about its network (classifier or UPerNet
    segmentation model, embedding width, blocks per stage, number of classes), each under the
    phrase that names it in messages."""
    segmenter = holds_segmenter(weights)
    if segmenter:  # the backbone's keys, as a classifier's
        weights = {k[len("backbone."):]: v for k, v in weights.items()
                   if k.startswith("backbone.")}
    depths: dict[int, int] = {}
    for key in weights:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    arch: dict[str, Any] = {_NETWORK: _SEGMENTER if segmenter else _CLASSIFIER,
                            "stages": len(depths)}
    if "patch_embed.norm.weight" in weights:
        arch[_WIDTH] = weights["patch_embed.norm.weight"].shape[0]
    for stage, depth in sorted(depths.items()):
        arch[f"blocks in stage {stage} (layers.{stage})"] = depth
    if "head.weight" in weights:
        arch[_CLASSES] = weights["head.weight"].shape[0]
    return arch


def _variant(arch: dict[str, Any]) -> str | None:
    """The released variant whose width and depths ``arch`` has, if any."""
    depths = tuple(arch[f"blocks in stage {s} (layers.{s})"] for s in range(arch["stages"])
                   if f"blocks in stage {s} (layers.{s})" in arch)
    return RELEASED_VARIANTS.get((arch.get(_WIDTH), depths))


def weight_differences(weights: dict[str, Any], own: dict[str, Any], limit: int = 3) -> list[str]:
    """At most ``limit`` (+1) short phrases saying how the checkpoint's ``weights`` differ from the
    model's state dict ``own``: the kind of network where it differs (classifier or UPerNet),
    else network dimensions, else the first differing entries."""
    theirs, ours = _architecture(weights), _architecture(own)
    if theirs[_NETWORK] != ours[_NETWORK]:
        return [f"it holds {theirs[_NETWORK]}, this model is {ours[_NETWORK]}"]
    found = [f"{what}: {theirs.get(what)} in the checkpoint, {ours.get(what)} in this model"
             for what in dict.fromkeys([*ours, *theirs]) if theirs.get(what) != ours.get(what)]
    if found:
        variant, own_variant = _variant(theirs), _variant(ours)
        if variant and variant != own_variant:
            into = f" into an {own_variant} model" if own_variant else ""
            found = found[:limit] + [f"an {variant} checkpoint{into}?"]
        return found[:limit + 1]
    shapes = [f"size mismatch for {k}: {tuple(weights[k].shape)} in the checkpoint, "
              f"{tuple(own[k].shape)} in this model"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    found = shapes[:limit] + ([f"{len(shapes) - limit} more size mismatches"]
                              if len(shapes) > limit else [])
    if missing:
        found.append(f"{len(missing)} of the model's keys missing (first: {missing[0]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    return found


def _misfit(path: str, ckpt: dict, own: dict[str, Any]) -> CheckpointError:
    differences = "; ".join(weight_differences(ckpt["model"], own))
    return CheckpointError(f"{path}: its weights do not fit this model{_describe(ckpt)}: "
                           f"{differences}")


def load_weights(model: torch.nn.Module, ckpt: dict, path: str) -> None:
    """Loads ``ckpt["model"]`` into ``model`` strictly; a mismatch is refused with a message
    that says which dimensions (or, failing that, which entries) differ."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError:
        raise _misfit(path, ckpt, model.state_dict()) from None


def model_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a released or project checkpoint (``{"model": weights, ...}``) or of a
    bare state dict, without ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile)."""
    weights = ckpt.get("model", ckpt)
    return clean_state_dict({k: v for k, v in weights.items() if isinstance(v, torch.Tensor)})


def load_model_weights(model: torch.nn.Module, path: str) -> dict:
    """Every weight of the checkpoint at ``path`` into ``model`` (strict, prefixes removed; the
    model drops the released checkpoints' unused ``attn.norm`` entries), for inference and
    export; returns the checkpoint. One that does not fit is refused naming what differs."""
    ckpt = load_checkpoint_file(path)
    load_weights(model, {**ckpt, "model": model_state_dict(ckpt)}, path)
    return ckpt


# Released checkpoints carry an ``attn.norm`` LayerNorm per block that the network never applies
# (MGSSAFAttention's load hook drops it on load_state_dict).
_UNUSED_RELEASED_KEY = re.compile(r"(^|\.)attn\.norm\.(weight|bias)$")


def drop_unused_released_keys(weights: dict[str, Any]) -> dict[str, Any]:
    """``weights`` without the released checkpoints' never-applied ``attn.norm`` parameters."""
    return {k: v for k, v in weights.items() if not _UNUSED_RELEASED_KEY.search(k)}


def load_pretrained(path: str, model: torch.nn.Module, logger: logging.Logger) -> None:
    """Initialises ``model`` from the weights of a checkpoint (optimizer and epoch start fresh).
    A classifier head of another class count is left at its initialisation, for fine-tuning; a
    model without a classifier (``num_classes`` 0) does not load the checkpoint's."""
    ckpt = load_checkpoint_file(path)
    own = model.state_dict()
    weights = drop_unused_released_keys(ckpt["model"])
    head = [k for k in weights
            if k.startswith("head.") and (k not in own or weights[k].shape != own[k].shape)]
    mismatched = [k for k in own if k in weights and k not in head
                  and weights[k].shape != own[k].shape]
    missing = [k for k in own if k not in weights and k not in head]
    unexpected = [k for k in weights if k not in own and k not in head]
    if mismatched or missing or unexpected:
        ckpt = {**ckpt, "model": {k: v for k, v in weights.items() if k not in head}}
        raise _misfit(path, ckpt, {k: v for k, v in own.items() if k not in head})
    for key in head:
        shape = tuple(weights.pop(key).shape)
        if key in own:
            logger.warning(f"{path}: {key} has shape {shape}, the model {tuple(own[key].shape)}: "
                           "the head starts from its initialisation")
        else:
            logger.info(f"{path}: {key} {shape} not loaded: the model has no classifier")
    model.load_state_dict(weights, strict=False)
    logger.info(f"loaded pretrained weights from {path}")

