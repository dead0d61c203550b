"""UPerNet semantic segmentation on an MG-SSAF backbone (the paper's ADE20K table).

The decode head is UPerNet's (Xiao et al., 2018) as configured in mmsegmentation's Swin recipe:
a pyramid pooling module (PPM, pool scales 1/2/3/6) on the stride-32 map, an FPN over the four
backbone maps (strides 4/8/16/32), all maps upsampled to stride 4, concatenated and fused by a
3x3 conv, dropout 0.1, a 1x1 classifier. An FCN auxiliary head on the stride-16 map (one 3x3
conv) adds a loss (weight 0.4, applied by the trainer) during training only.

Initialisation of the heads as mmcv 1.x / mmseg 0.11: each conv + BatchNorm + ReLU as mmcv's
``ConvModule`` (conv Kaiming normal, fan_out, ReLU gain; BatchNorm weight 1, bias 0), each
classifier ``conv_seg`` normal(0, 0.01) with bias 0 (``BaseDecodeHead.init_weights``). With
``init="pytorch"`` (config SEG.HEAD_INIT, for the CPU digits demo) the heads keep PyTorch's own
initialisation of each layer instead.

All tensors are NCHW. Convolutions in the heads are conv (no bias) + BatchNorm + ReLU; under
multi-process CUDA the trainer converts BatchNorm to SyncBatchNorm with
``convert_sync_batchnorm`` after moving the model to its device.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from .build import model_kwargs
from .checkpoint_io import weight_differences
from .conv import Conv2d
from .mg_ssaf import MGSSAF, LayerNorm2d

__all__ = ["MGSSAFSegBackbone", "ConvBNReLU", "PPM", "UPerHead", "FCNHead",
           "UPerNet", "build_segmentor", "convert_sync_batchnorm", "load_backbone_weights"]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of an NCHW tensor to ``size`` (align_corners False)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class MGSSAFSegBackbone(MGSSAF):
    """MG-SSAF as a segmentation backbone, as Swin's (mmseg ``SwinTransformer``, out_indices
    0-3): ``forward`` gives the four stage maps ``(B, C * 2**i, H / 2**(i+2), W / 2**(i+2))``,
    map i normalised over its channels by ``norm{i}``, a new LayerNorm (eps 1e-5, weight 1,
    bias 0). The classifier's final norm, ``last_conv`` and head are pruned: nothing is left
    that the maps do not use. Takes ``MGSSAF``'s arguments (``num_classes`` is ignored)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "num_classes": 0})
        self.prune_intermediate_layers(len(self.layers), prune_norm=True, prune_head=True)
        for i, info in enumerate(self.feature_info):
            self.add_module(f"norm{i}", LayerNorm2d(info["num_chs"], eps=1e-5))

    @property
    def out_channels(self) -> list[int]:
        """Channels of the four maps (C, 2C, 4C, 8C)."""
        return [info["num_chs"] for info in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.forward_intermediates(x, intermediates_only=True)
        return [getattr(self, f"norm{i}")(m) for i, m in enumerate(maps)]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU, 'same' padding; initialised as mmcv's
    ``ConvModule``: conv Kaiming normal (fan_out, ReLU), BatchNorm weight 1, bias 0
    (``init="mmcv"``), or left at PyTorch's defaults (``init="pytorch"``)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1,
                 init: str = "mmcv") -> None:
        super().__init__(
            Conv2d(in_chans, out_chans, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True),
        )
        if check_init(init) == "pytorch":
            return
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self[1].weight)
        nn.init.zeros_(self[1].bias)


HEAD_INITS = ("mmcv", "pytorch")


def check_init(init: str) -> str:
    """``init`` if it is one of HEAD_INITS, else ValueError."""
    if init not in HEAD_INITS:
        raise ValueError(f"head init {init!r}: expected one of {', '.join(HEAD_INITS)}")
    return init


