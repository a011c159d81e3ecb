"""The C++ CPU rasterizer against the torch reference: random and adversarial scenes, threads,
render() dispatch, and the lazy-load error path."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.kernels import cpu_raster
from vist3a_rt.rendering import RasterConfig, available_backends, rasterize_gaussians, render
from vist3a_rt.scene.cameras import Camera, Cameras

F32, F64 = torch.float32, torch.float64
TOLERANCE = 1e-4  # max |cpu - reference| on colour, depth and alpha; radii must be identical


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Every test here needs the compiled module; CI builds it (`pip install -e .`), so there a
    missing module is a failure, elsewhere a skip that says how to build it."""
    try:
        return cpu_raster.load_extension()
    except cpu_raster.CpuRasterizerUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


# ---------------------------------------------------------------------------- helpers


def axis_view(width, height, focal=None, principal=None):
    """(viewmat, K) of a camera at the origin looking down +z."""
    focal = focal or 0.9 * max(width, height)
    cx, cy = principal or (width / 2, height / 2)
    K = torch.tensor([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], dtype=F64)
    return torch.eye(4, dtype=F64), K


def orbit_view(width, height, eye=(1.5, -0.8, -1.0), target=(0.0, 0.0, 4.0)):
    camera = Camera.look_at(eye, target, width=width, height=height)
    return torch.linalg.inv(camera.camtoworld.to(F64)), camera.K.to(F64)


