"""Preview videos of a generated scene: an orbit trajectory, its renders, and the video file.

``orbit_cameras`` turns the decoder's predicted cameras into a smooth ``num_frames`` path: VIST3A
prompts ask for an orbiting camera, so the predicted cameras already circle the scene; the path
visits them in order, slerping rotations and lerping centres and intrinsics between neighbours,
so its first and last views are the first and last predicted cameras. A single camera (or a
sequence that does not move) gets a synthetic swing instead: the camera rotates about a pivot
(the median of the Gaussian means in ``render_preview``) by +-``SINGLE_VIEW_SWING_DEG`` around its
own vertical axis, sinusoidally, so the loop starts at the input view and closes seamlessly.

``render_preview`` renders that path (reference rasterizer or a faster backend) after dropping
Gaussians that can never be drawn; ``write_video`` writes H.264 mp4 through imageio-ffmpeg, or an
animated GIF through Pillow when ffmpeg is missing or fails. Both writers are optional
dependencies (``pip install imageio imageio-ffmpeg``) and are imported on first use.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import Vist3AInputError
from ..rendering import render, resolve_backend
from ..rendering.reference import quat_to_rotmat
from ..scene import Cameras, GaussianScene

SINGLE_VIEW_SWING_DEG = 15.0  # half-amplitude of the synthetic swing around a lone camera
VIDEO_FORMATS = ("auto", "mp4", "gif")
_MP4_OPTIONS = ["-preset", "medium", "-crf", "18", "-movflags", "+faststart", "-f", "mp4"]


class VideoWriterUnavailable(RuntimeError):
    """Neither imageio-ffmpeg (mp4) nor Pillow (GIF) can be used in this installation."""


# --- trajectory ----------------------------------------------------------------------------------

def preview_image_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the longer side ``size`` and the aspect kept, both rounded to even
    numbers, halves up (H.264 in yuv420p needs even dimensions)."""
    scale = size / max(width, height)

    def even(side: int) -> int:
        return max(2, 2 * math.floor(side * scale / 2 + 0.5))

    return even(width), even(height)


def orbit_cameras(cameras: Cameras, num_frames: int, size: int, *,
                  target: torch.Tensor | None = None,  # [3] pivot for the single-camera swing
                  ) -> Cameras:
    """A ``num_frames``-view path through ``cameras`` (see the module docstring), with intrinsics
    rescaled to the preview size (``preview_image_size``: longer side ``size``, aspect kept).

    ``target`` is used only when the input does not move (one camera, or all equal); without it
    the swing pivots about the point at depth 1 on the first camera's optical axis.
    """
    if not isinstance(cameras, Cameras) or len(cameras) == 0:
        what = f"{len(cameras)} cameras" if isinstance(cameras, Cameras) else type(cameras).__name__
        raise Vist3AInputError(f"orbit_cameras needs a non-empty Cameras, got {what}")
    _check_positive_int("num_frames", num_frames, 1)
    _check_positive_int("size", size, 2)
    c2w = cameras.camtoworld.detach().to("cpu", torch.float64)  # [T, 4, 4]
    K = cameras.K.detach().to("cpu", torch.float64)  # [T, 3, 3]
    rotations, centres = _orthonormalize(c2w[:, :3, :3]), c2w[:, :3, 3]
    if _is_static(rotations, centres):
        pivot = _swing_pivot(rotations[0], centres[0], target)
        path_r, path_t = _swing(rotations[0], centres[0], pivot, num_frames)
        path_k = K[:1].expand(num_frames, 3, 3)
    else:
        path_r, path_t, path_k = _interpolate(rotations, centres, K, num_frames)
    width, height = preview_image_size(cameras.width, cameras.height, size)
    scale = torch.tensor([width / cameras.width, height / cameras.height, 1.0], dtype=torch.float64)
    out = torch.eye(4, dtype=torch.float64).repeat(num_frames, 1, 1)
    out[:, :3, :3], out[:, :3, 3] = path_r, path_t
    return Cameras(out.float(), (path_k * scale[:, None]).float(), width, height)


def _check_positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Vist3AInputError(f"{name} must be an int >= {minimum}, got {value!r}")


def _orthonormalize(R: torch.Tensor) -> torch.Tensor:  # [T, 3, 3] -> nearest rotations [T, 3, 3]
    U, _, Vh = torch.linalg.svd(R)
    flip = torch.ones_like(R[:, 0])  # [T, 3]
    flip[:, 2] = torch.sign(torch.linalg.det(U @ Vh))
    return U @ torch.diag_embed(flip) @ Vh


