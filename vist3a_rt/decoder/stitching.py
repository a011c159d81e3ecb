"""The stitching layer: video-VAE latents -> tokens of the reconstruction network's DINO.

The official VIST3A stitching layer is a convolution described by a short spec string,
``conv{1,2,3}d_k<kernel>_o<out>[_s<stride>][_p<padding>][_d<dilation>]`` (case-insensitive),
where each number is an int or an ``AxBxC`` tuple (one entry per spatial dim), e.g.
``conv3d_k5x3x3_o1024_s1x2x2_p2x1x1``. It is built with replicate padding and a bias.

Before the conv, the latent is trilinearly upsampled (align_corners=True) in time from
T_lat to the video's 4·(T_lat−1)+1 frames (Wan's temporal compression) at the latent's own
spatial size. ``StitchingLayer`` is an ``nn.Conv3d`` so its state dict is exactly the
official ``stitching_layer`` entry (``weight``, ``bias``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, Vist3AInputError

_SPEC = re.compile(
    r"conv(?P<dim>[123])d_k(?P<k>[0-9x]+)_o(?P<o>[0-9]+)"
    r"(?:_s(?P<s>[0-9x]+))?(?:_p(?P<p>[0-9x]+))?(?:_d(?P<d>[0-9x]+))?",
    re.IGNORECASE)
_FIELDS = (("k", "kernel_size"), ("s", "stride"), ("p", "padding"), ("d", "dilation"))


@dataclass(frozen=True)
class ConvSpec:
    """A parsed conv spec; sizes are tuples with one entry per spatial dim."""

    dim: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def text(self) -> str:
        """The canonical spec string (every field written out)."""
        def fmt(values: tuple[int, ...]) -> str:
            return "x".join(map(str, values))
        return (f"conv{self.dim}d_k{fmt(self.kernel_size)}_o{self.out_channels}_s{fmt(self.stride)}"
                f"_p{fmt(self.padding)}_d{fmt(self.dilation)}")


def parse_conv_spec(text: str) -> ConvSpec:
    """Parse ``conv3d_k5x3x3_o1024_s1x2x2_p2x1x1``-style specs; malformed ones raise ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"conv spec must be a string, got {type(text).__name__}")
    match = _SPEC.fullmatch(text)
    if match is None:
        raise ConfigError(f"bad conv spec {text!r}: expected conv<1|2|3>d_k<k>_o<out>[_s<s>][_p<p>][_d<d>] "
                          "with each size an int or AxBxC, e.g. 'conv3d_k5x3x3_o1024_s1x2x2_p2x1x1'")
    dim = int(match["dim"])
    out_channels = int(match["o"])
    if out_channels < 1:
        raise ConfigError(f"bad conv spec {text!r}: out channels must be positive, got {out_channels}")
    defaults = {"s": "1", "p": "0", "d": "1"}
    sizes = {name: _sizes(text, name, match[key] or defaults[key], dim) for key, name in _FIELDS}
    return ConvSpec(dim=dim, out_channels=out_channels, **sizes)


def _sizes(text: str, name: str, value: str, dim: int) -> tuple[int, ...]:
    parts = value.lower().split("x")
    if not all(part.isdigit() for part in parts):
        raise ConfigError(f"bad conv spec {text!r}: {name} {value!r} must be an int or ints joined by 'x'")
    numbers = tuple(int(part) for part in parts)
    if len(numbers) == 1:
        numbers = numbers * dim
    if len(numbers) != dim:
        raise ConfigError(f"bad conv spec {text!r}: {name} {value!r} has {len(numbers)} entries, "
                          f"a conv{dim}d needs 1 or {dim}")
    smallest = 0 if name == "padding" else 1
    if min(numbers) < smallest:
        raise ConfigError(f"bad conv spec {text!r}: {name} entries must be >= {smallest}, got {value!r}")
    return numbers


class StitchingLayer(nn.Conv3d):
    """Temporal trilinear upsampling of the latent, then the spec's Conv3d (replicate padding, bias)."""

    def __init__(self, spec: ConvSpec | str, in_channels: int = 16, temporal_compression: int = 4) -> None:
        spec = parse_conv_spec(spec) if isinstance(spec, str) else spec
        if spec.dim != 3:
            raise ConfigError(f"the stitching layer needs a conv3d spec (latents are [B, C, T, h, w]), "
                              f"got {spec.text!r}")
        super().__init__(in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
                         padding=spec.padding, dilation=spec.dilation, padding_mode="replicate", bias=True)
        self.spec = spec
        self.temporal_compression = temporal_compression

    def forward(self, latent: Tensor) -> Tensor:  # [B, in_ch, T_lat, h, w] -> [B, out, T', h', w']
        return super().forward(self.upsample(latent))

    def upsample(self, latent: Tensor) -> Tensor:  # [B, in_ch, T_lat, h, w] -> [B, in_ch, T, h, w]
        """Trilinear (align_corners) to T = temporal_compression·(T_lat−1)+1 frames, same h, w."""
        self._check_latent(latent)
        T_lat, h, w = latent.shape[2:]
        frames = self.temporal_compression * (T_lat - 1) + 1
        return F.interpolate(latent, size=(frames, h, w), mode="trilinear", align_corners=True)

    def _check_latent(self, latent: Tensor) -> None:
        if latent.dim() != 5 or latent.shape[1] != self.in_channels:
            raise Vist3AInputError(f"stitching layer expects a latent [B, {self.in_channels}, T_lat, h, w], "
                                   f"got {list(latent.shape)}")
        if latent.shape[2] < 1 or min(latent.shape[3:]) < 1:
            raise Vist3AInputError(f"stitching layer got an empty latent {list(latent.shape)}")