def make_scene(n, seed, degree=1, depth=(2.0, 6.0), spread=0.9, log_scale=(-4.0, -1.5),
               opacity=(0.05, 1.0)):
    """n random Gaussians, float32 values (both rasterizers then see exactly the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    z = depth[0] + (depth[1] - depth[0]) * torch.rand(n, generator=g, dtype=F64)
    xy = (torch.rand(n, 2, generator=g, dtype=F64) - 0.5) * (z * spread)[:, None]
    lo, hi = log_scale
    return SimpleNamespace(
        means=torch.cat([xy, z[:, None]], dim=1).to(F32),
        rotations=torch.randn(n, 4, generator=g, dtype=F64).to(F32),
        scales=torch.exp(lo + (hi - lo) * torch.rand(n, 3, generator=g, dtype=F64)).to(F32),
        sh=(0.5 * torch.randn(n, (degree + 1) ** 2, 3, generator=g, dtype=F64)).to(F32),
        opacities=(opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g, dtype=F64)).to(F32))


def concat(*scenes):
    fields = ("means", "rotations", "scales", "sh", "opacities")
    return SimpleNamespace(**{f: torch.cat([getattr(s, f) for s in scenes]) for f in fields})


def scene_args(scene):
    return scene.means, scene.rotations, scene.scales, scene.opacities, scene.sh


def run_reference(scene, viewmat, K, width, height, background=None, config=RasterConfig()):
    """The oracle in float64 on the float32 scene values."""
    args = [t.to(F64) for t in scene_args(scene)]
    bg = None if background is None else torch.as_tensor(background, dtype=F64)
    with torch.no_grad():
        return rasterize_gaussians(*args, viewmat.to(F64), K.to(F64), width, height, bg, config)


def run_cpu(scene, viewmat, K, width, height, background=None, config=RasterConfig(), threads=None):
    bg = None if background is None else torch.as_tensor(background, dtype=F32)
    return cpu_raster.rasterize(
        *scene_args(scene), viewmat, K, width, height, bg, near_plane=config.near_plane,
        far_plane=config.far_plane, eps2d=config.eps2d, radius_clip=config.radius_clip,
        tile_size=config.tile_size, clamp_color=config.clamp_color, num_threads=threads)


def assert_matches_reference(scene, viewmat, K, width, height, background=None,
                             config=RasterConfig()):
    ref = run_reference(scene, viewmat, K, width, height, background, config)
    out = run_cpu(scene, viewmat, K, width, height, background, config)
    assert out.color.shape == (height, width, 3) and out.depth.shape == (height, width, 1)
    assert out.alpha.shape == (height, width, 1) and out.radii.dtype == torch.int32
    mismatched = torch.nonzero(out.radii != ref.radii).flatten().tolist()
    assert not mismatched, f"radii differ at {mismatched[:10]}: cpu {out.radii[mismatched[:10]].tolist()}, " \
                           f"reference {ref.radii[mismatched[:10]].tolist()}"
    for name in ("color", "depth", "alpha"):
        diff = (getattr(out, name).to(F64) - getattr(ref, name)).abs()
        worst = diff.max().item() if diff.numel() else 0.0
        assert worst <= TOLERANCE, f"{name}: max |cpu - reference| = {worst:.3g} at {divmod(int(diff.argmax()), width * diff.shape[-1])}"
    return out, ref


# ---------------------------------------------------------------------------- random scenes


@pytest.mark.parametrize("degree", range(5))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_scenes_match_reference(degree, seed):
    scene = make_scene(600, seed=seed, degree=degree)
    out, ref = assert_matches_reference(scene, *axis_view(64, 48), 64, 48)
    assert ref.alpha.mean() > 0.3 and (ref.radii > 0).sum() > 500  # the scene is really drawn


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_scene_from_an_oblique_camera(seed):
    scene = make_scene(3000, seed=seed, degree=3, log_scale=(-4.5, -2.5))
    assert_matches_reference(scene, *orbit_view(80, 60), 80, 60, background=[0.2, 0.4, 0.9])


@pytest.mark.parametrize("width, height", [(1, 1), (37, 21), (21, 37), (16, 16), (17, 33)])
def test_image_sizes(width, height):
    scene = make_scene(200, seed=3, degree=2)
    assert_matches_reference(scene, *axis_view(width, height), width, height, background=[1.0, 1.0, 1.0])


def test_off_centre_principal_point():
    scene = make_scene(400, seed=4, degree=1)
    assert_matches_reference(scene, *axis_view(50, 30, focal=40.0, principal=(12.0, 25.0)), 50, 30)


@pytest.mark.parametrize("config", [
    RasterConfig(tile_size=5),
    RasterConfig(tile_size=64),
    RasterConfig(eps2d=0.05, radius_clip=2.5),
    RasterConfig(near_plane=3.0, far_plane=5.0),
    RasterConfig(clamp_color=False),
], ids=["tile5", "tile64", "eps-clip", "near-far", "unclamped"])
def test_config_variants(config):
    scene = make_scene(500, seed=5, degree=1)
    scene.sh[:, 0] *= 6  # colours well outside [0, 1] before the clamp
    assert_matches_reference(scene, *axis_view(40, 32), 40, 32, background=[0.5, 0.0, 1.0], config=config)


# ---------------------------------------------------------------------------- adversarial scenes


def test_empty_scene_gives_the_background():
    scene = make_scene(0, seed=0)
    out, _ = assert_matches_reference(scene, *axis_view(19, 7), 19, 7, background=[0.1, 0.2, 0.3])
    assert out.radii.shape == (0,) and torch.equal(out.alpha, torch.zeros(7, 19, 1))
    assert torch.allclose(out.color, torch.tensor([0.1, 0.2, 0.3]).expand(7, 19, 3))


def test_huge_and_tiny_scales():
    huge = make_scene(20, seed=6, log_scale=(0.0, 7.0))  # 1-1000 world units: cover the image
    tiny = make_scene(300, seed=7, log_scale=(-14.0, -10.0))  # footprint = the eps2d blur alone
    out, ref = assert_matches_reference(concat(huge, tiny, make_scene(300, seed=8)), *axis_view(48, 40), 48, 40)
    assert ref.radii[:20].min() > 40 and ref.radii[:20].max() > 1e4 and set(ref.radii[20:320].unique().tolist()) <= {0, 2}


def test_gaussians_behind_near_and_beyond_far_are_dropped():
    behind = make_scene(100, seed=9, depth=(-4.0, -0.1), log_scale=(-1.0, 0.0))
    grazing = make_scene(100, seed=10, depth=(1e-4, 5e-2), spread=40.0)  # x/z far outside: J clamps
    on_plane = make_scene(10, seed=11, depth=(0.0, 0.0))
    scene = concat(behind, grazing, on_plane, make_scene(300, seed=12))
    out, ref = assert_matches_reference(scene, *axis_view(40, 40), 40, 40)
    assert (ref.radii[:100] == 0).all() and (ref.radii[200:210] == 0).all()
    far = assert_matches_reference(scene, *axis_view(40, 40), 40, 40, config=RasterConfig(far_plane=3.0))[1]
    assert (far.radii > 0).sum() < (ref.radii > 0).sum()


def test_transparent_and_fully_opaque_gaussians():
    scene = make_scene(400, seed=13)
    scene.opacities[:100] = 0.0
    scene.opacities[100:200] = 1.0 / 255.0 * 0.999  # never reaches the 1/255 threshold
    scene.opacities[200:300] = 1.0  # alpha capped at 0.999
    assert_matches_reference(scene, *axis_view(40, 40), 40, 40, background=[0.0, 1.0, 0.0])
    invisible = make_scene(50, seed=14, opacity=(0.0, 0.0039))
    out, ref = assert_matches_reference(invisible, *axis_view(24, 24), 24, 24, background=[0.3, 0.3, 0.3])
    assert (ref.radii > 0).any() and torch.equal(out.alpha, torch.zeros(24, 24, 1))


def test_many_opaque_layers_terminate_early():
    """Hundreds of big near-opaque layers: every pixel ends long before the last one (T <= 1e-4)."""
    layers = make_scene(300, seed=15, spread=0.3, log_scale=(-0.5, 0.0), opacity=(0.5, 0.99))
    out, ref = assert_matches_reference(layers, *axis_view(48, 32), 48, 32, background=[1.0, 0.0, 0.0])
    assert ref.alpha.min() > 0.999 and ref.alpha.max() < 1 - 1e-4  # T stops just above 1e-4


def test_equal_depths_keep_input_order():
    """Coplanar, identically oriented Gaussians: the depth ties are broken by index, as the reference."""
    n = 400
    g = torch.Generator().manual_seed(16)
    means = torch.cat([(torch.rand(n, 2, generator=g) - 0.5) * 2, torch.full((n, 1), 3.0)], dim=1)
    scene = SimpleNamespace(means=means, rotations=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(),
                            scales=torch.full((n, 3), 0.15), sh=torch.randn(n, 1, 3, generator=g),
                            opacities=torch.full((n,), 0.7))
    assert_matches_reference(scene, *axis_view(40, 40), 40, 40)


@pytest.mark.parametrize("eps2d", [0.3, 0.01])
def test_thin_tilted_streaks(eps2d):
    """Needle-like Gaussians at every angle: sigma over a tile's pixel box spans many orders of
    magnitude (the kernel's incremental exp falls back to one exp per group there)."""
    scene = make_scene(300, seed=23, degree=2, opacity=(0.3, 1.0))
    jitter = torch.randn(300, 3, generator=torch.Generator().manual_seed(24)) * 0.3
    scene.scales = torch.tensor([0.4, 2e-4, 2e-4]) * torch.exp(jitter)
    assert_matches_reference(scene, *orbit_view(64, 48), 64, 48, config=RasterConfig(eps2d=eps2d))


def test_off_screen_gaussians():
    """Means outside the image: some reach in with their radius box, most are culled."""
    scene = make_scene(600, seed=17, spread=3.0, log_scale=(-3.0, -0.5))
    out, ref = assert_matches_reference(scene, *axis_view(32, 24), 32, 24)
    assert 0 < (ref.radii > 0).sum() < 600


# ---------------------------------------------------------------------------- threads and API


def test_thread_counts_give_identical_output():
    scene = make_scene(4000, seed=18, degree=3, log_scale=(-4.0, -2.0))
    viewmat, K = orbit_view(96, 80)
    runs = [run_cpu(scene, viewmat, K, 96, 80, threads=threads) for threads in (1, 2, 3)]
    assert [run.stats["threads"] for run in runs] == [1, 2, 3]
    for run in runs[1:]:
        for name in ("color", "depth", "alpha", "radii"):
            assert torch.equal(getattr(run, name), getattr(runs[0], name)), name


def test_stats_and_argument_errors(extension):
    scene = make_scene(50, seed=19)
    out = run_cpu(scene, *axis_view(20, 20), 20, 20)
    assert set(out.stats) >= {"project_ms", "sort_ms", "bin_ms", "composite_ms", "visible", "intersections"}
    assert out.stats["visible"] == int((out.radii > 0).sum())
    with pytest.raises(ValueError, match=r"quats must have shape \[50,4\], got \[50,3\]"):
        cpu_raster.rasterize(scene.means, scene.scales, scene.scales, scene.opacities, scene.sh,
                             *axis_view(20, 20), 20, 20)
    with pytest.raises(ValueError, match="num_threads"):
        run_cpu(scene, *axis_view(20, 20), 20, 20, threads=0)
    with pytest.raises(TypeError):  # the module converts nothing: float64 arrays are refused
        extension.rasterize(*[t.double().numpy() for t in scene_args(scene)], *[torch.eye(4).double().numpy()] * 3,
                            20, 20, None, near_plane=0.0, far_plane=1.0, eps2d=0.3, radius_clip=0.1,
                            tile_size=16, clamp_color=True)


def test_render_backend_cpu_matches_torch_for_camera_batches():
    scene = make_scene(800, seed=20, degree=2)
    eyes = [(0.5, 0.2, -1.0), (-0.4, 0.0, -1.5)]
    views = [Camera.look_at(eye, (0.0, 0.0, 4.0), width=30, height=20) for eye in eyes]
    batch = Cameras(torch.stack([v.camtoworld for v in views]), torch.stack([v.K for v in views]), 30, 20)
    cpu = render(scene, batch, backend="cpu", background=[0.0, 0.5, 1.0])
    ref = render(scene, batch, backend="torch", background=[0.0, 0.5, 1.0])
    assert cpu.color.shape == (2, 20, 30, 3) and cpu.color.dtype == F32 and torch.equal(cpu.radii, ref.radii)
    for name in ("color", "depth", "alpha"):
        assert (getattr(cpu, name) - getattr(ref, name)).abs().max() <= TOLERANCE
    double = SimpleNamespace(**{k: v.double() for k, v in vars(scene).items()})
    assert render(double, views[0], backend="cpu").color.dtype == F64  # float32 maths, float64 out


def test_auto_prefers_cpu_only_when_it_computes_what_was_asked(monkeypatch):
    calls = []
    real = cpu_raster.rasterize
    monkeypatch.setattr(cpu_raster, "rasterize", lambda *a, **k: calls.append(1) or real(*a, **k))
    scene, view = make_scene(50, seed=21), Camera.look_at((0, 0, -1.0), (0, 0, 4.0), width=12, height=10)
    assert "cpu" in available_backends()
    render(scene, view)  # float32, CPU, no grad
    assert len(calls) == 1
    render(SimpleNamespace(**{k: v.double() for k, v in vars(scene).items()}), view)  # float64: reference
    scene.opacities.requires_grad_(True)
    out = render(scene, view)  # needs a gradient: reference
    assert len(calls) == 1 and out.color.requires_grad
    with torch.no_grad():
        render(scene, view)
    assert len(calls) == 2
    with pytest.raises(Vist3AInputError, match="forward-only"):
        render(scene, view, backend="cpu")


# ---------------------------------------------------------------------------- lazy loading


def test_import_does_not_load_the_extension():
    code = ("import sys, vist3a_rt, vist3a_rt.kernels, vist3a_rt.kernels.cpu_raster, vist3a_rt.rendering; "
            f"assert {cpu_raster.EXTENSION!r} not in sys.modules, 'loaded at import'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extension_raises_with_build_instructions(monkeypatch):
    monkeypatch.setitem(sys.modules, cpu_raster.EXTENSION, None)  # import of it now raises ImportError
    cpu_raster.load_extension.cache_clear()
    try:
        assert not cpu_raster.is_available() and available_backends() == ["torch"]
        scene, (viewmat, K) = make_scene(5, seed=22), axis_view(8, 8)
        with pytest.raises(cpu_raster.CpuRasterizerUnavailable, match=r"not built.*pip install -e \."):
            cpu_raster.rasterize(*scene_args(scene), viewmat, K, 8, 8)
        view = Camera(torch.eye(4), K.float(), 8, 8)
        with pytest.raises(Vist3AInputError, match=r"'cpu' is not available.*pip install -e \."):
            render(scene, view, backend="cpu")
        assert torch.equal(render(scene, view).color,  # auto falls back to the reference
                           render(scene, view, backend="torch").color)
    finally:
        monkeypatch.undo()
        cpu_raster.load_extension.cache_clear()
    assert cpu_raster.is_available()
