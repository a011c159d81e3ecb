"""Preview trajectory, preview rendering and video files, and GenerationResult.save."""

import json
import math
import os

import numpy as np
import pytest
import torch

from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.pipeline import preview as preview_module
from vist3a_rt.pipeline.preview import (
    VideoWriterUnavailable, available_video_formats, matrix_to_quaternion, orbit_cameras,
    render_preview, write_video,
)
from vist3a_rt.pipeline.result import GenerationResult
from vist3a_rt.rendering import SH_C0
from vist3a_rt.scene import Camera, Cameras, GaussianScene

FILES = {"scene.ply", "cameras.json", "preview.mp4", "meta.json"}


# ---------------------------------------------------------------------------- helpers


def orbit_input(count=5, size=64, radius=3.0, sweep=1.5, focal_jitter=0.0):
    """``count`` cameras on an arc around the origin, looking at it (as VIST3A's predictions do)."""
    views = [Camera.look_at((radius * math.sin(a), -0.5, -radius * math.cos(a)), (0, 0, 0),
                            width=size, height=size) for a in np.linspace(0, sweep, count)]
    K = torch.stack([v.K for v in views])
    K[:, 0, 0] *= 1 + focal_jitter * torch.arange(count)
    return Cameras(torch.stack([v.camtoworld for v in views]), K, size, size)