def _is_static(rotations: torch.Tensor, centres: torch.Tensor, atol: float = 1e-6) -> bool:
    return bool(torch.allclose(rotations, rotations[:1].expand_as(rotations), atol=atol)
                and torch.allclose(centres, centres[:1].expand_as(centres), atol=atol))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:  # [T, 3, 3] rotations -> [T, 4] w first, w >= 0
    """Shepperd's method: build 4 q_i q from the largest of 4 q_i^2 (the stable branch)."""
    m = R
    xx, yy, zz = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    diag = torch.stack([1 + xx + yy + zz, 1 + xx - yy - zz, 1 - xx + yy - zz, 1 - xx - yy + zz], -1)  # 4q_i^2
    a, b, c = m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]  # 4w(x, y, z)
    d, e, f = m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1]  # 4(xy, xz, yz)
    rows = torch.stack([torch.stack([diag[:, 0], a, b, c], -1), torch.stack([a, diag[:, 1], d, e], -1),
                        torch.stack([b, d, diag[:, 2], f], -1), torch.stack([c, e, f, diag[:, 3]], -1)], 1)
    q = rows[torch.arange(len(R)), diag.argmax(-1)]  # [T, 4]
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[:, :1] < 0, -q, q)


def slerp(q0: torch.Tensor,  # [M, 4] unit quaternions
          q1: torch.Tensor,  # [M, 4]
          u: torch.Tensor,  # [M] in [0, 1]
          ) -> torch.Tensor:  # [M, 4]
    """Shortest-arc spherical interpolation of unit quaternions (normalised lerp when nearly equal)."""
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    theta = torch.acos(dot.abs().clamp(max=1.0))
    sin = torch.sin(theta)
    u = u[:, None]
    near = sin < 1e-6
    w0 = torch.where(near, 1 - u, torch.sin((1 - u) * theta) / sin.clamp(min=1e-12))
    w1 = torch.where(near, u, torch.sin(u * theta) / sin.clamp(min=1e-12))
    return torch.nn.functional.normalize(w0 * q0 + w1 * q1, dim=-1)


def _interpolate(rotations, centres, K, num_frames):  # [T,3,3], [T,3], [T,3,3] -> path R, t, K
    count = len(rotations)
    s = torch.linspace(0, count - 1, num_frames, dtype=torch.float64)
    i = s.floor().long().clamp(max=count - 2)
    u = s - i  # in [0, 1]; exactly 0 at the first view and 1 at the last
    q = matrix_to_quaternion(rotations)
    path_r = quat_to_rotmat(slerp(q[i], q[i + 1], u))
    lerp = lambda a: a[i] + u.reshape(-1, *[1] * (a.dim() - 1)) * (a[i + 1] - a[i])  # noqa: E731
    return path_r, lerp(centres), lerp(K)


def _swing_pivot(rotation, centre, target) -> torch.Tensor:  # -> [3]
    if target is None:
        return centre + rotation[:, 2]  # one unit along the optical axis (+z, OpenCV)
    target = torch.as_tensor(target).detach().to("cpu", torch.float64).reshape(-1)
    if target.shape != (3,) or not torch.isfinite(target).all():
        raise Vist3AInputError(f"target must be 3 finite numbers, got {target.tolist()}")
    return target


def _swing(rotation, centre, pivot, num_frames):  # [3,3], [3], [3] -> R [F,3,3], t [F,3]
    """Rotate the camera about the vertical line through ``pivot`` (the camera's image-down axis)."""
    k = torch.arange(num_frames, dtype=torch.float64)
    angles = math.radians(SINGLE_VIEW_SWING_DEG) * torch.sin(2 * math.pi * k / num_frames)
    half = angles / 2
    axis = rotation[:, 1]  # image-down (OpenCV y) in world coordinates: yaw as seen in the image
    spin = quat_to_rotmat(torch.cat([half.cos()[:, None], half.sin()[:, None] * axis], dim=-1))
    return spin @ rotation, pivot + (spin @ (centre - pivot)[:, None])[..., 0]


# --- rendering -----------------------------------------------------------------------------------

