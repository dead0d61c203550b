"""MG-SSAF: a Swin-style hierarchy whose blocks run space-wise separable window attention with an
Attention Fusion module (SS-MSA + AF) side by side with multi-scale global attention (MG-MSA).

Every tensor between modules is channels-first, ``(B, C, H, W)``. Parameter names follow the
released checkpoints (``MG-SSAF-{T,S,B}.keys.txt``), so those state dicts load with
``strict=True``.

Input sizes: at 224 (and sizes such as 448 whose stage maps divide by the window) the network is
exactly the released one, with every pooling size following the actual resolution. Any other
input whose sides are multiples of 32 also runs, square or not:

* SS-MSA pads each stage map (bottom and right, with zero q and k) to a multiple of the window.
  Padded keys are masked out of both softmaxes of the separable map and, being zero vectors, add
  nothing to the output; the outputs of padded queries are cropped.
* MG-MSA works on the unpadded map. Window pooling covers it with a ceil(H/w) x ceil(W/w) grid
  whose last row and column average only the positions they cover. Strip pooling needs the strip
  width to divide the stage map, which holds for every multiple of 32 with the released widths.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, LayerNorm2d, trunc_normal_

__all__ = ["MGSSAF"]


def _layer_norm_2d(dim: int) -> LayerNorm2d:
    """LN2d of the spec: LayerNorm over channels of a channels-first map, eps 1e-6."""
    return LayerNorm2d(dim, eps=1e-6)


class AttentionFusion(nn.Sequential):
    """AF module: ``dw3x3 over heads -> GELU -> 1x1 (heads -> heads)`` on attention maps.

    Each query's attention map is an ``mh x mw`` image over the keys, one channel per head. The
    module is kept as the released 3-element sequence (``.0``, ``.1``, ``.2``) so checkpoints load,
    but it runs as matrix products: on an ``mh x mw`` map the depthwise 3x3 convolution (zero
    padding 1) is a fixed linear map of the ``M = mh*mw`` positions per head, and the 1x1
    convolution mixes heads.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__(
            nn.Conv2d(num_heads, num_heads, 3, padding=1, groups=num_heads),
            nn.GELU(),
            nn.Conv2d(num_heads, num_heads, 1),
        )

    def _spatial_operator(self, map_size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The depthwise 3x3 convolution on an ``map_size`` map as ``(heads, M, M)`` matrices."""
        dw = self[0]
        heads = dw.out_channels
        m = map_size[0] * map_size[1]
        basis = torch.eye(m, dtype=like.dtype, device=like.device)
        basis = basis.view(m, 1, *map_size).expand(m, heads, *map_size)
        # (M_in, heads, mh, mw): the convolution's response to each one-hot input position.
        response = F.conv2d(basis, dw.weight.to(like.dtype), padding=1, groups=heads)
        return response.reshape(m, heads, m).transpose(0, 1)  # (heads, M_in, M_out)

    def forward(self, attn: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
        """attn: ``(..., heads, N, M)``, the ``M = mh*mw`` map of each of N queries per head.

        Returns AF(attn) of the same shape.
        """
        dw, act, pw = self
        heads = dw.out_channels
        y = torch.matmul(attn, self._spatial_operator(map_size, attn))
        y = act(y + dw.bias.to(attn.dtype).view(heads, 1, 1))
        # 1x1 over heads: (heads_out, heads_in) @ (..., heads_in, N*M)
        lead, n, m = y.shape[:-3], y.shape[-2], y.shape[-1]
        y = torch.matmul(pw.weight.to(attn.dtype).view(heads, heads), y.reshape(*lead, heads, n * m))
        return (y + pw.bias.to(attn.dtype).view(heads, 1)).view(*lead, heads, n, m)


def _separable_attention(q: torch.Tensor, k: torch.Tensor, row_mask: torch.Tensor | None,
                         col_mask: torch.Tensor | None) -> torch.Tensor:
    """The two-hop separable map ``P`` of SS-MSA for windows of scaled queries and keys.

    q, k: ``(Bw, h, w, w, d)`` with position (row i, column j) on axes 2, 3 (q already scaled).
    row_mask / col_mask: boolean masks of padded keys broadcastable to the row scores
    ``(.., i, j, j')`` and the column scores ``(.., j, i, i')``, or None.
    Returns ``P``: ``(Bw, h, w*w, w*w)``, ``P[(i,j),(i',j')] = rowA[i,j,j'] * colA[i,j',i']``.
    """
    bw, h, w = q.shape[:3]
    row = torch.matmul(q, k.transpose(-1, -2))  # (Bw, h, i, j, j')
    col = torch.matmul(q.transpose(2, 3), k.transpose(2, 3).transpose(-1, -2))  # (Bw, h, j, i, i')
    if row_mask is not None:
        row = row.masked_fill(row_mask, torch.finfo(row.dtype).min)
        col = col.masked_fill(col_mask, torch.finfo(col.dtype).min)
    row = row.softmax(-1)
    col = col.softmax(-1)
    # rowA[i, j, j'] * colA[i, j', i'], with colA[i, j', i'] = col[j', i, i'] read as (i, i', j')
    p = row.unsqueeze(-2) * col.permute(0, 1, 3, 4, 2).unsqueeze(-3)  # (Bw, h, i, j, i', j')
    return p.reshape(bw, h, w * w, w * w)


class MGSSAFAttention(nn.Module):
    """SS-MSA with the AF module (local heads) beside MG-MSA (global heads), on ``(B, C, H, W)``.

    ``qkv`` is a 1x1 projection to ``2*dim`` channels: every branch splits its block into q (first
    half) and k (second half), and the keys also serve as the values. The local block holds
    ``num_local`` heads; the global block is cut into window-pooled, horizontal-strip and
    vertical-strip chunks of ``num_global / 3`` heads each. The branch outputs are concatenated on
    channels (local, window, horizontal, vertical), then ``GELU -> 1x1 -> Dropout``.
    """

    def __init__(self, dim: int, num_heads: int, global_ratio: float, strip_width: int,
                 window_size: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_global = int(num_heads * global_ratio)
        self.num_local = num_heads - self.num_global
        self.local_channels = 2 * self.num_local * self.head_dim
        self.strip_width = strip_width
        self.window_size = window_size

        self.proj_qkv = nn.Conv2d(dim, 2 * dim, 1, bias=qkv_bias)
        self.attn_local_win = AttentionFusion(self.num_local)
        self.attn_global_win = AttentionFusion(self.num_global // 3) if self.num_global else None
        self.proj_concat = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        # Released checkpoints carry an ``attn.norm`` LayerNorm that the network never applies.
        self.register_load_state_dict_pre_hook(_drop_unused_norm)

    def _heads(self, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2*heads*d, H, W) -> q, k as (B, heads, d, H, W); q is scaled."""
        b, _, hh, ww = x.shape
        q, k = x.view(b, 2, heads, self.head_dim, hh, ww).unbind(1)
        return q * self.scale, k

    def ss_msa(self, x: torch.Tensor) -> torch.Tensor:
        """Local windows: (B, 2*num_local*d, H, W) -> (B, num_local*d, H, W)."""
        b, _, hh, ww = x.shape
        heads, d, w = self.num_local, self.head_dim, self.window_size
        pad_h, pad_w = -hh % w, -ww % w
        x = F.pad(x, (0, pad_w, 0, pad_h))
        hp, wp = hh + pad_h, ww + pad_w
        nh, nw = hp // w, wp // w
        # (B, 2, heads, d, nh, w, nw, w) -> (2, B, nh, nw, heads, w, w, d)
        x = x.view(b, 2, heads, d, nh, w, nw, w).permute(1, 0, 4, 6, 2, 5, 7, 3)
        q, k = x.reshape(2, b * nh * nw, heads, w, w, d).unbind(0)
        row_mask = col_mask = None
        if pad_h or pad_w:
            pad = torch.ones(hp, wp, dtype=torch.bool, device=x.device)
            pad[:hh, :ww] = False
            # (Hp, Wp) -> (B * nh * nw, 1, w, w), windows in the order of q and k
            pad = pad.view(nh, w, nw, w).transpose(1, 2).reshape(nh * nw, 1, w, w).repeat(b, 1, 1, 1)
            row_mask = pad.unsqueeze(-2)  # key (i, j') for row scores (.., i, j, j')
            col_mask = pad.transpose(-1, -2).unsqueeze(-2)  # key (i', j) for (.., j, i, i')
        p = _separable_attention(q * self.scale, k, row_mask, col_mask)  # (Bw, heads, w*w, w*w)
        attn = self.attn_drop(p + self.attn_local_win(p, (w, w)))
        out = torch.matmul(attn, k.reshape(-1, heads, w * w, d))  # (Bw, heads, w*w, d)
        # (B, nh, nw, heads, w, w, d) -> (B, heads, d, nh, w, nw, w)
        out = out.view(b, nh, nw, heads, w, w, d).permute(0, 3, 6, 1, 4, 2, 5)
        return out.reshape(b, heads * d, hp, wp)[:, :, :hh, :ww]

    def _window_pooled(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """MG-MSA window-pooled branch with AF. q, k: (B, heads, d, H, W) -> (B, heads, N, d)."""
        b, heads, d, hh, ww = k.shape
        w = self.window_size
        keys = F.avg_pool2d(k.reshape(b, heads * d, hh, ww), w, w, ceil_mode=True)
        sh, sw = keys.shape[-2:]
        keys = keys.view(b, heads, d, sh * sw).transpose(-1, -2)  # (B, heads, S, d)
        scores = torch.matmul(q.flatten(3).transpose(-1, -2), keys.transpose(-1, -2))  # (B, h, N, S)
        grid = scores.unflatten(-1, (sh, sw))
        g = grid.softmax(-1) * grid.softmax(-2)  # one softmax per pooled row, one per column
        g = g.flatten(-2)
        attn = self.attn_drop(g + self.attn_global_win(g, (sh, sw)))
        return torch.matmul(attn, keys)

    def _strip_pooled(self, q: torch.Tensor, k: torch.Tensor, horizontal: bool) -> torch.Tensor:
        """MG-MSA strip branch. q, k: (B, heads, d, H, W) -> (B, heads, N, d)."""
        b, heads, d, hh, ww = k.shape
        s = self.strip_width
        side = hh if horizontal else ww
        if side % s:
            raise ValueError(f"strip width {s} does not divide the stage map {hh}x{ww}")
        kernel = (s, ww) if horizontal else (hh, s)
        keys = F.avg_pool2d(k.reshape(b, heads * d, hh, ww), kernel, s)
        keys = keys.view(b, heads, d, -1).transpose(-1, -2)  # (B, heads, S, d)
        scores = torch.matmul(q.flatten(3).transpose(-1, -2), keys.transpose(-1, -2))
        return torch.matmul(self.attn_drop(scores.softmax(-1)), keys)

    def mg_msa(self, x: torch.Tensor) -> torch.Tensor:
        """Global: (B, 2*num_global*d, H, W) -> (B, num_global*d, H, W)."""
        b, _, hh, ww = x.shape
        heads = self.num_global // 3
        win, hor, ver = (self._heads(chunk, heads) for chunk in x.chunk(3, dim=1))
        outs = (self._window_pooled(*win), self._strip_pooled(*hor, horizontal=True),
                self._strip_pooled(*ver, horizontal=False))
        out = torch.cat(outs, dim=1)  # (B, num_global, N, d)
        return out.transpose(-1, -2).reshape(b, self.num_global * self.head_dim, hh, ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.proj_qkv(x)
        out = self.ss_msa(qkv[:, :self.local_channels])
        if self.num_global:
            out = torch.cat([out, self.mg_msa(qkv[:, self.local_channels:])], dim=1)
        return self.proj_drop(self.proj_concat(self.act(out)))


def _drop_unused_norm(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: drop the released, never-applied ``attn.norm`` parameters."""
    for name in ("norm.weight", "norm.bias"):
        state_dict.pop(prefix + name, None)


class ConvMlp(nn.Module):
    """Convolutional feed-forward on (B, C, H, W):
    ``LN2d -> dw3x3 -> 1x1 (C -> rC) -> GELU -> dw7x7 -> 1x1 (rC -> C) -> Dropout``."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = _layer_norm_2d(dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        self.branch_dw = nn.Conv2d(hidden, hidden, 7, padding=3, groups=hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pwconv1(self.dwconv(self.norm(x)))
        x = self.pwconv2(self.branch_dw(self.act(x)))
        return self.drop(x)


class MGSSAFBlock(nn.Module):
    """``x + drop_path(attn(LN2d(x)))`` then ``x + drop_path(mlp(x))`` on (B, C, H, W)."""

    def __init__(self, dim: int, num_heads: int, global_ratio: float, strip_width: int,
                 window_size: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                 attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = _layer_norm_2d(dim)
        self.attn = MGSSAFAttention(dim, num_heads, global_ratio, strip_width, window_size,
                                    qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlp(dim, mlp_ratio, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(x))


class PatchMerging(nn.Module):
    """Halves the resolution and doubles the channels of (B, C, H, W):
    ``LN2d -> dw3x3 s2 -> 1x1 -> GELU -> 1x1`` plus ``AvgPool 2 -> the same LN2d -> 1x1``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = _layer_norm_2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim)
        self.pwconv1 = nn.Conv2d(dim, 2 * dim, 1)
        self.pwconv2 = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.Fuse1x1 = nn.Conv2d(dim, 2 * dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pwconv2(self.act(self.pwconv1(self.dwconv(self.norm(x)))))
        b = self.Fuse1x1(self.norm(F.avg_pool2d(x, 2)))
        return a + b


class PatchEmbed(nn.Module):
    """Stride-4 stem: ``conv3x3 s2 -> GELU -> conv3x3 s2 -> LN2d -> GELU -> conv3x3``."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = _layer_norm_2d(embed_dim)
        self.Conv2Down = nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1)
        self.Conv4Down = nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1)
        self.ConvFuse = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv4Down(self.act(self.Conv2Down(x)))
        return self.ConvFuse(self.act(self.norm(x)))


class MGSSAFStage(nn.Module):
    """``depth`` blocks at one resolution, then (except in the last stage) a PatchMerging."""

    def __init__(self, dim: int, depth: int, downsample: bool, drop_path: Sequence[float],
                 **block_kwargs) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            MGSSAFBlock(dim, drop_path=dp, **block_kwargs) for dp in drop_path)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class MGSSAF(nn.Module):
    """MG-SSAF classifier: (B, in_chans, H, W) images -> (B, num_classes) logits.

    H and W must be multiples of 32 (see the module docstring for sizes other than 224).
    """

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 global_ratio: Sequence[float] = (0.0, 0.5, 0.5, 0.0),
                 strip_width: Sequence[int] = (0, 2, 2, 0), window_size: int = 7,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, head_hidden_dim: int = 1280,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, use_checkpoint: bool = False) -> None:
        super().__init__()
        _check_arch(img_size, embed_dim, depths, num_heads, global_ratio, strip_width, window_size)
        num_stages = len(depths)
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]

        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(MGSSAFStage(
                embed_dim * 2 ** i, depths[i], downsample=i < num_stages - 1,
                drop_path=rates[start:start + depths[i]], num_heads=num_heads[i],
                global_ratio=global_ratio[i], strip_width=strip_width[i],
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate))
        self.norm = _layer_norm_2d(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.last_conv = nn.Conv2d(self.num_features, head_hidden_dim, 1)
        self.head_act = nn.GELU()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden_dim, num_classes)
        self._init_weights()
        self.set_grad_checkpointing(use_checkpoint)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
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
    def no_weight_decay_keywords(self) -> set[str]:
        return {"norm"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/32, W/32), normalised."""
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"MG-SSAF needs input sides that are multiples of 32, got "
                             f"{tuple(x.shape[-2:])}")
        x = self.pos_drop(self.patch_embed(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features, h, w) -> (B, num_classes)."""
        x = self.head_drop(self.head_act(self.last_conv(self.avgpool(x))))
        return self.head(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
