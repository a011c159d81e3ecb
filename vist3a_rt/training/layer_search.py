"""Layer search: which block of the reconstruction network is best reached from video latents?

VIST3A stitches the video VAE's latent space into the reconstruction network at the block
whose features a single linear Conv3d predicts best. For every candidate block the stitching
conv is fitted in closed form by ridge regression and scored by its mean squared error; the
lowest MSE wins, and its fit initialises the stitching layer for fine-tuning.

The steps, as the official ``find_layer_for_stitching.py`` does them:

1. Capture: for a set of videos, the VAE latents [N, C, T_lat, h, w] and each candidate block's
   patch-token features [N, T, P, E], stored in ``feature_dtype`` (official: float16).
2. Fit (streaming ridge regression, float64): the stored latents are upcast and trilinearly
   upsampled (align_corners) to T = 4·(T_lat−1)+1 frames; each batch's im2col patches X
   (columns (in-channel, kT, kH, kW), rows (video, frame, row, col)) and targets Y (the
   features, one row per token) are folded into XᵀX, XᵀY, ΣX, ΣY. X is never built for the
   whole set. Then (XᵀX + λI)·W = XᵀY, and the bias is the mean residual Y − X·W over all
   rows (with the float64 W, before the float32 cast).
3. Evaluate: the float32 conv is run as the real ``StitchingLayer`` runs it (replicate
   padding) on the stored latents upsampled in their storage dtype (the official evaluation
   does not upcast before upsampling), MSE = Σ error² / element count.

Padding: the official fit takes **zero**-padded patches while the conv it initialises pads by
**replicate**; ``padding="official"`` reproduces that (and the official numbers),
``padding="consistent"`` fits on replicate-padded patches, matching the evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoder.stitching import ConvSpec, StitchingLayer, parse_conv_spec
from ..errors import Vist3AInputError
from .adapters import BlockFeatureSource, VideoLatentSource, check_videos

DEFAULT_RIDGE = 1e-4
DEFAULT_BATCH_SIZE = 3
TEMPORAL_COMPRESSION = 4  # Wan: T = 4·(T_lat − 1) + 1
PADDINGS = {"official": ("zeros", "replicate"), "consistent": ("replicate", "replicate")}  # (fit, evaluation)
LATENTS_KEY, LATENTS_KEY_FP16 = "features.vae_latents", "features.vae_latents_fp16"
INIT_FILE, FITS_FILE, TABLE_FILE = "stitching_init.safetensors", "fits.safetensors", "layer_search.json"


# --------------------------------------------------------------------------- captured features


@dataclass
class LayerSearchFeatures:
    """Latents and candidate-block features of the same N videos (the official features file)."""

    latents: Tensor  # [N, C, T_lat, h, w]
    blocks: dict[str, Tensor]  # {block: [N, T, P, E]}, P = rows·cols tokens in row-major order
    grid: tuple[int, int]  # (rows, cols)

    def __post_init__(self) -> None:
        if not isinstance(self.latents, Tensor) or self.latents.dim() != 5:
            raise Vist3AInputError(f"latents must be [N, C, T_lat, h, w], got {_shape(self.latents)}")
        if not self.blocks:
            raise Vist3AInputError("no block features given")
        rows, cols = self.grid
        for name, feats in self.blocks.items():
            if not isinstance(feats, Tensor) or feats.dim() != 4 or feats.shape[2] != rows * cols:
                raise Vist3AInputError(f"features {name} must be [N, T, {rows}*{cols} tokens, E], "
                                       f"got {_shape(feats)}")
            if feats.shape[0] != self.latents.shape[0]:
                raise Vist3AInputError(f"features {name} hold {feats.shape[0]} videos but there are "
                                       f"{self.latents.shape[0]} latents: they must come from the same videos")

    @property
    def num_videos(self) -> int:
        return self.latents.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """(latents [b, ...], {block: [b, ...]}) for consecutive videos, b <= batch_size."""
        for start in range(0, self.num_videos, batch_size):
            end = start + batch_size
            yield self.latents[start:end], {name: f[start:end] for name, f in self.blocks.items()}

    def save(self, path: str | Path) -> Path:
        """The official key layout (``features.vae_latents_fp16`` when float16, ``features.<block>``)."""
        from safetensors.torch import save_file

        key = LATENTS_KEY_FP16 if self.latents.dtype == torch.float16 else LATENTS_KEY
        tensors = {key: self.latents, **{f"features.{n}": f for n, f in self.blocks.items()}}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"grid": f"{self.grid[0]}x{self.grid[1]}"})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, grid: tuple[int, int] | None = None) -> "LayerSearchFeatures":
        """Read a features file; other keys in it are ignored. The token grid comes from ``grid``,
        the file's ``grid`` metadata, or (as the official code assumes) a square of P tokens."""
        tensors, metadata = _read_safetensors(Path(path))
        latent_keys = [k for k in (LATENTS_KEY_FP16, LATENTS_KEY) if k in tensors]
        blocks = {k.removeprefix("features."): v for k, v in tensors.items()
                  if k.startswith("features.") and k not in (LATENTS_KEY, LATENTS_KEY_FP16)}
        if not latent_keys or not blocks:
            raise Vist3AInputError(f"{path} is not a layer-search features file: it needs "
                                   f"'{LATENTS_KEY_FP16}' (or '{LATENTS_KEY}') and 'features.<block>' tensors")
        latents = tensors[latent_keys[0]]
        grid = grid or _grid_from(metadata.get("grid"), next(iter(blocks.values())), path)
        return cls(latents, blocks, grid)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise Vist3AInputError(f"features file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith("features.")]
            return {k: f.get_tensor(k) for k in keys}, f.metadata() or {}
    except SafetensorError as err:
        raise Vist3AInputError(f"{path} is not a readable safetensors file: {err}") from None


def _grid_from(text: str | None, feats: Tensor, path) -> tuple[int, int]:
    if text:
        rows, _, cols = text.partition("x")
        if rows.isdigit() and cols.isdigit():
            return int(rows), int(cols)
    side = math.isqrt(feats.shape[2]) if feats.dim() == 4 else 0
    if feats.dim() != 4 or side * side != feats.shape[2]:
        raise Vist3AInputError(f"{path}: cannot tell the token grid of features {_shape(feats)} (not a square "
                               "number of tokens and no 'grid' metadata); pass the grid explicitly")
    return side, side


def _shape(value) -> list[int] | str:
    return list(value.shape) if isinstance(value, Tensor) else type(value).__name__


def video_batches(videos: Tensor,  # [N, 3, T, H, W] uint8, or float in [-1, 1]: the VAE's input
                  feedforward_videos: Tensor | None = None,  # [N, 3, T, H', W']: the network's input
                  batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[tuple[Tensor, Tensor]]:
    """(VAE videos, network videos) batches in [-1, 1] float32; uint8 maps to x/127.5 − 1."""
    feedforward_videos = videos if feedforward_videos is None else feedforward_videos
    check_videos(videos, "videos")
    check_videos(feedforward_videos, "feedforward videos")
    if videos.shape[0] != feedforward_videos.shape[0]:
        raise Vist3AInputError(f"{videos.shape[0]} VAE videos but {feedforward_videos.shape[0]} "
                               "feed-forward videos: they must be the same videos")
    _check_batch_size(batch_size)
    for start in range(0, videos.shape[0], batch_size):
        yield tuple(_to_unit_range(v[start:start + batch_size]) for v in (videos, feedforward_videos))


def _to_unit_range(videos: Tensor) -> Tensor:
    if videos.dtype == torch.uint8:
        return videos.float() / 127.5 - 1
    if not videos.is_floating_point():
        raise Vist3AInputError(f"videos must be uint8 or float in [-1, 1], got {videos.dtype}")
    return videos.float()


@torch.no_grad()
def capture_features(latent_source: VideoLatentSource, feature_source: BlockFeatureSource,
                     batches: Iterable[tuple[Tensor, Tensor]], *, blocks: Iterable[str] | None = None,
                     feature_dtype: torch.dtype = torch.float16) -> LayerSearchFeatures:
    """Run both models over (VAE videos, network videos) batches and keep latents and block
    features on the CPU in ``feature_dtype`` (official: float16, which the fit then upcasts)."""
    names = resolve_blocks(blocks, feature_source.block_names)
    latents, feats, grid = [], {n: [] for n in names}, None
    for vae_videos, feedforward_videos in batches:
        # official order: the network first, then the VAE (matters only if the network drew random numbers)
        block_feats, batch_grid = feature_source.block_features(feedforward_videos, names)
        batch_latents = latent_source.latents(vae_videos)
        if grid is not None and batch_grid != grid:
            raise Vist3AInputError(f"token grid changed between batches: {grid} then {batch_grid}")
        grid = batch_grid
        latents.append(batch_latents.to("cpu", feature_dtype))
        for name in names:
            feats[name].append(block_feats[name].to("cpu", feature_dtype))
    if grid is None:
        raise Vist3AInputError("no videos to capture features from")
    return LayerSearchFeatures(torch.cat(latents), {n: torch.cat(f) for n, f in feats.items()}, grid)


def resolve_blocks(blocks: Iterable[str] | None, available: Iterable[str]) -> tuple[str, ...]:
    """The requested blocks (all when None), checked against those available."""
    available = tuple(available)
    if blocks is None:
        return available
    blocks = tuple(blocks.split(",")) if isinstance(blocks, str) else tuple(blocks)
    unknown = [b for b in blocks if b not in available]
    if unknown:
        raise Vist3AInputError(f"unknown block(s) {unknown}; available: {', '.join(available)}")
    if not blocks or len(set(blocks)) != len(blocks):
        raise Vist3AInputError(f"blocks must be a non-empty list without repeats, got {list(blocks)}")
    return blocks


# --------------------------------------------------------------------------- the fit


def upsample_latents(latents: Tensor,  # [B, C, T_lat, h, w]
                     temporal_compression: int = TEMPORAL_COMPRESSION) -> Tensor:  # [B, C, T, h, w]
    """Trilinear (align_corners) to T = temporal_compression·(T_lat−1)+1 frames, in the input's dtype."""
    T_lat, h, w = latents.shape[2:]
    size = (temporal_compression * (T_lat - 1) + 1, h, w)
    return F.interpolate(latents, size=size, mode="trilinear", align_corners=True)


def conv3d_patches(x: Tensor,  # [B, C, T, H, W]
                   spec: ConvSpec, padding_mode: str = "zeros") -> Tensor:  # [B·T'·H'·W', C·kT·kH·kW]
    """im2col for a Conv3d: one row per output position (batch, frame, row, col), columns ordered
    (in-channel, kT, kH, kW) so ``X @ weight.reshape(out, -1).T`` is the conv without bias."""
    (pT, pH, pW), C = spec.padding, x.shape[1]
    x = F.pad(x, (pW, pW, pH, pH, pT, pT), mode="constant" if padding_mode == "zeros" else padding_mode)
    for dim, k, s, d in zip((2, 3, 4), spec.kernel_size, spec.stride, spec.dilation):
        x = x.unfold(dim, d * (k - 1) + 1, s)[..., ::d]  # appends the (dilated) kernel axis
    return x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, C * math.prod(spec.kernel_size))


class RidgeStatistics:
    """Streaming sufficient statistics of a multi-target ridge regression: XᵀX, ΣX and the row
    count are shared by every target set (here: every block); XᵀY, ΣY, ΣY² are per target set."""

    def __init__(self, num_inputs: int, device: torch.device, dtype: torch.dtype = torch.float64) -> None:
        self.xtx = torch.zeros(num_inputs, num_inputs, device=device, dtype=dtype)
        self.x_sum = torch.zeros(num_inputs, device=device, dtype=dtype)
        self.xty: dict[str, Tensor] = {}
        self.y_sum: dict[str, Tensor] = {}
        self.y_sq: dict[str, Tensor] = {}
        self.rows = 0

    def add_inputs(self, X: Tensor) -> None:  # [rows, d]
        self.xtx += X.T @ X
        self.x_sum += X.sum(0)
        self.rows += X.shape[0]

    def add_targets(self, name: str, X: Tensor, Y: Tensor) -> None:  # [rows, d], [rows, out]
        if name not in self.xty:
            self.xty[name] = Y.new_zeros(X.shape[1], Y.shape[1])
            self.y_sum[name], self.y_sq[name] = Y.new_zeros(Y.shape[1]), Y.new_zeros(())
        self.xty[name] += X.T @ Y
        self.y_sum[name] += Y.sum(0)
        self.y_sq[name] += Y.square().sum()

    def solve(self, name: str, ridge: float) -> tuple[Tensor, Tensor, float]:
        """W [d, out] of (XᵀX + λI)W = XᵀY, bias = mean residual, and the fit's own MSE."""
        A = self.xtx.clone()
        A.diagonal().add_(ridge)
        W = torch.linalg.solve(A, self.xty[name])
        bias = (self.y_sum[name] - self.x_sum @ W) / self.rows
        # Σ‖Y − XW − b‖² = ΣY² − 2⟨W, XᵀY⟩ + ⟨W, XᵀXW⟩ − rows·‖b‖², b being the mean residual
        sq = self.y_sq[name] - 2 * (W * self.xty[name]).sum() + (W * (self.xtx @ W)).sum()
        sq -= self.rows * bias.square().sum()
        return W, bias, sq.item() / (self.rows * W.shape[1])


# --------------------------------------------------------------------------- search


@dataclass
class BlockFit:
    """One candidate block's fitted stitching conv and its score."""

    block: str
    weight: Tensor  # [out, in, kT, kH, kW] float32
    bias: Tensor  # [out] float32
    mse: float  # through the StitchingLayer conv (replicate padding), per element
    fit_mse: float  # of the regression itself (its own padding, float64 W), per element

    def state_dict(self) -> dict[str, Tensor]:
        """``StitchingLayer.load_state_dict``-ready (and the official ``stitching_layer`` entry)."""
        return {"weight": self.weight, "bias": self.bias}


@dataclass
class LayerSearchResult:
    fits: list[BlockFit]  # in candidate order
    conv_spec: str
    ridge: float
    padding: str  # "official" | "consistent"
    num_videos: int
    batch_size: int
    feature_dtype: str
    extra: dict = field(default_factory=dict)  # provenance the caller wants in the JSON

    @property
    def ranking(self) -> list[BlockFit]:
        """Best first; ties keep candidate order (the official pick is the first minimum)."""
        return sorted(self.fits, key=lambda fit: fit.mse)

    @property
    def best(self) -> BlockFit:
        return self.ranking[0]

    def to_dict(self) -> dict:
        fit_pad, eval_pad = PADDINGS[self.padding]
        return {
            "num_videos": self.num_videos, "batch_size": self.batch_size, "ridge": self.ridge,
            "conv_spec": self.conv_spec, "feature_dtype": self.feature_dtype,
            "padding": {"mode": self.padding, "fit": fit_pad, "evaluation": eval_pad},
            "block_keys": [f.block for f in self.fits], "mse": {f.block: f.mse for f in self.fits},
            "fit_mse": {f.block: f.fit_mse for f in self.fits}, "best_block": self.best.block,
            "ranking": [{"rank": i + 1, "block": f.block, "mse": f.mse} for i, f in enumerate(self.ranking)],
            **self.extra,
        }

    def table(self) -> str:
        fit_pad, eval_pad = PADDINGS[self.padding]
        lines = [f"layer search over {self.num_videos} videos: {self.conv_spec}, ridge {self.ridge:g}, padding "
                 f"{self.padding} (fit {fit_pad}, evaluation {eval_pad})",
                 f"{'rank':>4}  {'block':<16} {'MSE':>12} {'vs best':>9} {'fit MSE':>12}"]
        best = self.best.mse
        for rank, fit in enumerate(self.ranking, 1):
            rel = (fit.mse / best - 1) * 100 if best > 0 else 0.0
            lines.append(f"{rank:>4}  {fit.block:<16} {fit.mse:>12.6f} {rel:>+8.2f}% {fit.fit_mse:>12.6f}")
        lines.append(f"best: {self.best.block}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``layer_search.json`` (the table), ``stitching_init.safetensors`` (the winner's conv:
        ``weight``, ``bias``) and ``fits.safetensors`` (every fit, ``fit.<block>.weight/bias``)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"table": out / TABLE_FILE, "init": out / INIT_FILE, "fits": out / FITS_FILE}
        paths["table"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        meta = {"block": self.best.block, "conv_spec": self.conv_spec, "mse": repr(self.best.mse),
                "padding": self.padding, "ridge": repr(self.ridge)}
        save_file({k: v.contiguous() for k, v in self.best.state_dict().items()}, str(paths["init"]), metadata=meta)
        fits = {f"fit.{f.block}.{k}": v.contiguous() for f in self.fits for k, v in f.state_dict().items()}
        save_file(fits, str(paths["fits"]), metadata={"conv_spec": self.conv_spec, "padding": self.padding})
        return paths


@torch.no_grad()
def layer_search(features: LayerSearchFeatures, conv_spec: str | ConvSpec, *,
                 blocks: Iterable[str] | None = None, ridge: float = DEFAULT_RIDGE, padding: str = "official",
                 batch_size: int = DEFAULT_BATCH_SIZE, temporal_compression: int = TEMPORAL_COMPRESSION,
                 device: str | torch.device = "cpu") -> LayerSearchResult:
    """Fit the stitching conv for every candidate block, score each through ``StitchingLayer``,
    rank. One pass over the data fits all blocks (XᵀX is shared); one more pass per block scores."""
    names = resolve_blocks(blocks, features.blocks)
    spec = _check_search(features, conv_spec, names, ridge, padding, batch_size, temporal_compression)
    stats = _accumulate(features, spec, names, PADDINGS[padding][0], batch_size, temporal_compression,
                        torch.device(device))
    fits = []
    for name in names:
        W, bias, fit_mse = stats.solve(name, ridge)
        layer = StitchingLayer(spec, in_channels=features.latents.shape[1],
                               temporal_compression=temporal_compression).to(device)
        layer.load_state_dict({"weight": W.T.reshape(layer.weight.shape).float(), "bias": bias.float()})
        mse = evaluate_mse(layer, features, name, batch_size)
        fits.append(BlockFit(name, layer.weight.detach().cpu(), layer.bias.detach().cpu(), mse, fit_mse))
    return LayerSearchResult(fits, spec.text, ridge, padding, features.num_videos, batch_size,
                             str(features.latents.dtype).removeprefix("torch."))


def _accumulate(features: LayerSearchFeatures, spec: ConvSpec, names: tuple[str, ...], padding_mode: str,
                batch_size: int, temporal_compression: int, device: torch.device) -> RidgeStatistics:
    C, k = features.latents.shape[1], math.prod(spec.kernel_size)
    stats = RidgeStatistics(C * k, device)
    for latents, feats in features.batches(batch_size):
        up = upsample_latents(latents.to(device, torch.float64), temporal_compression)  # official: upcast first
        X = conv3d_patches(up, spec, padding_mode)
        stats.add_inputs(X)
        for name in names:  # [b, T, P, E] -> rows (video, frame, row, col), as X
            stats.add_targets(name, X, feats[name].to(device, torch.float64).reshape(X.shape[0], -1))
    return stats


@torch.no_grad()
def evaluate_mse(layer: StitchingLayer, features: LayerSearchFeatures, block: str,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Mean squared error of ``layer`` predicting ``block``'s features, per element. The stored
    latents are upsampled in their storage dtype and then cast to the conv's dtype, as the
    official evaluation does (for float32 storage this is exactly ``layer(latents)``)."""
    rows, cols = features.grid
    total, count = 0.0, 0
    for latents, feats in features.batches(batch_size):
        up = layer.upsample(latents.to(layer.weight.device))
        pred = nn.Conv3d.forward(layer, up.to(layer.weight.dtype))  # the layer's own conv (replicate)
        target = feats[block].to(pred.device).unflatten(2, (rows, cols)).permute(0, 4, 1, 2, 3)
        total += (pred - target).double().square().sum().item()
        count += pred.numel()
    return total / count


def _check_search(features: LayerSearchFeatures, conv_spec, names, ridge, padding, batch_size,
                  temporal_compression) -> ConvSpec:
    spec = parse_conv_spec(conv_spec) if isinstance(conv_spec, str) else conv_spec
    if spec.dim != 3:
        raise Vist3AInputError(f"layer search fits a Conv3d; got the conv{spec.dim}d spec {spec.text!r}")
    if padding not in PADDINGS:
        raise Vist3AInputError(f"padding must be one of {sorted(PADDINGS)}, got {padding!r}")
    if not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise Vist3AInputError(f"ridge must be a finite number >= 0, got {ridge!r}")
    _check_batch_size(batch_size)
    for name, value in (("latents", features.latents), *((n, features.blocks[n]) for n in names)):
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise Vist3AInputError(f"{name} must be finite floating-point values ({value.dtype})")
    T_lat, h, w = features.latents.shape[2:]
    frames = temporal_compression * (T_lat - 1) + 1
    out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                zip((frames, h, w), spec.kernel_size, spec.stride, spec.padding, spec.dilation))
    for name in names:
        feats = features.blocks[name]
        expected = (feats.shape[1], *features.grid)
        if out != expected:
            raise Vist3AInputError(
                f"{spec.text!r} maps latents of {T_lat} frames (upsampled to {frames}) at {h}x{w} to a "
                f"{out[0]}x{out[1]}x{out[2]} (frames x rows x cols) grid, but the features of {name} are "
                f"{expected[0]}x{expected[1]}x{expected[2]}")
        if feats.shape[3] != spec.out_channels:
            raise Vist3AInputError(f"{spec.text!r} has {spec.out_channels} output channels but the features of "
                                   f"{name} have width {feats.shape[3]}")
    return spec


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise Vist3AInputError(f"batch_size must be a positive integer, got {batch_size!r}")


def default_conv_spec(width: int) -> str:
    """The official stitching conv's kernel, stride and padding with ``width`` output channels."""
    return f"conv3d_k5x3x3_o{width}_s1x2x2_p2x1x1"