def render_preview(scene: GaussianScene, cameras: Cameras, *, num_frames: int = 48, size: int = 256,
                   background=(1.0, 1.0, 1.0), backend: str = "auto",
                   progress: bool = False) -> np.ndarray:  # -> [num_frames, H, W, 3] uint8
    """Render the ``orbit_cameras`` path of ``scene`` (drawable Gaussians only) as uint8 RGB frames."""
    if not isinstance(scene, GaussianScene):
        raise Vist3AInputError(f"render_preview needs a GaussianScene, got {type(scene).__name__}")
    resolve_backend(backend)
    visible = scene.prune()  # opacity < 1/255 can never be drawn: dropping it changes no pixel
    pivot = visible.means.detach().median(dim=0).values if len(visible) else None
    path = orbit_cameras(cameras, num_frames, size, target=pivot)
    frames = np.empty((num_frames, path.height, path.width, 3), np.uint8)
    views = range(num_frames)
    if progress:
        from tqdm.auto import tqdm

        views = tqdm(views, desc="preview", unit="frame", leave=False)
    with torch.inference_mode():
        for index in views:
            color = render(visible, path[index], backend=backend, background=background).color
            frames[index] = (color * 255).round().clamp(0, 255).to("cpu", torch.uint8).numpy()
    return frames


# --- video files ---------------------------------------------------------------------------------

def available_video_formats() -> list[str]:
    """The formats ``write_video`` can produce here, best first (``[]``: no writer installed)."""
    formats = ["mp4"] if _ffmpeg_exe() is not None else []
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return formats
    return formats + ["gif"]


def write_video(frames: np.ndarray,  # [N, H, W, 3] uint8
                path_without_suffix: str | Path, fps: float = 24, *,
                video_format: str = "auto") -> Path:
    """Write ``frames`` to ``<path_without_suffix>.mp4`` (H.264, yuv420p) or ``.gif``; return the path.

    ``video_format="auto"`` tries mp4 and falls back to GIF (with a warning if ffmpeg is present
    but fails); ``"mp4"`` / ``"gif"`` insist. Odd image sizes are padded by repeating the last
    row/column for mp4. The file appears atomically (temp file in the same folder + os.replace).
    """
    _check_frames(frames)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
        raise Vist3AInputError(f"fps must be a number in (0, 1000], got {fps!r}")
    if video_format not in VIDEO_FORMATS:
        raise Vist3AInputError(f"video_format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    base = Path(path_without_suffix)
    if not base.parent.is_dir():
        raise Vist3AInputError(f"cannot write {base}.*: directory {base.parent} does not exist")
    if video_format in ("auto", "mp4"):
        path = base.with_name(base.name + ".mp4")
        try:
            return _write_atomic(path, lambda tmp: _encode_mp4(frames, tmp, fps))
        except VideoWriterUnavailable:
            if video_format == "mp4":
                raise
        except (OSError, RuntimeError) as err:  # ffmpeg ran but failed (codec missing, bad build)
            if video_format == "mp4":
                raise
            warnings.warn(f"mp4 encoding failed ({err}); writing a GIF instead", RuntimeWarning, stacklevel=2)
    return _write_atomic(base.with_name(base.name + ".gif"), lambda tmp: _encode_gif(frames, tmp, fps))


def _check_frames(frames) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise Vist3AInputError(f"frames must be a uint8 numpy array [N, H, W, 3], got "
                               f"{type(frames).__name__} {getattr(frames, 'dtype', '')}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) < 1:
        raise Vist3AInputError(f"frames must have shape [N, H, W, 3] with N, H, W >= 1, "
                               f"got {list(frames.shape)}")


def _write_atomic(path: Path, encode) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        encode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _ffmpeg_exe() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return None


def _encode_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    if _ffmpeg_exe() is None:
        raise VideoWriterUnavailable("mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg)")
    import imageio_ffmpeg

    n, h, w, _ = frames.shape
    even = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(str(path), (w + w % 2, h + h % 2), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", quality=None, macro_block_size=2,
                                         ffmpeg_log_level="error", output_params=list(_MP4_OPTIONS))
    writer.send(None)  # start ffmpeg
    try:
        for frame in even:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()  # waits for ffmpeg; raises if it failed


def _encode_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise VideoWriterUnavailable("no video writer: install imageio-ffmpeg (mp4) or Pillow (GIF)"
                                     ) from None
    images = [Image.fromarray(frame) for frame in frames]
    # GIF delays are in 1/100 s; Pillow takes milliseconds and rounds down to that grid.
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0)
