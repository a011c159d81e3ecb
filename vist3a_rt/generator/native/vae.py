"""The Wan 2.1 video VAE's decoder (diffusers' ``AutoencoderKLWan.decode``) in plain torch.

Latents [B, z, F, h, w], already de-normalised, become frames [B, 3, 1 + 4(F - 1), 8h, 8w] in
[-1, 1]. Parameter names are diffusers' (``post_quant_conv.*``, ``decoder.*``), so the decoder
half of a ``diffusion_pytorch_model.safetensors`` loads as is; the encoder half is skipped.

The architecture, from the config: ``conv_in`` → mid block (residual block, single-head
attention within each frame, residual block) → up blocks (residual blocks, then a ×2 spatial
upsampler that halves the width; ``temperal_downsample`` reversed says which ones also double
time) → RMS norm, SiLU, ``conv_out``. Every 3D convolution is causal in time: a frame sees
itself and the two before it, zeros before the video starts.

One pass instead of diffusers' frame loop. diffusers decodes one latent frame at a time and
carries each causal convolution's last two input frames over to the next call. Those carried
frames are exactly what a causal convolution over the whole sequence would see, so running every
convolution once over all frames gives the same result. The one place the loop is not plain
streaming is the temporal upsampler: on the first latent frame it skips its time convolution
(that frame stays one frame) and the time convolution of the second call starts from zeros, not
from the first frame. So the time convolution runs causally over the frames *after* the video's
first, whose outputs each become two frames, and the first frame passes through unchanged:
1 + 2(n - 1) frames, hence 1 + 4(F - 1) after two such stages. Attention, norms and the spatial
upsampling act on each frame alone. ``chunk_frames`` decodes a few latent frames at a time
instead (the same carried-frame scheme, lower peak memory); any chunking gives the same video.

Numerics: in float64 the one-pass, chunked and diffusers decodes agree to ~1e-15 (the same
computation); in float32 to ~1e-6 relative (rounding: longer convolutions, the norm written out).
Dtypes: float32, bfloat16, float16 (weights and latents alike). For half precision the RMS norm
works in float32 through the gain and rounds once (diffusers rounds before the gain), so its
bfloat16 decode is, if anything, closer to float32 than diffusers'. Inference only: no dropout, no
tiling/slicing, and only the Wan 2.1 layout (``is_residual=False``, no ``patch_size``; the Wan
2.2 VAE is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import CheckpointError, ConfigError, Vist3AInputError

ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # in a full VAE file; never loaded here
_NORMALIZE_IN_FP32 = (torch.float16, torch.bfloat16)

# A decode's carried state: each causal conv's last input frames, keyed by the conv; each temporal
# upsampler's key, once present, says the video's first frame has already gone by.
Stream = dict[nn.Module, Any]


@dataclass(frozen=True)
class WanVAEConfig:
    """``AutoencoderKLWan``'s config.json fields (same names, same meaning). Reads like a mapping
    too (``dict(config)``), as diffusers' config does."""

    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # unused by the Wan 2.1 decoder (kept for round trips)
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: diffusers' spelling
    dropout: float = 0.0  # training only
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> WanVAEConfig:
        """From config.json as read (``_class_name`` and other ``_`` keys are checked or skipped)."""
        class_name = config.get("_class_name", "AutoencoderKLWan")
        if class_name != "AutoencoderKLWan":
            raise ConfigError(f"VAE config is for {class_name!r}, expected 'AutoencoderKLWan'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"unknown AutoencoderKLWan config field(s): {unknown}")
        missing = [name for name in ("latents_mean", "latents_std") if name not in config]
        if missing:
            raise ConfigError(f"VAE config lacks {missing} (needed to de-normalise latents)")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
        made = cls(**values)
        made.check()
        return made

    def check(self) -> None:
        if self.is_residual or self.patch_size is not None:
            raise ConfigError("the Wan 2.2 VAE layout (is_residual / patch_size) is not supported; "
                              "only the Wan 2.1 AutoencoderKLWan decoder is")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                              f"down stage of dim_mult {list(self.dim_mult)}), got {list(self.temperal_downsample)}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries, z_dim is {self.z_dim}")
        spatial, temporal = 2 ** (len(self.dim_mult) - 1), 2 ** sum(map(bool, self.temperal_downsample))
        if (self.scale_factor_spatial, self.scale_factor_temporal) != (spatial, temporal):
            raise ConfigError(f"scale factors (spatial {self.scale_factor_spatial}, temporal "
                              f"{self.scale_factor_temporal}) disagree with dim_mult / temperal_downsample, "
                              f"which give spatial {spatial}, temporal {temporal}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, name: str) -> Any:
        return self.to_dict()[name]


@dataclass
class DecoderOutput:
    """What ``decode(..., return_dict=True)`` returns, as in diffusers."""

    sample: Tensor  # [B, 3, T, H, W]


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time padding is all in front (2·p_t frames, zeros), so an output frame depends
    on its input frame and earlier ones only; height and width are padded p_h, p_w on both sides.
    With a ``stream`` the front padding is taken from the frames the previous chunk left there."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pad_t
        self.spatial_padding = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:  # [B, C, T, H, W]
        past = stream.get(self) if stream is not None and self.past_frames else None
        if past is not None:
            x = torch.cat([past, x], dim=2)
        if stream is not None and self.past_frames:
            stream[self] = x[:, :, -self.past_frames:].clone()  # a copy: the chunk itself can go
        missing = self.past_frames - (0 if past is None else past.shape[2])
        return super().forward(F.pad(x, (*self.spatial_padding, missing, 0)))


class RMSNorm(nn.Module):
    """x / max(||x||₂, 1e-12) over channels (``F.normalize``), times √C and a per-channel gain (no
    bias). The norm is written out: ``F.normalize`` over dim 1 of a [B, C, T, H, W] tensor is ~15×
    slower on the CPU than a sum of squares, and differs from it by rounding only."""

    def __init__(self, dim: int, spatial_dims: int) -> None:  # 3: [B, C, T, H, W]; 2: [N, C, H, W]
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.float() if x.dtype in _NORMALIZE_IN_FP32 else x
        inverse_norm = wide.square().sum(dim=1, keepdim=True).sqrt_().clamp_min_(1e-12).reciprocal_()
        return (wide * inverse_norm).mul_(self.gamma.to(wide.dtype) * self.scale).to(x.dtype)


class ResidualBlock(nn.Module):
    """(RMS norm, SiLU, causal 3×3×3 conv) twice, plus a shortcut (1×1×1 conv when widths differ)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, 3)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, 3)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:
        shortcut = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), stream)
        x = self.conv2(F.silu(self.norm2(x)), stream)
        return x + shortcut


class FrameAttention(nn.Module):
    """Single-head self-attention among the pixels of each frame (nothing across time), residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T, H, W]
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [BT, HW, 3C]: q | k | v
        q, k, v = qkv.unsqueeze(1).contiguous().chunk(3, dim=-1)  # [BT, 1, HW, C] each
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        out = self.proj(attended.reshape(b * t, c, h, w))
        return out.view(b, t, c, h, w).transpose(1, 2) + x