def _classifier(channels: int, num_classes: int, init: str = "mmcv") -> Conv2d:
    """The 1x1 ``conv_seg`` of a head, normal(0, 0.01) with bias 0 (mmseg's decode heads), or
    PyTorch's default (``init="pytorch"``)."""
    conv = Conv2d(channels, num_classes, 1)
    if check_init(init) == "pytorch":
        return conv
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PPM(nn.ModuleList):
    """Pyramid pooling: for each scale s, adaptive average pool to s x s, 1x1 ConvBNReLU,
    upsample back. (B, C, h, w) -> list of (B, channels, h, w)."""

    def __init__(self, in_chans: int, channels: int, pool_scales: Sequence[int],
                 init: str = "mmcv") -> None:
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s),
                                       ConvBNReLU(in_chans, channels, init=init))
                         for s in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(nn.Module):
    """UPerNet decode head: four maps (B, in_chans[i], H/s_i, W/s_i), s = 4/8/16/32 ->
    (B, num_classes, H/4, W/4) logits."""

    def __init__(self, in_chans: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 init: str = "mmcv") -> None:
        super().__init__()
        self.ppm = PPM(in_chans[-1], channels, pool_scales, init)
        self.bottleneck = ConvBNReLU(in_chans[-1] + len(pool_scales) * channels, channels, 3,
                                     init)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, init=init)
                                           for c in in_chans[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3, init)
                                       for _ in in_chans[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_chans) * channels, channels, 3, init)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes, init)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser map, upsampled
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """FCN auxiliary head: (B, in_chans, h, w) -> (B, num_classes, h, w) through ``num_convs``
    3x3 ConvBNReLU, dropout and a 1x1 classifier (the input is not concatenated back)."""

    def __init__(self, in_chans: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 dropout: float = 0.1, init: str = "mmcv") -> None:
        super().__init__()
        self.convs = nn.Sequential(*(ConvBNReLU(in_chans if i == 0 else channels, channels, 3,
                                                init) for i in range(num_convs)))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class UPerNet(nn.Module):
    """Segmentor: (B, 3, H, W) images, H and W multiples of 32 -> (B, num_classes, H, W) logits;
    in training mode also the auxiliary head's logits, as a tuple ``(logits, aux_logits)``, both
    upsampled to (H, W).

    ``backbone(x)`` gives the four maps (strides 4/8/16/32) and ``backbone.out_channels`` their
    channels: a :class:`MGSSAFSegBackbone`. ``init``: the heads' initialisation, "mmcv" (as
    mmseg 0.11) or "pytorch" (each layer's PyTorch default).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512,
                 aux_channels: int = 256, aux_index: int = 2,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 init: str = "mmcv") -> None:
        super().__init__()
        in_chans = list(backbone.out_channels)
        self.backbone = backbone
        self.num_classes = num_classes
        self.aux_index = aux_index
        self.decode_head = UPerHead(in_chans, num_classes, channels, pool_scales, dropout, init)
        self.auxiliary_head = (FCNHead(in_chans[aux_index], num_classes, aux_channels,
                                       dropout=dropout, init=init) if aux_channels > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[2:]
        features = self.backbone(x)
        logits = _resize(self.decode_head(features), size)
        if not self.training or self.auxiliary_head is None:
            return logits
        return logits, _resize(self.auxiliary_head(features[self.aux_index]), size)


def convert_sync_batchnorm(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """SyncBatchNorm in place of BatchNorm when several processes train on CUDA (call before
    wrapping in DDP); the model unchanged otherwise (gloo/CPU has no SyncBatchNorm)."""
    if world_size > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_segmentor(config: CfgNode) -> UPerNet:
    """UPerNet on the MG-SSAF named by ``config.MODEL.*`` (as :class:`MGSSAFSegBackbone`), heads
    from ``config.SEG.*`` (see config.py)."""
    backbone = MGSSAFSegBackbone(**{**model_kwargs(config), "img_size": config.SEG.CROP_SIZE[0]})
    seg = config.SEG
    return UPerNet(backbone, config.MODEL.NUM_CLASSES, channels=seg.CHANNELS,
                   aux_channels=seg.AUX_CHANNELS, aux_index=seg.AUX_INDEX,
                   pool_scales=seg.POOL_SCALES, dropout=seg.DROPOUT, init=seg.HEAD_INIT)


# Parameters of an ImageNet MG-SSAF checkpoint that the segmentation backbone has no use for:
# the classifier's final norm (each map has its own new norm) and its head.
_UNUSED_PREFIXES = ("norm.", "last_conv.", "head.")


def load_backbone_weights(model: UPerNet, state_dict: dict[str, torch.Tensor]
                          ) -> tuple[list[str], list[str]]:
    """Load an ImageNet MG-SSAF state dict (``checkpoint["model"]``) into ``model.backbone``.
    The checkpoint's final norm and classifier are not used, and the backbone's output norms
    (``norm0``..``norm3``) keep their fresh initialisation; any other missing or unexpected key
    raises. Returns ``(new, unused)``: the backbone keys not in the checkpoint and the
    checkpoint keys not loaded (for the log)."""
    unused = [k for k in state_dict if k.startswith(_UNUSED_PREFIXES)]
    weights = {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_PREFIXES)}
    own_norms = [f"norm{i}" for i in range(len(model.backbone.layers))]
    fitting = {k: v for k, v in model.backbone.state_dict().items()
               if k.split(".")[0] not in own_norms}  # what the checkpoint must hold exactly
    differences = weight_differences(weights, fitting)
    if differences:
        raise RuntimeError("the checkpoint does not fit the MG-SSAF backbone: "
                           + "; ".join(differences))
    result = model.backbone.load_state_dict(weights, strict=False)
    return sorted(set(result.missing_keys)), unused
