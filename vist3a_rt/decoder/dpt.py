"""DPT heads of the AnySplat reconstruction network: per-pixel depth and Gaussian parameters.

Both heads follow VGGT's DPT design (Ranftl et al., "Vision Transformers for Dense
Prediction"): four tapped token maps of the aggregator (width ``dim_in`` = 2E, one
``patch_size`` x ``patch_size`` patch per token) are layer-normed, projected by 1x1 convs,
given a sinusoidal UV position code, brought to four scales (x4, x2, x1, x0.5), fused
coarse-to-fine by RefineNet blocks and upsampled to the image size.

* ``DPTHead`` (AnySplat's ``depth_head``): depth = exp(channel 0), confidence = 1 + exp(last).
* ``GaussianParamHead`` (``gaussian_param_head``): adds a 7x7-conv image branch
  (``input_merger``) to the fused features and returns the raw per-pixel channels
  (1 density logit + 82 Gaussian parameters + 1 confidence) without activation.

Attribute names and module types mirror the official tree, so official state dicts
(minus the leading ``encoder.``) load with ``strict=True`` and the set of Linear/Conv2d
modules equals the official LoRA target set. Frames run in chunks of ``frames_chunk_size``
like the official forward. Token lists with more than 10 entries are indexed by layer
number, shorter ones (the stitched model keeps only the taps) by tap position, as officially.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Vist3AInputError

POS_EMBED_RATIO = 0.1  # the UV code is added at a tenth of its unit amplitude
POS_EMBED_OMEGA0 = 100.0


# ----------------------------------------------------------------------------- position code


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device) -> Tensor:
    """Pixel-centre UV coordinates [height, width, 2] spanning the diagonal-normalised image plane."""
    diag = math.sqrt(aspect_ratio ** 2 + 1.0)
    half_x = aspect_ratio / diag * (width - 1) / width
    half_y = 1.0 / diag * (height - 1) / height
    xs = torch.linspace(-half_x, half_x, steps=width, dtype=dtype, device=device)
    ys = torch.linspace(-half_y, half_y, steps=height, dtype=dtype, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)


def sincos_embed(pos: Tensor, dim: int, omega0: float = POS_EMBED_OMEGA0) -> Tensor:
    """[M] positions -> [M, dim] float32 code [sin(pos·ω), cos(pos·ω)], computed in float64."""
    freqs = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / torch.pow(omega0, freqs)
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def add_uv_pos_embed(x: Tensor, image_w: int, image_h: int) -> Tensor:
    """x [N, C, h, w] + 0.1 · (sincos(u) ‖ sincos(v)) on a UV grid with the image's aspect ratio."""
    n, channels, h, w = x.shape
    grid = uv_grid(w, h, image_w / image_h, x.dtype, x.device).reshape(-1, 2)
    code = torch.cat([sincos_embed(grid[:, 0], channels // 2), sincos_embed(grid[:, 1], channels // 2)], dim=-1)
    code = code.view(h, w, channels) * POS_EMBED_RATIO
    return x + code.permute(2, 0, 1)[None].expand(n, -1, -1, -1).to(x.dtype)


# ----------------------------------------------------------------------------- fusion blocks


class ResidualConvUnit(nn.Module):
    """relu → 3x3 conv → relu → 3x3 conv, plus a skip.

    The official unit applies an *in-place* ReLU to its input before the skip-add, so the
    skip carries relu(x), not x; we reproduce that explicitly (without mutating the input).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, C, h, w]
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """RefineNet step: (coarse + RCU(skip)) → RCU → bilinear resize (align_corners) → 1x1 conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: Sequence[int] | None = None) -> Tensor:
        # x, skip: [N, C, h, w]; size: output (h', w'), default twice the input
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTScratch(nn.Module):
    """The official ``scratch`` container: 3x3 reassembly convs, four RefineNets, output convs."""

    def __init__(self, out_channels: Sequence[int], features: int) -> None:
        super().__init__()
        for i, channels in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False))
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)

    def fuse(self, maps: Sequence[Tensor]) -> Tensor:
        """Four maps (finest first) [N, c_i, h_i, w_i] -> fused [N, features // 2, h_1·2, w_1·2]."""
        l1, l2, l3, l4 = (getattr(self, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
        out = self.refinenet4(l4, size=l3.shape[2:])
        out = self.refinenet3(out, l3, size=l2.shape[2:])
        out = self.refinenet2(out, l2, size=l1.shape[2:])
        out = self.refinenet1(out, l1)
        return self.output_conv1(out)


def _output_conv(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, kernel_size=1),
    )


# ----------------------------------------------------------------------------- heads


class _DPTTrunk(nn.Module):
    """Shared part of both heads: token maps -> fused feature map at 2x the finest scale."""

    def __init__(self, dim_in: int, patch_size: int, features: int, out_channels: Sequence[int],
                 intermediate_layer_idx: Sequence[int], frames_chunk_size: int | None) -> None:
        super().__init__()
        if len(out_channels) != 4 or len(intermediate_layer_idx) != 4:
            raise Vist3AInputError(f"DPT needs 4 out_channels and 4 tapped layers, got "
                                   f"{list(out_channels)} and {list(intermediate_layer_idx)}")
        self.patch_size = patch_size
        self.intermediate_layer_idx = list(intermediate_layer_idx)
        self.frames_chunk_size = frames_chunk_size
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, kernel_size=1) for c in out_channels)
        c = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = DPTScratch(out_channels, features)

    def tapped(self, tokens: Sequence[Tensor]) -> list[Tensor]:
        """The four tapped layers: by layer number in a full list, by position in a taps-only list."""
        if len(tokens) > 10:
            return [tokens[i] for i in self.intermediate_layer_idx]
        return list(tokens[: len(self.intermediate_layer_idx)])

    def fused_features(self, taps: Sequence[Tensor], image_hw: tuple[int, int], patch_start_idx: int) -> Tensor:
        """taps: 4 x [B, S, P, dim_in] (one frame chunk) -> [B·S, features // 2, 2·h_1, 2·w_1]."""
        h, w = image_hw
        ph, pw = h // self.patch_size, w // self.patch_size
        maps = []
        for project, resize, t in zip(self.projects, self.resize_layers, taps):
            b, s = t.shape[:2]
            x = self.norm(t[:, :, patch_start_idx:].contiguous().view(b * s, -1, t.shape[-1]))
            x = x.permute(0, 2, 1).reshape(b * s, x.shape[-1], ph, pw)
            maps.append(resize(add_uv_pos_embed(project(x), w, h)))
        return self.scratch.fuse(maps)

    def run_chunked(self, fn, tokens: Sequence[Tensor], images: Tensor):
        """Call fn(taps, images) on frame chunks (taps [B, s, P, C], images [B, s, 3, H, W])."""
        _check_inputs(tokens, images)
        taps, num_frames = self.tapped(tokens), images.shape[1]
        chunk = self.frames_chunk_size
        if chunk is None or chunk >= num_frames:
            return [fn(taps, images)]
        return [fn([t[:, i:i + chunk] for t in taps], images[:, i:i + chunk])
                for i in range(0, num_frames, chunk)]