def coloured_scene(n=300, seed=0, invisible=0):
    """``n`` reddish Gaussians in a ball of radius 0.5 (plus ``invisible`` ones of opacity 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    total = n + invisible
    rgb = torch.tensor([0.9, 0.1, 0.1]) + 0.1 * torch.rand(total, 3, generator=g)
    sh = torch.zeros(total, 4, 3)
    sh[:, 0] = (rgb - 0.5) / SH_C0
    sh[:, 1:] = 0.05 * torch.randn(total, 3, 3, generator=g)
    opacities = torch.cat([0.5 + 0.5 * torch.rand(n, generator=g), torch.full((invisible,), 1e-3)])
    return GaussianScene.from_unnormalized(
        0.3 * torch.randn(total, 3, generator=g), torch.full((total, 3), 0.06),
        torch.randn(total, 4, generator=g), sh, opacities)


def make_result(**kwargs):
    fields = dict(prompt="a red ball", scene=coloured_scene(), cameras=orbit_input(count=3),
                  timings={"text": 0.1, "denoise": 1.5, "total": 1.6},
                  settings={"num_steps": 2, "guidance_scale": 7.5, "dtype": torch.float32, "seed": 7},
                  seed=7)
    return GenerationResult(**{**fields, **kwargs})


def save_small(result, out_dir, **kwargs):
    return result.save(out_dir, preview_frames=kwargs.pop("preview_frames", 4),
                       preview_size=kwargs.pop("preview_size", 24), **kwargs)


def distinct_frames(count=6, height=20, width=28):
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):  # a moving bar: every frame differs (GIF merges identical frames)
        frames[i, :, 4 * i: 4 * i + 4] = (255, 128, 0)
    return frames


@pytest.fixture
def mp4_writer():
    pytest.importorskip("imageio")
    if "mp4" not in available_video_formats():
        pytest.skip("imageio-ffmpeg is not installed")


@pytest.fixture
def any_writer():
    if not available_video_formats():
        pytest.skip("no video writer (imageio-ffmpeg or Pillow) installed")


# ---------------------------------------------------------------------------- trajectory


def test_orbit_endpoints_are_the_input_cameras_and_rotations_stay_orthonormal():
    cameras = orbit_input(count=5, size=448, focal_jitter=0.05)
    path = orbit_cameras(cameras, 17, 64)  # 4 path steps per input step: views 0, 4, 8, ... are inputs
    assert len(path) == 17 and (path.width, path.height) == (64, 64)
    scale = torch.tensor([64 / 448, 64 / 448, 1.0])[:, None]
    for frame, source in ((0, 0), (4, 1), (8, 2), (16, 4)):
        torch.testing.assert_close(path.camtoworld[frame], cameras.camtoworld[source], atol=1e-5, rtol=0)
        torch.testing.assert_close(path.K[frame], cameras.K[source] * scale, atol=1e-4, rtol=1e-6)
    R = path.camtoworld[:, :3, :3].double()
    identity = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(1, 2), identity, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(17, dtype=R.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(path.camtoworld[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(17, 4))


def test_orbit_slerps_rotations_and_lerps_centres():
    quarter = torch.tensor([[0.0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]])  # 90 deg about y
    quarter[:3, 3] = torch.tensor([2.0, 0, 0])
    cameras = Cameras(torch.stack([torch.eye(4), quarter]), orbit_input().K[:2], 64, 64)
    middle = orbit_cameras(cameras, 3, 64).camtoworld[1]
    angle = math.degrees(math.acos((torch.trace(middle[:3, :3]).item() - 1) / 2))
    assert angle == pytest.approx(45.0, abs=1e-4)
    torch.testing.assert_close(middle[:3, 3], torch.tensor([1.0, 0, 0]))


def test_orbit_keeps_the_aspect_ratio_with_even_sizes():
    wide = Cameras(orbit_input().camtoworld, orbit_input().K, 640, 360)
    path = orbit_cameras(wide, 4, 65)
    assert (path.width, path.height) == (66, 36)  # 65 x 36.6 rounded to even numbers
    torch.testing.assert_close(path.K[0, 0, 2], wide.K[0, 0, 2] * 66 / 640)
    torch.testing.assert_close(path.K[0, 1, 2], wide.K[0, 1, 2] * 36 / 360)
    assert orbit_cameras(wide, 1, 256).width == 256 and orbit_cameras(wide, 1, 256).height == 144


def test_single_camera_swings_around_the_target():
    one = orbit_input(count=1)
    target = torch.tensor([0.1, 0.0, 0.2])
    path = orbit_cameras(one, 12, 64, target=target)
    torch.testing.assert_close(path.camtoworld[0], one.camtoworld[0], atol=1e-6, rtol=0)
    centres = path.camtoworld[:, :3, 3]
    assert len(torch.unique(centres.round(decimals=4), dim=0)) > 6  # it moves
    distances = (centres - target).norm(dim=1)
    torch.testing.assert_close(distances, distances[:1].expand(12))
    pixels = [_project(path[i], target) for i in range(12)]  # the pivot stays put in the image
    torch.testing.assert_close(torch.stack(pixels), pixels[0].expand(12, 2), atol=1e-3, rtol=0)


def test_static_sequence_is_treated_like_a_single_camera():
    still = orbit_input(count=1)
    repeated = Cameras(still.camtoworld.repeat(4, 1, 1), still.K.repeat(4, 1, 1), 64, 64)
    torch.testing.assert_close(orbit_cameras(repeated, 8, 32).camtoworld,
                               orbit_cameras(still, 8, 32).camtoworld)


def _project(camera, point):  # -> [2] pixel
    p = torch.linalg.inv(camera.camtoworld) @ torch.cat([point, torch.ones(1)])
    uv = camera.K @ p[:3]
    return uv[:2] / uv[2]


def test_quaternion_round_trip_covers_every_branch():
    from vist3a_rt.rendering import quat_to_rotmat

    q = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0.1, 0.7, -0.5, 0.3]],
                     dtype=torch.float64)
    q = torch.nn.functional.normalize(q, dim=-1)
    back = matrix_to_quaternion(quat_to_rotmat(q))
    same = (back * q).sum(-1).abs()  # q and -q are one rotation
    torch.testing.assert_close(same, torch.ones(5, dtype=q.dtype))
    assert (back[:, 0] >= 0).all()


@pytest.mark.parametrize("kwargs", [dict(num_frames=0, size=64), dict(num_frames=4, size=1),
                                    dict(num_frames=2.0, size=64)])
def test_orbit_rejects_bad_arguments(kwargs):
    with pytest.raises(Vist3AInputError):
        orbit_cameras(orbit_input(), **kwargs)


# ---------------------------------------------------------------------------- rendering


def test_render_preview_draws_the_object():
    frames = render_preview(coloured_scene(), orbit_input(), num_frames=5, size=32)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    centre = frames[:, 12:20, 12:20].astype(int)
    assert (centre[..., 0] - centre[..., 1] > 100).all()  # red object, not the white background
    assert (frames[:, 0, 0] == 255).all()  # the corners stay background
    assert not np.array_equal(frames[0], frames[-1])  # the view moves


def test_render_preview_pruning_changes_no_pixel():
    cameras = orbit_input()
    plain = render_preview(coloured_scene(n=200), cameras, num_frames=3, size=24)
    padded = coloured_scene(n=200, invisible=100)  # same 200 visible ones, then 100 faint ones
    visible = padded.select(torch.arange(200))
    assert len(padded.prune()) == 200
    np.testing.assert_array_equal(render_preview(padded, cameras, num_frames=3, size=24),
                                  render_preview(visible, cameras, num_frames=3, size=24))
    assert plain.shape == (3, 24, 24, 3)


def test_render_preview_of_an_empty_scene_is_background():
    empty = coloured_scene().select(torch.zeros(0, dtype=torch.long))
    frames = render_preview(empty, orbit_input(count=1), num_frames=2, size=8, background=(0, 0, 0))
    assert (frames == 0).all()


# ---------------------------------------------------------------------------- video files


def test_mp4_is_written_and_reads_back(tmp_path, mp4_writer):
    import imageio.v2 as imageio

    frames = distinct_frames(height=21, width=27)  # odd sizes are padded to even for yuv420p
    path = write_video(frames, tmp_path / "clip", fps=12)
    assert path == tmp_path / "clip.mp4"
    back = imageio.mimread(path, format="FFMPEG")
    assert len(back) == len(frames) and back[0].shape == (22, 28, 3)
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_gif_fallback_when_ffmpeg_is_missing(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    monkeypatch.setattr(preview_module, "_ffmpeg_exe", lambda: None)
    frames = distinct_frames()
    path = write_video(frames, tmp_path / "clip")
    assert path == tmp_path / "clip.gif"
    assert _gif_frame_count(path) == len(frames)
    with pytest.raises(VideoWriterUnavailable):
        write_video(frames, tmp_path / "forced", video_format="mp4")
    assert os.listdir(tmp_path) == ["clip.gif"]


def test_gif_fallback_when_ffmpeg_fails(tmp_path, monkeypatch, mp4_writer):
    import imageio_ffmpeg

    def broken(*args, **kwargs):
        raise RuntimeError("ffmpeg exploded")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", broken)
    with pytest.warns(RuntimeWarning, match="ffmpeg exploded"):
        path = write_video(distinct_frames(), tmp_path / "clip")
    assert path.suffix == ".gif" and os.listdir(tmp_path) == ["clip.gif"]
    with pytest.raises(RuntimeError, match="exploded"):
        write_video(distinct_frames(), tmp_path / "strict", video_format="mp4")


def test_explicit_gif(tmp_path):
    pytest.importorskip("PIL")
    path = write_video(distinct_frames(count=3), tmp_path / "clip", video_format="gif")
    assert _gif_frame_count(path) == 3


def _gif_frame_count(path):
    try:
        import imageio.v3 as imageio
    except ImportError:
        from PIL import Image

        with Image.open(path) as image:
            return image.n_frames
    return len(imageio.imread(path, index=None))


@pytest.mark.parametrize("frames", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8), np.uint8),
                                    np.zeros((0, 8, 8, 3), np.uint8)])
def test_write_video_rejects_bad_frames(tmp_path, frames):
    with pytest.raises(Vist3AInputError):
        write_video(frames, tmp_path / "clip")


def test_write_video_into_missing_folder(tmp_path):
    with pytest.raises(Vist3AInputError, match="does not exist"):
        write_video(distinct_frames(), tmp_path / "missing" / "clip")


# ---------------------------------------------------------------------------- GenerationResult.save


def test_save_writes_the_four_files(tmp_path, mp4_writer):
    plyfile = pytest.importorskip("plyfile")
    result = make_result()
    out = save_small(result, tmp_path / "out")
    assert out == tmp_path / "out" and set(os.listdir(out)) == FILES
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left beside it
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompt"] == "a red ball" and meta["seed"] == 7
    assert meta["settings"]["dtype"] == "float32" and meta["settings"]["num_steps"] == 2
    assert meta["timings"]["denoise"] == 1.5 and meta["timings"]["preview_render"] > 0
    assert set(meta["files"]) == FILES
    assert meta["scene"]["num_gaussians"] == 300 and meta["scene"]["sh_degree"] == 1
    assert meta["versions"]["torch"] == torch.__version__
    loaded = GaussianScene.load_ply(out / "scene.ply")
    torch.testing.assert_close(loaded.means, result.scene.means, atol=0, rtol=0)
    assert plyfile.PlyData.read(str(out / "scene.ply"))["vertex"].count == 300
    torch.testing.assert_close(Cameras.load_json(out / "cameras.json").camtoworld, result.cameras.camtoworld)
    assert "preview_render" not in result.timings  # the result itself is not changed


def test_saved_ply_is_byte_identical_across_saves(tmp_path):
    result = make_result()
    result.save(tmp_path / "a", preview=False)
    make_result().save(tmp_path / "b", preview=False)
    assert (tmp_path / "a" / "scene.ply").read_bytes() == (tmp_path / "b" / "scene.ply").read_bytes()


def test_save_without_preview(tmp_path):
    out = make_result().save(tmp_path / "out", preview=False)
    assert set(os.listdir(out)) == {"scene.ply", "cameras.json", "meta.json"}
    assert json.loads((out / "meta.json").read_text())["preview"] is None


def test_save_skips_the_preview_without_a_video_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(preview_module, "available_video_formats", lambda: [])
    with pytest.warns(RuntimeWarning, match="preview skipped"):
        out = save_small(make_result(), tmp_path / "out")
    assert set(os.listdir(out)) == {"scene.ply", "cameras.json", "meta.json"}
    assert "skipped" in json.loads((out / "meta.json").read_text())["preview"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch, error):
    def failing_writer(*args, **kwargs):
        raise error

    monkeypatch.setattr(Cameras, "save_json", failing_writer)  # after scene.ply is written
    with pytest.raises(type(error)):
        make_result().save(tmp_path / "out", preview=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_in_the_preview_leaves_nothing(tmp_path, monkeypatch, any_writer, error):
    def failing_writer(*args, **kwargs):
        raise error

    monkeypatch.setattr(preview_module, "write_video", failing_writer)
    with pytest.raises(type(error)):
        save_small(make_result(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failure_while_overwriting_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")

    def failing_save_ply(self, path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GaussianScene, "save_ply", failing_save_ply)
    with pytest.raises(KeyboardInterrupt):
        make_result().save(out, preview=False, overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]


def test_existing_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Vist3AInputError, match="not empty"):
        make_result().save(out, preview=False)
    assert os.listdir(out) == ["old.txt"]
    make_result().save(out, preview=False, overwrite=True)
    assert set(os.listdir(out)) == {"scene.ply", "cameras.json", "meta.json"}
    assert os.listdir(tmp_path) == ["out"]  # the old folder was deleted, not left aside


def test_existing_empty_folder_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    make_result().save(tmp_path / "out", preview=False)
    assert (tmp_path / "out" / "scene.ply").is_file()


def test_missing_parents_are_created(tmp_path):
    out = make_result().save(tmp_path / "runs" / "today" / "out", preview=False)
    assert (out / "meta.json").is_file()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(Vist3AInputError, match="not a folder"):
        make_result().save(tmp_path / "out", preview=False, overwrite=True)


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Vist3AInputError, match=str(tmp_path / "file")):
        make_result().save(tmp_path / "file" / "out", preview=False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_parent(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(Vist3AInputError, match=str(parent)):
            make_result().save(parent / "out", preview=False)
    finally:
        parent.chmod(0o700)
    assert os.listdir(parent) == []


@pytest.mark.parametrize("kwargs", [dict(preview_frames=0), dict(preview_size=1)])
def test_save_rejects_bad_preview_settings(tmp_path, kwargs):
    with pytest.raises(Vist3AInputError):
        make_result().save(tmp_path / "out", **kwargs)
    assert os.listdir(tmp_path) == []


def test_repr_is_short():
    text = repr(make_result(latents=torch.zeros(1, 16, 2, 8, 8)))
    assert "a red ball" in text and "300" in text and len(text) < 300
