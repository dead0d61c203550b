"""MG-SSAF: a Swin-style hierarchy whose blocks run space-wise separable window attention with an
Attention Fusion module (SS-MSA + AF) side by side with multi-scale global attention (MG-MSA).

Feature maps are ``(B, C, H, W)`` tensors in the channels-last memory format (laid out as
``(B, H, W, C)``): every convolution runs channels-last in oneDNN or cuDNN (under CPU autocast to
bfloat16 on CPUs without bfloat16 kernels, through float32: models/conv.py), LN2d normalises
contiguous channels, and the attention reads its projection as a ``(B, H, W, C)`` view (a
permutation, no copy) whose heads are contiguous channels (the layout only changes how the same
numbers are computed). On CPU, SS-MSA with its AF module runs as fused C kernels
(models/separable.py) that compute the same numbers as the PyTorch ops of
``windowed_attention``, which run elsewhere (CUDA, float16 autocast, padded maps): eagerly, or
with ``local_attention="compiled"`` through ``torch.compile``. Parameter names and shapes follow
the released checkpoints (``MG-SSAF-{T,S,B}.keys.txt``), so those state dicts load with
``strict=True``.

Input sizes: at 224, the resolution of the released checkpoints, the network is exactly the
released one (golden logits). At every size, every pooling size follows the actual resolution
(the released code fixes its strip-pooling kernels when built, so at 448 its logits differ from
these by up to 8.8e-4). Inputs whose sides are multiples of 32 run, square or not:

* SS-MSA pads each stage map (bottom and right, with zero q and k) to a multiple of the window.
  Padded keys are masked out of both softmaxes of the separable map and, being zero vectors, add
  nothing to the output; the outputs of padded queries are cropped.
* MG-MSA works on the unpadded map. Window pooling covers it with a ceil(H/w) x ceil(W/w) grid
  whose last row and column average only the positions they cover. Strip pooling needs the strip
  width to divide the stage map, which holds for every multiple of 32 with the released widths.

The released network sets no attention dropout, and this implementation has none: it lets the
AF module fold its last bias into the output instead of adding it to every attention weight.

The model has timm's interface (multi-scale features at strides 4/8/16/32, ``features_only``,
layer-wise decay groups, ``device``/``dtype`` construction, torch.fx tracing) and exports with
``torch.export`` (dynamic batch and sides), ONNX and ``torch.jit.trace``, whose graphs do not
depend on the example input: the fast CPU paths stand aside there and SS-MSA pads and masks at
every size (see ``ss_msa``); models/registry.py registers ``mg_ssaf_t``, ``mg_ssaf_s`` and
``mg_ssaf_b`` with ``timm.create_model``, with weights from local files only.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import (DropPath, register_notrace_function, register_notrace_module,
                         trunc_normal_)
from timm.models._features import feature_take_indices

from .checkpoint_io import load_pretrained
from .conv import Conv2d, autocast_off, recording
from .depthwise import DepthwiseConv2d
from .pointwise import PointwiseConv2d
from .separable import fused_available, separable_attention

__all__ = ["MGSSAF"]

_logger = logging.getLogger(__name__)

DeviceLike = torch.device | str | None

# torch.fx (timm's FX feature extraction) calls these as leaf modules, like nn.Conv2d: their
# CPU fast paths branch on the device, batch, memory format and autocast state of the input
register_notrace_module(Conv2d)
register_notrace_module(PointwiseConv2d)
register_notrace_module(DepthwiseConv2d)


def _pointwise(in_chans: int, out_chans: int, bias: bool = True, **dd: Any) -> nn.Conv2d:
    return PointwiseConv2d(in_chans, out_chans, bias, **dd)


def _depthwise(dim: int, kernel_size: int, stride: int = 1, **dd: Any) -> nn.Conv2d:
    return DepthwiseConv2d(dim, kernel_size, stride, **dd)


def _window_order(b: int, nh: int, nw: int, w: int, device: torch.device,
                  inverse: bool = False) -> torch.Tensor:
    """The pixels of ``b`` maps of ``nh x nw`` windows of ``w x w`` in window order: entry ``t``
    (window ``t // w**2`` of the ``b*nh*nw``, batch-major then row-major, position ``t % w**2``
    in it, row-major) is the index of that pixel in the ``(b, nh*w, nw*w)`` raster order;
    ``inverse``: entry ``p`` is the window-order index of raster pixel ``p``. Integer arithmetic
    on an ``arange``, so that every size is a plain expression of ``b``, ``nh`` and ``nw``."""
    t = torch.arange(b * nh * w * nw * w, device=device)
    if inverse:  # raster p: image row y = p // (nw*w) over the batch, column x
        y, x = t // (nw * w), t % (nw * w)
        return ((y // w) * nw + x // w) * (w * w) + (y % w) * w + x % w
    # window g = (image row of windows r over the batch) * nw + column of windows c
    g, n = t // (w * w), t % (w * w)
    return ((g // nw) * w + n // w) * (nw * w) + (g % nw) * w + n % w


class LayerNorm2d(nn.LayerNorm):
    """LN2d of the spec: LayerNorm over the channels of a ``(B, C, H, W)`` map, eps 1e-6 (the
    segmentation backbone's output norms use PyTorch's default 1e-5, as Swin's).

    Normalises the ``(B, H*W, C)`` token view, which a channels-last map gives without a copy.
    (Normalising a 4-D ``(B, H, W, C)`` view computes the same, but ``torch.compile`` then
    stores the saved normalised tokens in a channels-last order meant for ``(B, C, H, W)``
    tensors, and its LayerNorm backward falls back to scalar code.)
    """

    def __init__(self, dim: int, eps: float = 1e-6, device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = F.layer_norm(tokens, self.normalized_shape, self.weight, self.bias, self.eps)
        return tokens.view(b, h, w, c).permute(0, 3, 1, 2)


class AttentionFusion(nn.Sequential):
    """AF module: ``dw3x3 over heads -> GELU -> 1x1 (heads -> heads)`` on attention maps.

    Each query's attention map over the keys is an ``mh x mw`` image, one channel per head. The
    module keeps the released 3-element layout (``.0``, ``.1``, ``.2``) so checkpoints load, but
    runs as matrix products: on an ``mh x mw`` map the depthwise 3x3 convolution (zero padding 1)
    is a fixed linear map of the ``M = mh*mw`` positions of each head, and the 1x1 convolution is
    a ``(heads, heads)`` matrix mixing the heads.
    """

    def __init__(self, num_heads: int, device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Conv2d(num_heads, num_heads, 3, padding=1, groups=num_heads, **dd),
            nn.GELU(),
            nn.Conv2d(num_heads, num_heads, 1, **dd),
        )

    def _spatial_operator(self, map_size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The depthwise 3x3 convolution on ``map_size`` maps as ``(heads, M, M)`` matrices in
        ``like``'s dtype. Their entries are the weights (rounded to that dtype) and zeros, so the
        convolution runs exactly in the weight's dtype, outside autocast."""
        dw = self[0]
        heads, m = dw.out_channels, map_size[0] * map_size[1]
        weight = dw.weight.to(like.dtype).to(dw.weight.dtype)
        basis = torch.eye(m, dtype=weight.dtype, device=like.device)
        basis = basis.view(m, 1, *map_size).expand(m, heads, *map_size)
        # (M_in, heads, mh, mw): the convolution's response to each one-hot input position
        with autocast_off(like.device.type):
            response = F.conv2d(basis, weight, padding=1, groups=heads)
        return response.to(like.dtype).reshape(m, heads, m).transpose(0, 1)  # (heads, M_in, M_out)

    def forward(self, attn: torch.Tensor, values: torch.Tensor,
                map_size: tuple[int, int]) -> torch.Tensor:
        """``(attn + AF(attn)) @ values``.

        attn: ``(heads, G, Nq, M)``, the ``M = mh*mw`` map of each of ``Nq`` queries in each of
        ``G`` groups (windows or images); values: ``(heads, G, M, d)``. Returns
        ``(heads, G, Nq, d)``.
        """
        dw, act, pw = self
        heads, groups, nq, m = attn.shape
        d = values.shape[-1]
        dtype = attn.dtype
        flat = attn.reshape(heads, groups * nq, m)
        y = torch.baddbmm(dw.bias.to(dtype).view(heads, 1, 1), flat,
                          self._spatial_operator(map_size, attn))
        # attn + 1x1-over-heads(GELU(y)), without the 1x1's bias (added below)
        # the 1x1's (heads, heads, 1, 1) weight read through the channels-last order, so that its
        # gradient comes back channels-last, like every other convolution's (DDP buckets)
        mix = pw.weight.to(dtype).permute(0, 2, 3, 1).reshape(heads, heads)
        weights = torch.addmm(flat.view(heads, -1), mix, act(y).view(heads, -1))
        # the 1x1's bias is added to every weight, so it contributes bias * (sum of the values)
        bias = pw.bias.to(dtype).view(heads, 1, 1, 1) * values.sum(2, keepdim=True)
        # (heads, G, ...) -> (heads*G, ...) through the flat view: torch.export with dynamic sizes
        # keeps, from a view that merges the two axes, a guard that G is at least 2 (batch 1
        # with one window per stage map, the last stage at 224, would fail it)
        out = torch.baddbmm(bias.reshape(-1).view(-1, 1, d), weights.reshape(-1).view(-1, nq, m),
                            values.reshape(-1).view(-1, m, d))
        return out.view(heads, groups, nq, d)


# How SS-MSA + AF runs where the CPU kernels do not apply (``local_attention``, the config's
# MODEL.MGSSAF.LOCAL_ATTENTION): "ops", eager PyTorch ops (some thirty kernel launches per block
# on CUDA), or "compiled", the same function through torch.compile (Inductor fuses them).
LOCAL_ATTENTION = ("ops", "compiled")


def windowed_attention(x: torch.Tensor, heads: int, head_dim: int, window: int, scale: float,
                       af: AttentionFusion) -> torch.Tensor:
    """SS-MSA with the AF module ``af`` in PyTorch ops: ``(B, H, W, 2*heads*head_dim)`` (q then
    k, each ``heads`` contiguous heads) -> ``(B, H, W, heads, head_dim)``, over ``window x
    window`` windows. The numbers of the fused CPU kernels (models/separable.py)."""
    b, hh, ww, _ = x.shape
    d, w = head_dim, window
    nh, nw = -(-hh // w), -(-ww // w)
    pad_h, pad_w = nh * w - hh, nw * w - ww
    # an exported graph pads and masks at every size (by nothing where nothing is missing):
    # it must not depend on whether the example input's stage maps needed it
    padded = torch.compiler.is_exporting() or pad_h > 0 or pad_w > 0
    if padded:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    # Windows by a gather of the (B*Hp*Wp) pixels in window order (see _window_order): no
    # tensor has an axis of nh or nw windows, which may be 1, so that torch.export with
    # dynamic sides traced where a stage is one window across (the last, at 224) keeps a
    # graph for every size instead of specialising to that one
    groups, order = b * nh * nw, _window_order(b, nh, nw, w, x.device)
    x = x.reshape(b * nh * w * nw * w, 2 * heads * d).index_select(0, order)
    # (B*nh*nw, w, w, 2, heads, d) -> (2, heads, B*nh*nw, w, w, d)
    x = x.view(groups, w, w, 2, heads, d).permute(3, 4, 0, 1, 2, 5).contiguous()
    q, k = x.unbind(0)
    q = q * scale
    # Scores with the keys on the second-to-last axis, where softmax is fastest:
    # row[i, j', j] = q(i,j) . k(i,j') and col[j', i', i] = q(i,j') . k(i',j')
    row = torch.matmul(k, q.transpose(-1, -2))  # (heads, Bw, i, j', j)
    k_cols, q_cols = k.transpose(2, 3).contiguous(), q.transpose(2, 3).contiguous()
    col = torch.matmul(k_cols, q_cols.transpose(-1, -2))  # (heads, Bw, j', i', i)
    if padded:
        # padded positions (rows from H on, columns from W on), windows in the order of q, k
        pad = ((order // (nw * w) % (nh * w) >= hh) | (order % (nw * w) >= ww))
        pad = pad.view(groups, w, w)
        row = row.masked_fill(pad.unsqueeze(-1), torch.finfo(row.dtype).min)  # key (i, j')
        col = col.masked_fill(pad.transpose(-1, -2).unsqueeze(-1),
                              torch.finfo(col.dtype).min)  # key (i', j')
    row = row.softmax(-2).transpose(-1, -2).contiguous()  # rowA[i, j, j']
    col = col.softmax(-2).permute(0, 1, 4, 3, 2).contiguous()  # colA of (i,j') as [i, i', j']
    # P[(i,j), (i',j')] = rowA[i, j, j'] * colA[i, j', i']: query (i,j) goes along its row to
    # (i,j'), then (i,j') along its column to (i',j')
    p = row.unsqueeze(-2) * col.unsqueeze(-3)  # (heads, Bw, i, j, i', j')
    p = p.view(heads, -1, w * w, w * w)
    out = af(p, k.reshape(heads, -1, w * w, d), (w, w))  # (heads, Bw, w*w, d)
    # (heads, B*nh*nw*w*w, d) -> (B*Hp*Wp, heads, d) in window order -> the pixel order
    out = out.permute(1, 2, 0, 3).reshape(groups * w * w, heads * d)
    out = out.index_select(0, _window_order(b, nh, nw, w, x.device, inverse=True))
    out = out.view(b, nh * w, nw * w, heads, d)
    if padded:  # the outputs of padded queries cropped (a negative padding: sizes H and W)
        out = F.pad(out, (0, 0, 0, 0, 0, -pad_w, 0, -pad_h))
    return out


def _recording_a_graph() -> bool:
    """Whether a graph is being recorded around this call (``torch.compile``, ``torch.export``,
    ``torch.jit.trace``): it records ``windowed_attention``'s ops, not a compiled call."""
    return torch.compiler.is_compiling() or recording()


# Graphs of the compiled local attention a process keeps: one per stage shape (batch, map,
# heads, head dimension) and per grad mode and autocast dtype, so the train and validation
# batches of a run's four stages (the last batches of an epoch too) and a benchmark's phases
# stay compiled; Dynamo's default (8 per function) would send the rest back to eager ops.
COMPILED_GRAPHS = 64
_compiled: list = []  # the torch.compile wrapper of windowed_attention, made on first use


def compiled_windowed_attention(x: torch.Tensor, heads: int, head_dim: int, window: int,
                                scale: float, af: AttentionFusion) -> torch.Tensor:
    """``windowed_attention`` through ``torch.compile`` (Inductor: Triton kernels on CUDA, C++
    on CPU; static shapes, compiled once per stage shape on first use). Its recompile limit is
    raised to ``COMPILED_GRAPHS`` for these calls only (Dynamo's config is restored after each)."""
    if not _compiled:
        _compiled.append(torch.compile(windowed_attention, dynamic=False))
    with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS):
        return _compiled[0](x, heads, head_dim, window, scale, af)


@register_notrace_module  # torch.fx: a leaf, its window padding and fused kernels branch on shapes
class MGSSAFAttention(nn.Module):
    """SS-MSA with the AF module (local heads) beside MG-MSA (global heads), on ``(B, C, H, W)``.

    ``proj_qkv`` is a 1x1 projection to ``2*dim`` channels: every branch splits its block into q
    (first half) and k (second half), and the keys also serve as the values. The local block holds
    ``num_local`` heads; the global block is cut into window-pooled, horizontal-strip and
    vertical-strip chunks of ``num_global / 3`` heads each. The branch outputs are concatenated on
    channels (local, window, horizontal, vertical), then ``GELU -> 1x1 -> Dropout``.
    ``local_attention`` ("ops" or "compiled") is how SS-MSA runs where the CPU kernels do not
    apply (see ``ss_msa``); it changes no parameter and no number beyond float round-off.
    """

    def __init__(self, dim: int, num_heads: int, global_ratio: float, strip_width: int,
                 window_size: int, qkv_bias: bool = True, proj_drop: float = 0.0,
                 local_attention: str = "ops", device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        _check_local_attention(local_attention)
        self.local_attention = local_attention
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_global = int(num_heads * global_ratio)
        self.num_local = num_heads - self.num_global
        self.local_channels = 2 * self.num_local * self.head_dim
        self.strip_width = strip_width
        self.window_size = window_size

        self.proj_qkv = _pointwise(dim, 2 * dim, bias=qkv_bias, **dd)
        self.attn_local_win = AttentionFusion(self.num_local, **dd)
        self.attn_global_win = (AttentionFusion(self.num_global // 3, **dd) if self.num_global
                                else None)
        self.proj_concat = _pointwise(dim, dim, **dd)
        self.act = nn.GELU()
        self.proj_drop = nn.Dropout(proj_drop)
        # Released checkpoints carry an ``attn.norm`` LayerNorm that the network never applies.
        self.register_load_state_dict_pre_hook(_drop_unused_norm)

    def ss_msa(self, x: torch.Tensor) -> torch.Tensor:
        """Local windows: ``(B, H, W, 2*num_local*d) -> (B, H, W, num_local, d)``.

        On CPU, as fused kernels where they apply (models/separable.py, custom ops that
        ``torch.compile`` keeps; float32, float64 and bf16 autocast); every other case (CUDA,
        float16 autocast, padded maps, ``torch.export`` and ``torch.jit.trace``) runs the same
        numbers in PyTorch ops, ``windowed_attention``: eagerly, or with
        ``local_attention="compiled"`` through ``torch.compile`` (one Inductor graph per stage
        shape: fused Triton kernels on CUDA) outside graphs that are being compiled, exported or
        traced (these record the ops themselves).
        """
        heads, d, w = self.num_local, self.head_dim, self.window_size
        if fused_available(x, w, heads, self.attn_local_win):
            return separable_attention(x, w, heads, self.scale, self.attn_local_win)
        if self.local_attention == "compiled" and not _recording_a_graph():
            return compiled_windowed_attention(x, heads, d, w, self.scale, self.attn_local_win)
        return windowed_attention(x, heads, d, w, self.scale, self.attn_local_win)

    @staticmethod
    def _window_pool(k: torch.Tensor, window: int, size: tuple[int, int]) -> torch.Tensor:
        """Averages keys ``(heads, B, H*W, d)`` over the ``window x window`` cells of the map,
        row-major: ``(heads, B, ceil(H/w) * ceil(W/w), d)``; the cells of the last row and
        column average only the positions they cover (as ``avg_pool2d`` with ``ceil_mode``).

        Written as a zero padding to whole cells and a sum divided by each cell's count, so that
        every size is a plain expression of ``H`` and ``W`` (``torch.export`` with dynamic
        sizes); the numbers are those of ``avg_pool2d`` up to the order of the additions."""
        heads, b, _, d = k.shape
        hh, ww = size
        nh, nw = -(-hh // window), -(-ww // window)
        pad = (0, 0, 0, nw * window - ww, 0, nh * window - hh)
        grid = F.pad(k.reshape(heads * b, hh, ww, d), pad)
        sums = grid.view(heads * b, nh, window, nw, window, d).sum((2, 4))
        # positions covered by each cell: its rows times its columns
        rows = (hh - window * torch.arange(nh, device=k.device)).clamp(max=window)
        cols = (ww - window * torch.arange(nw, device=k.device)).clamp(max=window)
        counts = (rows.view(nh, 1, 1) * cols.view(1, nw, 1)).to(k.dtype)
        return (sums / counts).view(heads, b, nh * nw, d)

    @staticmethod
    def _strip_pool(k: torch.Tensor, strip: int, size: tuple[int, int],
                    horizontal: bool) -> torch.Tensor:
        """Averages keys ``(heads, B, H*W, d)`` over strips ``strip`` rows high and the map's
        width (``horizontal``: ``(heads, B, H/strip, d)``) or ``strip`` columns wide and the
        map's height (``(heads, B, W/strip, d)``); ``strip`` divides the side.

        The strips are an ``unfold`` of the ``(heads, B, H, W, d)`` view, not a reshape that
        splits ``H*W`` into ``(H/strip, strip*W)``: ``torch.export`` with a dynamic batch and
        dynamic sides checks such a reshape with a guard on the batch that fails at batch 1.
        The mean covers the same elements in the same order (the reshape's numbers)."""
        grid = k.unflatten(2, size)  # (heads, B, H, W, d)
        if horizontal:  # (heads, B, H/strip, W, d, strip)
            return grid.unfold(2, strip, strip).mean((3, 5))
        return grid.unfold(3, strip, strip).mean((2, 5))  # (heads, B, H, W/strip, d, strip)

    def mg_msa(self, x: torch.Tensor) -> torch.Tensor:
        """Global: ``(B, H, W, 2*num_global*d) -> (B, H, W, num_global, d)``."""
        b, hh, ww, _ = x.shape
        heads, d, w, s = self.num_global // 3, self.head_dim, self.window_size, self.strip_width
        if hh % s or ww % s:
            raise ValueError(f"strip width {s} does not divide the stage map {hh}x{ww}")
        # (B, H*W, 3 chunks, 2, heads, d) -> (3, 2, heads, B, H*W, d)
        x = x.reshape(b, hh * ww, 3, 2, heads, d).permute(2, 3, 4, 0, 1, 5)
        (q_win, k_win), (q_hor, k_hor), (q_ver, k_ver) = x.unbind(0)

        # window-pooled keys with AF: one softmax per pooled row times one per pooled column
        keys = self._window_pool(k_win, w, (hh, ww))
        sh, sw = -(-hh // w), -(-ww // w)
        scores = torch.matmul(q_win * self.scale, keys.transpose(-1, -2))
        grid = scores.view(heads, b, hh * ww, sh, sw)
        g = (grid.softmax(-1) * grid.softmax(-2)).view(heads, b, hh * ww, sh * sw)
        out_win = self.attn_global_win(g, keys, (sh, sw))

        # horizontal and vertical strip means: plain attention
        outs = [out_win]
        for q, k, horizontal in ((q_hor, k_hor, True), (q_ver, k_ver, False)):
            keys = self._strip_pool(k, s, (hh, ww), horizontal)
            scores = torch.matmul(q * self.scale, keys.transpose(-1, -2))
            outs.append(torch.matmul(scores.softmax(-1), keys))
        out = torch.cat(outs, 0)  # (num_global, B, H*W, d)
        return out.permute(1, 2, 0, 3).view(b, hh, ww, self.num_global, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, H, W, 2*C): a view, contiguous when x is channels-last
        qkv = self.proj_qkv(x).permute(0, 2, 3, 1)
        if not self.num_global:
            out = self.ss_msa(qkv)
        else:  # split, not slices: its backward writes the gradient once (a slice's zero-fills)
            local, global_ = qkv.split([self.local_channels, qkv.shape[3] - self.local_channels], 3)
            out = torch.cat([self.ss_msa(local), self.mg_msa(global_)], dim=3)
        # (B, H, W, heads, d) -> (B, C, H, W). GELU comes before heads and d merge, so that
        # torch.compile fuses it with the window reverse into vectorised loops over d.
        out = self.act(out).flatten(3).permute(0, 3, 1, 2)
        return self.proj_drop(self.proj_concat(out))


def _drop_unused_norm(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: drop the released, never-applied ``attn.norm`` parameters (see
    ``checkpoint_io.drop_unused_released_keys``)."""
    for name in ("norm.weight", "norm.bias"):
        state_dict.pop(prefix + name, None)



class ConvMlp(nn.Module):
    """Convolutional feed-forward on ``(B, C, H, W)``:
    ``LN2d -> dw3x3 -> 1x1 (C -> rC) -> GELU -> dw7x7 -> 1x1 (rC -> C) -> Dropout``."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0, device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden = int(dim * mlp_ratio)
        self.dwconv = _depthwise(dim, 3, **dd)
        self.norm = LayerNorm2d(dim, **dd)
        self.pwconv1 = _pointwise(dim, hidden, **dd)
        self.pwconv2 = _pointwise(hidden, dim, **dd)
        self.branch_dw = _depthwise(hidden, 7, **dd)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pwconv1(self.dwconv(self.norm(x)))
        x = self.pwconv2(self.branch_dw(self.act(x)))
        return self.drop(x)


class MGSSAFBlock(nn.Module):
    """``x + drop_path(attn(LN2d(x)))`` then ``x + drop_path(mlp(x))`` on ``(B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int, global_ratio: float, strip_width: int,
                 window_size: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 drop_path: float, local_attention: str = "ops", device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = LayerNorm2d(dim, **dd)
        self.attn = MGSSAFAttention(dim, num_heads, global_ratio, strip_width, window_size,
                                    qkv_bias, drop, local_attention, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlp(dim, mlp_ratio, drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(x))


class PatchMerging(nn.Module):
    """Halves the resolution and doubles the channels of ``(B, C, H, W)``:
    ``LN2d -> dw3x3 s2 -> 1x1 -> GELU -> 1x1`` plus ``AvgPool 2 -> the same LN2d -> 1x1``."""

    def __init__(self, dim: int, device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = LayerNorm2d(dim, **dd)
        self.dwconv = _depthwise(dim, 3, stride=2, **dd)
        self.pwconv1 = _pointwise(dim, 2 * dim, **dd)
        self.pwconv2 = _pointwise(2 * dim, 2 * dim, **dd)
        self.Fuse1x1 = _pointwise(dim, 2 * dim, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pwconv2(self.act(self.pwconv1(self.dwconv(self.norm(x)))))
        return a + self.Fuse1x1(self.norm(F.avg_pool2d(x, 2)))


class PatchEmbed(nn.Module):
    """Stride-4 stem: ``conv3x3 s2 -> GELU -> conv3x3 s2 -> LN2d -> GELU -> conv3x3``.

    ``(B, in_chans, H, W)`` images -> ``(B, embed_dim, H/4, W/4)``, channels-last from the first
    convolution on.
    """

    def __init__(self, in_chans: int, embed_dim: int, device: DeviceLike = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = LayerNorm2d(embed_dim, **dd)
        self.Conv2Down = Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1, **dd)
        self.Conv4Down = Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, **dd)
        self.ConvFuse = Conv2d(embed_dim, embed_dim, 3, padding=1, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv4Down(self.act(self.Conv2Down(x)))
        return self.ConvFuse(self.act(self.norm(x)))


class MGSSAFStage(nn.Module):
    """``depth`` blocks at one resolution, then (except in the last stage) a PatchMerging.

    The stage's feature map (its ``feature_info`` entry) is the output of ``blocks``, before the
    PatchMerging: ``(B, dim, H, W)`` at the stage's own stride.
    """

    def __init__(self, dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 device: DeviceLike = None, dtype: torch.dtype | None = None,
                 **block_kwargs: Any) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*(
            MGSSAFBlock(dim, drop_path=dp, **block_kwargs, **dd) for dp in drop_path))
        self.downsample = PatchMerging(dim, **dd) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks: ``(B, dim, H, W) -> (B, dim, H, W)``."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.blocks(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


class MGSSAF(nn.Module):
    """MG-SSAF classifier: (B, in_chans, H, W) images -> (B, num_classes) logits.

    H and W must be multiples of 32 (see the module docstring for sizes other than 224). The
    model follows timm's interface: ``forward_features`` gives the normalised last map,
    ``forward_head`` pools it and applies the head (``1x1 -> GELU -> Dropout -> Linear``),
    ``forward_intermediates`` the four stage maps of ``feature_info`` (strides 4/8/16/32, C, 2C,
    4C, 8C channels, each taken before the stage's PatchMerging). ``num_classes=0`` has no
    classifier: the model then returns the ``head_hidden_size`` pooled features.
    ``local_attention`` "compiled" runs SS-MSA + AF through ``torch.compile`` where the CPU
    kernels do not apply (CUDA, float16 autocast, padded maps); "ops", the default, runs it eagerly.
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 global_ratio: Sequence[float] = (0.0, 0.5, 0.5, 0.0),
                 strip_width: Sequence[int] = (0, 2, 2, 0), window_size: int = 7,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, head_hidden_dim: int = 1280,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.2, use_checkpoint: bool = False,
                 global_pool: str = "avg", local_attention: str = "ops",
                 device: DeviceLike = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_arch(img_size, embed_dim, depths, num_heads, global_ratio, strip_width, window_size)
        _check_pool(global_pool)
        _check_local_attention(local_attention)
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.head_hidden_size = head_hidden_dim
        self.feature_info = [
            dict(num_chs=embed_dim * 2 ** i, reduction=4 * 2 ** i, module=f"layers.{i}.blocks")
            for i in range(num_stages)]
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(MGSSAFStage(
                embed_dim * 2 ** i, depths[i], downsample=i < num_stages - 1,
                drop_path=rates[start:start + depths[i]], num_heads=num_heads[i],
                global_ratio=global_ratio[i], strip_width=strip_width[i],
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                local_attention=local_attention, **dd))
        self.norm = LayerNorm2d(self.num_features, **dd)
        self.last_conv = _pointwise(self.num_features, head_hidden_dim, **dd)
        self.head_act = nn.GELU()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = (nn.Linear(head_hidden_dim, num_classes, **dd) if num_classes > 0
                     else nn.Identity())
        self._init_weights()
        self.set_grad_checkpointing(use_checkpoint)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)
        downsamplers = [self.patch_embed] + [s.downsample for s in self.layers if s.downsample]
        for module in downsamplers:
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (same outputs and gradients, less memory)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The LN2d weights and biases (no weight decay, as for every other 1-D parameter)."""
        return {f"{name}.{p}" for name, m in self.named_modules() if isinstance(m, LayerNorm2d)
                for p in ("weight", "bias")}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"norm"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups, first to last (timm; layer-wise LR decay): the stem, then each block
        (coarse: each stage); a stage's PatchMerging and the final norm join the group before them
        (timm's ``(99999,)``); ``last_conv`` and ``head`` match nothing: the last group."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),
                (r"^norm", (99999,)),
            ])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: none, the model returns
        the ``head_hidden_size`` features), on the model's device, in its dtype and train/eval
        mode. ``global_pool`` (None: keep the current one) 'avg' pools the map; '' keeps it
        spatial: ``(B, head_hidden_size, h, w)`` features, or with a classifier
        ``(B, num_classes, h, w)`` logits, the classifier applied at every position."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = self.patch_embed.ConvFuse.weight
        if num_classes > 0:
            self.head = nn.Linear(self.head_hidden_size, num_classes, device=like.device,
                                  dtype=like.dtype)
            _init_linear(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) images -> (B, num_features, H/32, W/32), normalised."""
        x = self.pos_drop(self.patch_embed(check_input_size(x)))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage maps ``indices`` (timm: an int n takes the last n stages, None all), each
        ``(B, C * 2**i, H / 2**(i+2), W / 2**(i+2))`` before the stage's PatchMerging; ``norm``
        applies the final norm to the last stage's map. Returns the maps, or (unless
        ``intermediates_only``) ``(forward_features(x), maps)``; with ``stop_early`` the stages
        after the last one taken are skipped (the first item is then that stage's map)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: MG-SSAF gives NCHW maps only")
        x = check_input_size(x)
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stages = self.layers if not stop_early else self.layers[:max_index + 1]
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
            if stage.downsample is not None and i < len(stages) - 1:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == last + 1 else x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops what the stage maps ``indices`` do not need: later stages, the PatchMerging after
        the last one kept, and (``prune_head``) the head; ``prune_norm`` drops the final norm.
        Returns the indices taken (as ``forward_intermediates`` reads them)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        if prune_norm or max_index < len(self.layers) - 1:
            self.norm = nn.Identity()
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_head:
            self.reset_classifier(0)
            self.last_conv = nn.Identity()
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, num_features, h, w) -> (B, num_classes): global average, 1x1, GELU, classifier.
        ``pre_logits``: the ``(B, head_hidden_size)`` features before the classifier; with
        ``global_pool`` '' no pooling: ``(B, head_hidden_size, h, w)`` features and
        ``(B, num_classes, h, w)`` logits."""
        if self.global_pool == "avg":
            x = x.mean((2, 3), keepdim=True)
        x = self.head_drop(self.head_act(self.last_conv(x)))
        if not self.global_pool:  # per position: the classifier over the channels
            return x if pre_logits else self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x.flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's loader of a local weights file (``pretrained=True,
        pretrained_cfg_overlay=dict(file=path)``): the project's safe loader of checkpoints
        (``models.checkpoint_io.load_pretrained``, as ``--pretrained``)."""
        load_pretrained(checkpoint_path, self, _logger)


def _init_linear(m: nn.Linear) -> None:
    trunc_normal_(m.weight, std=0.02)
    nn.init.zeros_(m.bias)


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool {global_pool!r}: expected 'avg' or ''")


def _check_local_attention(local_attention: str) -> None:
    if local_attention not in LOCAL_ATTENTION:
        raise ValueError(f"local_attention {local_attention!r}: expected one of "
                         + ", ".join(map(repr, LOCAL_ATTENTION)))


# torch.fx records it as one call (the check runs on the real input); FX wraps public names only
@register_notrace_function
def check_input_size(x: torch.Tensor) -> torch.Tensor:
    """``x``, after a ValueError unless both sides of the ``(..., H, W)`` input are multiples of
    32 (returned, so that a traced graph keeps the check: FX drops calls whose result is unused)."""
    if x.shape[-2] % 32 or x.shape[-1] % 32:
        raise ValueError(f"MG-SSAF needs input sides that are multiples of 32, got "
                         f"{tuple(x.shape[-2:])}")
    return x


def _check_arch(img_size: int, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                global_ratio: Sequence[float], strip_width: Sequence[int],
                window_size: int) -> None:
    """Raises ValueError naming the stage and values of any stage the spec cannot build."""
    lengths = {len(depths), len(num_heads), len(global_ratio), len(strip_width)}
    if len(lengths) != 1:
        raise ValueError(f"DEPTHS {list(depths)}, NUM_HEADS {list(num_heads)}, GLOBAL_RATIO "
                         f"{list(global_ratio)} and STRIP_WIDTH {list(strip_width)} must have "
                         "one entry per stage")
    if img_size % 32:
        raise ValueError(f"DATA.IMG_SIZE {img_size} must be a multiple of 32")
    if embed_dim % 2:
        raise ValueError(f"EMBED_DIM {embed_dim} must be even (the stem's first conv has E/2)")
    for i, (heads, g, sw) in enumerate(zip(num_heads, global_ratio, strip_width)):
        dim = embed_dim * 2 ** i
        res = img_size // 2 ** (i + 2)
        where = f"stage {i} (dim {dim}, NUM_HEADS {heads}, GLOBAL_RATIO {g}, STRIP_WIDTH {sw})"
        if heads < 1 or dim % heads:
            raise ValueError(f"{where}: dim {dim} is not divisible by {heads} heads")
        if not 0.0 <= g < 1.0:
            raise ValueError(f"{where}: GLOBAL_RATIO must be in [0, 1)")
        if g == 0:
            continue
        d = dim // heads
        local, glob = int(heads * (1 - g)), int(heads * g)
        if local < 1 or local + glob != heads or int(2 * dim * (1 - g)) != 2 * local * d:
            raise ValueError(f"{where}: {heads} heads cannot be split into local and global "
                             f"heads by ratio {g} (got {local} local + {glob} global)")
        if glob % 3:
            raise ValueError(f"{where}: {glob} global heads is not a multiple of 3")
        if sw < 1 or res % sw:
            raise ValueError(f"{where}: strip width {sw} does not divide the stage resolution "
                             f"{res} (DATA.IMG_SIZE {img_size})")