class Upsampler(nn.Module):
    """×2 nearest upsampling and a 3×3 conv to half the width, per frame; with ``temporal``, first
    a causal time conv to twice the width whose halves become two frames (not for the first)."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:  # [B, C, T, H, W]
        if self.time_conv is not None:
            x = self._double_frames(x, stream)
        b, c, t, h, w = x.shape
        frames = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)

    def _double_frames(self, x: Tensor, stream: Stream | None) -> Tensor:
        starts_video = stream is None or self not in stream
        if stream is not None:
            stream[self] = True
        if starts_video:
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            pairs = self.time_conv(x, stream).view(b, 2, c, t, h, w)
            x = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame i → 2i, 2i+1
        return torch.cat([first, x], dim=2) if starts_video else x


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([FrameAttention(dim)])

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:
        x = self.attentions[0](self.resnets[0](x, stream))
        return self.resnets[1](x, stream)


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: str | None) -> None:
        super().__init__()
        widths = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(w, out_dim) for w in widths])
        self.upsamplers = None if upsample is None else nn.ModuleList([Upsampler(out_dim, upsample == "3d")])

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, stream)
        return x if self.upsamplers is None else self.upsamplers[0](x, stream)


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        base = config.base_dim if config.decoder_base_dim is None else config.decoder_base_dim
        widths = [base * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal = tuple(reversed(config.temperal_downsample))
        self.conv_in = CausalConv3d(config.z_dim, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0])
        self.up_blocks = nn.ModuleList()
        for i, out_dim in enumerate(widths[1:]):
            in_dim = widths[i] if i == 0 else widths[i] // 2  # the previous upsampler halved it
            upsample = None if i == len(temporal) else ("3d" if temporal[i] else "2d")
            self.up_blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, upsample))
        self.norm_out = RMSNorm(widths[-1], 3)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, x: Tensor, stream: Stream | None = None) -> Tensor:
        x = self.mid_block(self.conv_in(x, stream), stream)
        for block in self.up_blocks:
            x = block(x, stream)
        return self.conv_out(F.silu(self.norm_out(x)), stream)


class WanVAEDecoder(nn.Module):
    """The decoding half of ``AutoencoderKLWan``: de-normalised latents → video in [-1, 1]."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def forward(self, latents: Tensor,  # [B, z, F, h, w], de-normalised, in the weights' dtype
                chunk_frames: int | None = None) -> Tensor:  # [B, 3, 1 + t(F-1), s·h, s·w]
        """All latent frames in one pass, or ``chunk_frames`` at a time (same result, less memory)."""
        self._check_latents(latents)
        x = self.post_quant_conv(latents)
        if chunk_frames is None:
            video = self.decoder(x)
        else:
            if not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1:
                raise Vist3AInputError(f"chunk_frames must be a positive integer or None, got {chunk_frames!r}")
            stream: Stream = {}
            video = torch.cat([self.decoder(part, stream) for part in x.split(chunk_frames, dim=2)], dim=2)
        return video.clamp(-1.0, 1.0)

    def decode(self, latents: Tensor, return_dict: bool = True,
               chunk_frames: int | None = None) -> DecoderOutput | tuple[Tensor]:
        """diffusers' call form: ``.decode(z).sample`` or ``.decode(z, return_dict=False)[0]``."""
        video = self(latents, chunk_frames)
        return DecoderOutput(video) if return_dict else (video,)

    def _check_latents(self, latents: Tensor) -> None:
        z = self.config.z_dim
        if latents.ndim != 5 or latents.shape[1] != z or 0 in latents.shape:
            raise Vist3AInputError(f"latents must be [B, {z}, F, h, w] with every size >= 1, "
                                   f"got shape {list(latents.shape)}")
        if latents.dtype != self.dtype:
            raise Vist3AInputError(f"latents are {latents.dtype} but the VAE weights are {self.dtype}; "
                                   f"cast them with latents.to(vae.dtype)")