def _check_inputs(tokens: Sequence[Tensor], images: Tensor) -> None:
    if images.dim() != 5 or images.shape[2] != 3:
        raise Vist3AInputError(f"images must be [B, S, 3, H, W], got {list(images.shape)}")
    for t in tokens:
        if t.dim() != 4 or t.shape[:2] != images.shape[:2]:
            raise Vist3AInputError(f"tokens must be [B, S, P, C] matching images {list(images.shape[:2])}, "
                                   f"got {list(t.shape)}")


_ACTIVATIONS = {
    "exp": torch.exp,
    "inv_log": lambda x: torch.sign(x) * torch.expm1(torch.abs(x)),
    "linear": lambda x: x,
}
_CONF_ACTIVATIONS = {
    "expp1": lambda c: 1 + c.exp(),
    "expp0": torch.exp,
    "sigmoid": torch.sigmoid,
}


class DPTHead(_DPTTrunk):
    """VGGT DPT head as AnySplat's ``depth_head``: depth [B, S, H, W, 1] and confidence [B, S, H, W]."""

    def __init__(self, dim_in: int = 2048, patch_size: int = 14, output_dim: int = 2, features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024), head_features_2: int = 32,
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23), activation: str = "exp",
                 conf_activation: str = "expp1", frames_chunk_size: int | None = 8) -> None:
        super().__init__(dim_in, patch_size, features, out_channels, intermediate_layer_idx, frames_chunk_size)
        if activation not in _ACTIVATIONS or conf_activation not in _CONF_ACTIVATIONS:
            raise Vist3AInputError(f"unknown DPT activation {activation!r} / {conf_activation!r}; "
                                   f"known: {sorted(_ACTIVATIONS)} / {sorted(_CONF_ACTIVATIONS)}")
        self.activation, self.conf_activation = activation, conf_activation
        self.scratch.output_conv2 = _output_conv(features // 2, head_features_2, output_dim)

    def forward(self, tokens: Sequence[Tensor], images: Tensor, patch_start_idx: int = 5) -> tuple[Tensor, Tensor]:
        # tokens: list of [B, S, P, dim_in]; images: [B, S, 3, H, W] (only the size is used)
        chunks = self.run_chunked(lambda t, im: self._forward_chunk(t, im, patch_start_idx), tokens, images)
        return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)

    def _forward_chunk(self, taps: Sequence[Tensor], images: Tensor, patch_start_idx: int) -> tuple[Tensor, Tensor]:
        b, s, _, h, w = images.shape
        out = self.fused_features(taps, (h, w), patch_start_idx)
        size = (h // self.patch_size * self.patch_size, w // self.patch_size * self.patch_size)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        out = self.scratch.output_conv2(add_uv_pos_embed(out, w, h)).permute(0, 2, 3, 1)
        value = _ACTIVATIONS[self.activation](out[..., :-1])
        conf = _CONF_ACTIVATIONS[self.conf_activation](out[..., -1])
        return value.view(b, s, *value.shape[1:]), conf.view(b, s, *conf.shape[1:])


class GaussianParamHead(_DPTTrunk):
    """AnySplat's ``gaussian_param_head``: raw per-pixel Gaussian channels [B, S, output_dim, H, W].

    The fused DPT features (``features // 2`` channels, which must equal ``head_features_1``
    and ``head_features_2``) are upsampled to the image and added to ``input_merger``
    (7x7 conv + ReLU on the [0, 1] image) before the UV code and ``output_conv2``.
    """

    def __init__(self, dim_in: int = 2048, patch_size: int = 14, output_dim: int = 84, features: int = 256,
                 out_channels: Sequence[int] = (256, 512, 1024, 1024), head_features_1: int = 128,
                 head_features_2: int = 128, intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
                 frames_chunk_size: int | None = 8) -> None:
        super().__init__(dim_in, patch_size, features, out_channels, intermediate_layer_idx, frames_chunk_size)
        if not features // 2 == head_features_1 == head_features_2:
            raise Vist3AInputError(f"Gaussian head widths must agree: features // 2 = {features // 2}, "
                                   f"head_features_1 = {head_features_1}, head_features_2 = {head_features_2}")
        self.input_merger = nn.Sequential(nn.Conv2d(3, head_features_2, kernel_size=7, padding=3), nn.ReLU())
        self.scratch.output_conv2 = _output_conv(head_features_1, head_features_2, output_dim)

    def forward(self, tokens: Sequence[Tensor], images: Tensor, patch_start_idx: int = 5) -> Tensor:
        # tokens: list of [B, S, P, dim_in]; images: [B, S, 3, H, W] in [0, 1]
        chunks = self.run_chunked(lambda t, im: self._forward_chunk(t, im, patch_start_idx), tokens, images)
        return torch.cat(chunks, dim=1)

    def _forward_chunk(self, taps: Sequence[Tensor], images: Tensor, patch_start_idx: int) -> Tensor:
        b, s, _, h, w = images.shape
        out = self.fused_features(taps, (h, w), patch_start_idx)
        image_feat = self.input_merger(images.flatten(0, 1))
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True) + image_feat
        out = self.scratch.output_conv2(add_uv_pos_embed(out, w, h))
        return out.view(b, s, *out.shape[1:])