def build_native_vae(config: Mapping[str, Any] | WanVAEConfig, state_dict: Mapping[str, Tensor], *,
                     dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> WanVAEDecoder:
    """A ``WanVAEDecoder`` from config.json (as a dict) and the VAE's state dict -- typically the
    memory-mapped tensors of ``diffusion_pytorch_model.safetensors``, encoder included (skipped).
    Built on the meta device; the tensors are assigned, not copied, unless ``dtype`` / ``device``
    ask for a cast or a move. Eval mode, no gradients."""
    vae_config = config if isinstance(config, WanVAEConfig) else WanVAEConfig.from_dict(config)
    with torch.device("meta"):
        model = WanVAEDecoder(vae_config)
    state = select_decoder_state(model, state_dict)
    if dtype is not None or device is not None:
        state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
    dtypes = {tensor.dtype for tensor in state.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise CheckpointError(f"VAE decoder weights must share one floating dtype (pass dtype= to cast), "
                              f"found {sorted(map(str, dtypes))}")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def select_decoder_state(model: WanVAEDecoder, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors ``model`` needs (encoder tensors skipped), checked for names and shapes."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected and not name.startswith(ENCODER_PREFIXES)]
    if missing or unexpected:
        config = model.config
        raise CheckpointError(
            f"VAE weights do not fit the Wan VAE decoder of this config (base_dim {config.base_dim}, z_dim "
            f"{config.z_dim}, dim_mult {list(config.dim_mult)}, num_res_blocks {config.num_res_blocks}): "
            f"{len(missing)} of {len(expected)} expected keys missing{_listing(missing)}; "
            f"{len(unexpected)} unexpected keys{_listing(unexpected)}")
    wrong = [f"{name} {list(state_dict[name].shape)} (expected {list(tensor.shape)})"
             for name, tensor in expected.items() if state_dict[name].shape != tensor.shape]
    if wrong:
        raise CheckpointError(f"VAE weights have {len(wrong)} tensors of the wrong shape{_listing(wrong)}")
    return {name: state_dict[name] for name in expected}


def _listing(names: list[str], shown: int = 6) -> str:
    if not names:
        return ""
    more = f", … and {len(names) - shown} more" if len(names) > shown else ""
    return ": " + ", ".join(names[:shown]) + more

