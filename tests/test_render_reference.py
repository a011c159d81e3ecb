"""The reference rasterizer against closed forms, a serial per-pixel transcription, and autograd."""

import math
from types import SimpleNamespace

import pytest
import torch

from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.rendering import (
    SH_C0, RasterConfig, eval_sh, project_gaussians, rasterize_gaussians, render, sh_basis,
    sh_degree_from_count,
)
from vist3a_rt.scene.cameras import Camera, Cameras

F64 = torch.float64


# ---------------------------------------------------------------------------- helpers


def axis_camera(width=15, height=15, focal=20.0):
    """Camera at the origin looking down +z; the principal point is the image centre."""
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=F64)
    return Camera(torch.eye(4, dtype=F64), K, width, height)


def dc_for(rgb):
    """SH DC coefficients [3] whose rendered colour is ``rgb``."""
    return (torch.as_tensor(rgb, dtype=F64) - 0.5) / SH_C0


def make_scene(means, scales, opacities, rgb=None, sh=None, quats=None):
    means = torch.as_tensor(means, dtype=F64).reshape(-1, 3)
    n = len(means)
    scales = torch.as_tensor(scales, dtype=F64).expand(n, 3).clone()
    if sh is None:
        rgb = torch.as_tensor(rgb if rgb is not None else [0.5, 0.5, 0.5], dtype=F64).expand(n, 3)
        sh = dc_for(rgb)[:, None, :]
    rotations = torch.tensor([1.0, 0, 0, 0], dtype=F64).expand(n, 4).clone() if quats is None else quats
    return SimpleNamespace(means=means, scales=scales, rotations=rotations, sh=sh,
                           opacities=torch.as_tensor(opacities, dtype=F64).expand(n).clone())


def render_scene(scene, camera, background=None, config=RasterConfig()):
    viewmat = torch.linalg.inv(camera.camtoworld)
    bg = None if background is None else torch.as_tensor(background, dtype=F64)
    return rasterize_gaussians(scene.means, scene.rotations, scene.scales, scene.opacities, scene.sh,
                               viewmat, camera.K, camera.width, camera.height, bg, config)


def cartesian_sh_table(d):
    """Real SH with the Condon-Shortley phase, written out from the textbook Cartesian table."""
    x, y, z = d.unbind(-1)
    pi, s = math.pi, math.sqrt
    return torch.stack([
        0.5 * s(1 / pi) * torch.ones_like(x),
        -s(3 / (4 * pi)) * y, s(3 / (4 * pi)) * z, -s(3 / (4 * pi)) * x,
        0.5 * s(15 / pi) * x * y, -0.5 * s(15 / pi) * y * z, 0.25 * s(5 / pi) * (3 * z**2 - 1),
        -0.5 * s(15 / pi) * x * z, 0.25 * s(15 / pi) * (x**2 - y**2),
        -0.25 * s(35 / (2 * pi)) * y * (3 * x**2 - y**2), 0.5 * s(105 / pi) * x * y * z,
        -0.25 * s(21 / (2 * pi)) * y * (5 * z**2 - 1), 0.25 * s(7 / pi) * (5 * z**3 - 3 * z),
        -0.25 * s(21 / (2 * pi)) * x * (5 * z**2 - 1), 0.25 * s(105 / pi) * (x**2 - y**2) * z,
        -0.25 * s(35 / (2 * pi)) * x * (x**2 - 3 * y**2),
        0.75 * s(35 / pi) * x * y * (x**2 - y**2), -0.75 * s(35 / (2 * pi)) * y * (3 * x**2 - y**2) * z,
        0.75 * s(5 / pi) * x * y * (7 * z**2 - 1), -0.75 * s(5 / (2 * pi)) * y * z * (7 * z**2 - 3),
        3 / 16 * s(1 / pi) * (35 * z**4 - 30 * z**2 + 3), -0.75 * s(5 / (2 * pi)) * x * z * (7 * z**2 - 3),
        3 / 8 * s(5 / pi) * (x**2 - y**2) * (7 * z**2 - 1), -0.75 * s(35 / (2 * pi)) * x * (x**2 - 3 * y**2) * z,
        3 / 16 * s(35 / pi) * (x**2 * (x**2 - 3 * y**2) - y**2 * (3 * x**2 - y**2)),
    ], dim=-1)


def serial_render(proj, features, opacities, width, height, background, tile_size=16):
    """gsplat's per-pixel loop, transcribed literally: one Gaussian at a time, front to back."""
    n = len(opacities)
    radii, m, c = proj.radii.tolist(), proj.means2d.tolist(), proj.conics.tolist()
    order = sorted((i for i in range(n) if radii[i] > 0), key=lambda i: (float(proj.depths[i]), i))
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)

    def tile_span(centre, r, tiles):
        return (min(max(math.floor((centre - r) / tile_size), 0), tiles),
                min(max(math.ceil((centre + r) / tile_size), 0), tiles))

    spans = {i: (tile_span(m[i][0], radii[i], tiles_x), tile_span(m[i][1], radii[i], tiles_y)) for i in order}
    feats, opac = features.tolist(), opacities.tolist()
    out = torch.zeros(height, width, len(feats[0]) if feats else 4, dtype=F64)
    trans_out, terminated = torch.ones(height, width, dtype=F64), 0
    for row in range(height):
        for col in range(width):
            T, acc = 1.0, [0.0] * out.shape[-1]
            for i in order:
                (x0, x1), (y0, y1) = spans[i]
                if not (x0 <= col // tile_size < x1 and y0 <= row // tile_size < y1):
                    continue
                dx, dy = m[i][0] - (col + 0.5), m[i][1] - (row + 0.5)
                sigma = 0.5 * (c[i][0] * dx * dx + c[i][2] * dy * dy) + c[i][1] * dx * dy
                alpha = min(0.999, opac[i] * math.exp(-sigma))
                if sigma < 0 or alpha < 1 / 255:
                    continue
                if T * (1 - alpha) <= 1e-4:
                    terminated += 1
                    break
                acc = [a + f * alpha * T for a, f in zip(acc, feats[i])]
                T *= 1 - alpha
            out[row, col] = torch.tensor(acc, dtype=F64)
            trans_out[row, col] = T
    color = (out[..., :3] + trans_out[..., None] * background).clamp(0, 1)
    return color, out[..., 3:], 1 - trans_out[..., None], terminated


def random_scene(n, seed, degree=1, wall=0):
    """n random Gaussians in view of an axis camera; the first ``wall`` are big, opaque and central."""
    g = torch.Generator().manual_seed(seed)
    z = 2 + 4 * torch.rand(n, generator=g, dtype=F64)
    spread = torch.where(torch.arange(n) < wall, 0.1, 0.9).to(F64)
    xy = (torch.rand(n, 2, generator=g, dtype=F64) - 0.5) * (z * spread)[:, None]
    big = (torch.arange(n) < wall).to(F64)[:, None]
    return SimpleNamespace(
        means=torch.cat([xy, z[:, None]], dim=1),
        scales=0.02 + 0.3 * torch.rand(n, 3, generator=g, dtype=F64) + 0.5 * big,
        rotations=torch.randn(n, 4, generator=g, dtype=F64),
        sh=0.4 * torch.randn(n, (degree + 1) ** 2, 3, generator=g, dtype=F64),
        opacities=torch.where(big[:, 0] > 0, 0.97, 0.3 + 0.7 * torch.rand(n, generator=g, dtype=F64)))


# ---------------------------------------------------------------------------- spherical harmonics


@pytest.mark.parametrize("degree", range(5))
def test_sh_basis_matches_cartesian_table(degree):
    dirs = torch.nn.functional.normalize(torch.randn(64, 3, dtype=F64), dim=-1)
    dirs = torch.cat([dirs, torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])  # poles and axes too
    expected = cartesian_sh_table(dirs)[:, : (degree + 1) ** 2]
    torch.testing.assert_close(sh_basis(degree, dirs), expected, rtol=0, atol=1e-12)


def test_sh_gsplat_constants_and_signs():
    basis = sh_basis(1, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=F64))
    assert basis[0, 0] == pytest.approx(0.2820947917738781, abs=1e-15)
    assert basis[0, 3] == pytest.approx(-0.48860251190292, abs=1e-13)  # -C1 x
    assert basis[1, 1] == pytest.approx(-0.48860251190292, abs=1e-13)  # -C1 y
    assert basis[2, 2] == pytest.approx(0.48860251190292, abs=1e-13)  # +C1 z


def test_eval_sh_normalises_direction():
    sh = torch.randn(5, 16, 3, dtype=F64)
    dirs = torch.randn(5, 3, dtype=F64)
    torch.testing.assert_close(eval_sh(sh, 7.0 * dirs), eval_sh(sh, dirs))


@pytest.mark.parametrize("count, message", [(0, "K=0"), (5, "K=5"), (36, "above the supported maximum")])
def test_sh_bad_count(count, message):
    with pytest.raises(Vist3AInputError, match=message):
        sh_degree_from_count(count)


@pytest.mark.parametrize("degree", range(5))
def test_rendered_colour_follows_sh_along_view_direction(degree):
    eye, target = torch.tensor([1.0, -2.0, -4.0], dtype=F64), torch.tensor([0.2, 0.1, 0.3], dtype=F64)
    camera = Camera.look_at(eye.tolist(), target.tolist(), width=15, height=15)
    camera = Camera(camera.camtoworld.double(), camera.K.double(), 15, 15)
    sh = 0.3 * torch.randn(1, (degree + 1) ** 2, 3, dtype=F64)
    scene = make_scene(target, 0.2, 0.7, sh=sh)
    out = render_scene(scene, camera, background=[0.1, 0.2, 0.3])
    view = torch.nn.functional.normalize(target - eye, dim=0)
    rgb = (cartesian_sh_table(view)[: (degree + 1) ** 2] @ sh[0] + 0.5).clamp_min(0)
    expected = 0.7 * rgb + 0.3 * torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    torch.testing.assert_close(out.color[7, 7], expected.clamp(0, 1), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------- projection


def test_isotropic_gaussian_closed_form():
    camera, focal, z, s = axis_camera(15, 15, 20.0), 20.0, 4.0, 0.1
    rgb, bg = torch.tensor([0.9, 0.2, 0.4], dtype=F64), torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    scene = make_scene([0.0, 0.0, z], s, 0.8, rgb=rgb)
    out = render_scene(scene, camera, background=bg)
    var = (focal * s / z) ** 2 + 0.3  # EWA variance in px^2 plus the low-pass
    proj = project_gaussians(scene.means, scene.rotations, scene.scales, torch.eye(4, dtype=F64),
                             camera.K, 15, 15)
    torch.testing.assert_close(proj.covars2d[0], var * torch.eye(2, dtype=F64))
    assert proj.radii.tolist() == [math.ceil(3 * math.sqrt(var + 0.1))]  # eigenvalue gap floored at 0.1
    centre = torch.arange(15, dtype=F64) + 0.5 - 7.5
    d2 = centre[:, None] ** 2 + centre[None, :] ** 2
    alpha = 0.8 * torch.exp(-0.5 * d2 / var)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))[..., None]
    torch.testing.assert_close(out.alpha, alpha, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.color, alpha * rgb + (1 - alpha) * bg, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.depth, alpha * z, rtol=0, atol=1e-12)
    assert out.alpha[7, 7, 0] == pytest.approx(0.8, abs=1e-12)


@pytest.mark.parametrize("x_over_z, used", [(0.2, 0.2), (3.0, 0.4875), (-5.0, -0.4875)])
def test_jacobian_clamps_x_over_z_beyond_the_view(x_over_z, used):
    # W=15, f=20, cx=7.5: tan(half-fov) = 0.375; limit = cx/f + 0.3 tan = 0.4875 (= 1.3 tan).
    camera, z, s = axis_camera(15, 15, 20.0), 4.0, 0.5
    means = torch.tensor([[x_over_z * z, 0.0, z]], dtype=F64)
    quats, scales = torch.tensor([[1.0, 0, 0, 0]], dtype=F64), torch.full((1, 3), s, dtype=F64)
    proj = project_gaussians(means, quats, scales, torch.eye(4, dtype=F64), camera.K, 15, 15,
                             RasterConfig(radius_clip=0.0))
    k = (20.0 * s / z) ** 2
    expected = torch.tensor([[k * (1 + used**2) + 0.3, 0.0], [0.0, k + 0.3]], dtype=F64)
    torch.testing.assert_close(proj.covars2d[0], expected)
    assert proj.means2d[0, 0].item() == pytest.approx(20.0 * x_over_z + 7.5)  # the mean is not clamped


def test_rotation_and_anisotropy():
    camera, z = axis_camera(15, 15, 20.0), 4.0
    half = math.sqrt(0.5)
    quats = torch.tensor([[half, 0, 0, half], [3 * half, 0, 0, 3 * half]], dtype=F64)  # 90 deg about z
    means = torch.tensor([[0.0, 0, z], [0, 0, z]], dtype=F64)
    scales = torch.tensor([[0.3, 0.05, 0.05]] * 2, dtype=F64)
    proj = project_gaussians(means, quats, scales, torch.eye(4, dtype=F64), camera.K, 15, 15)
    k = (20.0 / z) ** 2
    expected = torch.diag(torch.tensor([k * 0.05**2 + 0.3, k * 0.3**2 + 0.3], dtype=F64))
    torch.testing.assert_close(proj.covars2d, expected.expand(2, 2, 2))  # long axis now along y


def test_near_and_far_planes_keep_the_boundary():
    camera = axis_camera()
    means = torch.tensor([[0.0, 0, 1.0], [0, 0, 0.999], [0, 0, 10.0], [0, 0, 10.001]], dtype=F64)
    quats, scales = torch.tensor([[1.0, 0, 0, 0]] * 4, dtype=F64), torch.full((4, 3), 0.05, dtype=F64)
    proj = project_gaussians(means, quats, scales, torch.eye(4, dtype=F64), camera.K, 15, 15,
                             RasterConfig(near_plane=1.0, far_plane=10.0))
    assert (proj.radii > 0).tolist() == [True, False, True, False]


def test_radius_clip_drops_radius_at_or_below():
    scene = make_scene([0.0, 0, 4.0], 1e-4, 0.9)  # a point: radius = ceil(3 sqrt(0.3 + 0.1)) = 2
    kept = render_scene(scene, axis_camera())
    dropped = render_scene(scene, axis_camera(), config=RasterConfig(radius_clip=2.0))
    assert kept.radii.tolist() == [2] and dropped.radii.tolist() == [0]
    assert dropped.alpha.abs().max() == 0 and kept.alpha.max() > 0.5


# ---------------------------------------------------------------------------- compositing


def test_occlusion_order_and_input_order_independence():
    camera, red, blue = axis_camera(), [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    bg = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    near_first = make_scene([[0.0, 0, 2.0], [0, 0, 4.0]], 0.5, 0.95, rgb=torch.tensor([red, blue]))
    far_first = make_scene([[0.0, 0, 4.0], [0, 0, 2.0]], 0.5, 0.95, rgb=torch.tensor([blue, red]))
    a, b = render_scene(near_first, camera, bg), render_scene(far_first, camera, bg)
    expected = 0.95 * torch.tensor(red, dtype=F64) + 0.05 * 0.95 * torch.tensor(blue, dtype=F64) + 0.05**2 * bg
    torch.testing.assert_close(a.color[7, 7], expected, rtol=0, atol=1e-12)
    for name in ("color", "depth", "alpha"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_alpha_is_capped():
    out = render_scene(make_scene([0.0, 0, 3.0], 1.0, 1.0, rgb=[1.0, 1.0, 1.0]), axis_camera(), [0.0, 0.0, 0.0])
    assert out.alpha[7, 7, 0].item() == pytest.approx(0.999, abs=1e-12)
    assert out.color[7, 7, 0].item() == pytest.approx(0.999, abs=1e-12)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 1])  # 1: one Gaussian per dense step
def test_termination_excludes_the_stopping_gaussian_and_all_behind_it(chunk_elements):
    # alpha 0.8 at the centre pixel: T = 0.2^k; the 6th would take T to 6.4e-5 <= 1e-4, so it and
    # the faint 7th (which alone would keep T = 3.04e-4 > 1e-4) are both excluded.
    depths = torch.arange(1, 8, dtype=F64)
    colours = torch.rand(7, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    scene = make_scene(torch.stack([torch.zeros(7, dtype=F64)] * 2 + [depths], dim=1), 1.0,
                       torch.tensor([0.8] * 6 + [0.05], dtype=F64), rgb=colours)
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    out = render_scene(scene, axis_camera(), bg, RasterConfig(chunk_elements=chunk_elements))
    weights = torch.tensor([0.8 * 0.2**k for k in range(5)] + [0.0, 0.0], dtype=F64)
    torch.testing.assert_close(out.color[7, 7], weights @ colours + 0.2**5 * bg, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.depth[7, 7, 0], weights @ depths, rtol=0, atol=1e-12)
    assert out.alpha[7, 7, 0].item() == pytest.approx(1 - 0.2**5, abs=1e-12)
    reference = render_scene(scene, axis_camera(), bg)
    torch.testing.assert_close(out.color, reference.color, rtol=0, atol=1e-12)


def test_gaussian_behind_camera_contributes_nothing_and_has_finite_grads():
    visible = make_scene([0.0, 0, 3.0], 0.3, 0.7, rgb=[0.9, 0.1, 0.1])
    both = make_scene([[0.0, 0, 3.0], [0, 0, -3.0], [0, 0, 0]], 0.3, 0.7, rgb=[0.9, 0.1, 0.1])
    for field in ("means", "scales", "rotations", "sh", "opacities"):
        getattr(both, field).requires_grad_(True)
    bg = [0.2, 0.2, 0.2]
    out, alone = render_scene(both, axis_camera(), bg), render_scene(visible, axis_camera(), bg)
    assert out.radii.tolist()[1:] == [0, 0]
    torch.testing.assert_close(out.color, alone.color, rtol=0, atol=0)
    (out.color.sum() + out.depth.sum()).backward()
    for field in ("means", "scales", "rotations", "sh", "opacities"):
        grad = getattr(both, field).grad
        assert torch.isfinite(grad).all() and grad[1:].abs().max() == 0, field


def test_empty_scene_is_background():
    scene = make_scene(torch.zeros(0, 3), 0.1, 0.5)
    out = render_scene(scene, axis_camera(9, 4), [0.25, 0.5, 0.75])
    assert out.color.shape == (4, 9, 3) and out.depth.shape == (4, 9, 1) and out.alpha.shape == (4, 9, 1)
    torch.testing.assert_close(out.color, torch.tensor([0.25, 0.5, 0.75], dtype=F64).expand(4, 9, 3))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0


@pytest.mark.parametrize("width, height", [(37, 21), (1, 1), (16, 16), (17, 33)])
def test_matches_serial_per_pixel_loop(width, height):
    scene = random_scene(40, seed=width * 100 + height, wall=8)
    camera = axis_camera(width, height, focal=1.2 * max(width, height))
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=F64)
    out = render_scene(scene, camera, bg)
    proj = project_gaussians(scene.means, scene.rotations, scene.scales, torch.eye(4, dtype=F64),
                             camera.K, width, height, RasterConfig())
    rgb = (cartesian_sh_table(torch.nn.functional.normalize(scene.means, dim=-1))[:, :4, None]
           * scene.sh).sum(1) + 0.5
    features = torch.cat([rgb.clamp_min(0), proj.depths[:, None]], dim=1)
    color, depth, alpha, terminated = serial_render(proj, features, scene.opacities, width, height, bg)
    torch.testing.assert_close(out.color, color, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.depth, depth, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.alpha, alpha, rtol=0, atol=1e-10)
    if width * height > 1:
        assert terminated > 0  # the scene is dense enough to exercise early termination


def test_tile_rule_cuts_the_footprint_at_the_radius_box():
    # Screen variance 100 px^2: radius = ceil(3 sqrt(100.1)) = 31. Centre at x = 17, so the box
    # ends at x = 48 = the start of tile 3: pixel 47 (tile 2) sees the Gaussian, pixel 48 does
    # not, although its alpha there (0.007) would pass the 1/255 test -- gsplat behaves so too.
    K = torch.tensor([[20.0, 0, 17.0], [0, 20.0, 8.0], [0, 0, 1]], dtype=F64)
    camera, z = Camera(torch.eye(4, dtype=F64), K, 80, 16), 4.0
    scene = make_scene([0.0, 0.0, z], z * math.sqrt(99.7) / 20.0, 1.0)
    out = render_scene(scene, camera)
    assert out.radii.tolist() == [31]

    def closed_form(col):
        return min(0.999, math.exp(-0.5 * ((col + 0.5 - 17.0) ** 2 + 0.5**2) / 100.0))

    assert closed_form(48) > 1 / 255
    assert out.alpha[8, 47, 0].item() == pytest.approx(closed_form(47), abs=1e-12)
    assert out.alpha[8, 48:, 0].abs().max() == 0


def test_non_square_image_orientation():
    camera = axis_camera(37, 21, focal=30.0)
    # lands on pixel centre (x=30.5, y=5.5): column 30, row 5
    z = 5.0
    mean = [(30.5 - 18.5) * z / 30.0, (5.5 - 10.5) * z / 30.0, z]
    out = render_scene(make_scene(mean, 0.05, 0.9, rgb=[1.0, 1.0, 1.0]), camera, [0.0, 0.0, 0.0])
    assert out.color.shape == (21, 37, 3)
    assert divmod(int(out.alpha[..., 0].argmax()), 37) == (5, 30)
    assert out.alpha[5, 30, 0].item() == pytest.approx(0.9, abs=1e-12)


def test_float32_agrees_with_float64():
    scene, camera = random_scene(30, seed=3), axis_camera(20, 12, 25.0)
    out64 = render_scene(scene, camera, [0.1, 0.1, 0.1])
    f32 = [t.float() for t in (scene.means, scene.rotations, scene.scales, scene.opacities, scene.sh)]
    out32 = rasterize_gaussians(*f32, torch.eye(4), camera.K.float(), 20, 12, torch.full((3,), 0.1))
    assert out32.color.dtype == torch.float32
    torch.testing.assert_close(out32.color.double(), out64.color, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- gradients


def test_gradcheck_all_inputs():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.1, -0.05, 3.0], [-0.15, 0.1, 3.6], [0.05, 0.12, 4.2]], dtype=F64)
    quats = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=F64), dim=-1)
    scales = torch.tensor([[0.3, 0.2, 0.25], [0.25, 0.35, 0.2], [0.4, 0.3, 0.3]], dtype=F64)
    opacities = torch.tensor([0.5, 0.6, 0.7], dtype=F64)
    sh = torch.cat([dc_for([[0.6, 0.4, 0.5], [0.3, 0.6, 0.4], [0.5, 0.5, 0.7]])[:, None],
                    0.1 * torch.randn(3, 3, 3, generator=g, dtype=F64)], dim=1)
    viewmat = torch.eye(4, dtype=F64)
    viewmat[:3, 3] = torch.tensor([0.02, -0.01, 0.1])
    intrinsics = torch.tensor([8.0, 7.0, 3.1, 2.4], dtype=F64)  # fx, fy, cx, cy for a 6x5 image
    background = torch.tensor([0.2, 0.3, 0.1], dtype=F64)

    def run(means, quats, scales, opacities, sh, viewmat, intrinsics, background):
        fx, fy, cx, cy = intrinsics.unbind()
        zero, one = torch.zeros_like(fx), torch.ones_like(fx)
        K = torch.stack([fx, zero, cx, zero, fy, cy, zero, zero, one]).reshape(3, 3)
        out = rasterize_gaussians(means, quats, scales, opacities, sh, viewmat, K, 6, 5, background)
        return out.color, out.depth, out.alpha

    inputs = [t.clone().requires_grad_(True)
              for t in (means, quats, scales, opacities, sh, viewmat, intrinsics, background)]
    color, _, alpha = run(*inputs)
    # Away from every threshold: colours inside (0, 1), no pixel near termination.
    assert 0.05 < color.min() and color.max() < 0.95 and alpha.max() < 0.99
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- inputs and API


def _args(**changes):
    scene = make_scene([[0.0, 0, 3.0], [0.1, 0, 4.0]], 0.2, 0.5)
    camera = axis_camera()
    args = dict(means=scene.means, quats=scene.rotations, scales=scene.scales, opacities=scene.opacities,
                sh=scene.sh, viewmat=torch.eye(4, dtype=F64), K=camera.K, width=15, height=15,
                background=None)
    args.update(changes)
    return args


NAN = float("nan")


@pytest.mark.parametrize("changes, message", [
    (dict(means=torch.zeros(2, 2, dtype=F64)), r"means must have shape \[\*,3\], got \[2, 2\]"),
    (dict(scales=torch.ones(3, 3, dtype=F64)), r"scales must have shape \[2,3\], got \[3, 3\]"),
    (dict(quats=torch.ones(2, 3, dtype=F64)), r"rotations must have shape \[2,4\]"),
    (dict(opacities=torch.ones(2, 1, dtype=F64)), r"opacities must have shape \[2\], got \[2, 1\]"),
    (dict(sh=torch.ones(2, 5, 3, dtype=F64)), "K=5"),
    (dict(sh=torch.ones(2, 36, 3, dtype=F64)), "above the supported maximum"),
    (dict(viewmat=torch.eye(3, dtype=F64)), r"viewmat must have shape \[4,4\]"),
    (dict(background=torch.ones(4, dtype=F64)), r"background must have shape \[3\]"),
    (dict(means=torch.tensor([[0.0, 0, 3.0], [NAN, 0, 4.0]], dtype=F64)), "means has non-finite"),
    (dict(scales=torch.tensor([[0.2] * 3, [float("inf")] * 3], dtype=F64)), "scales has non-finite"),
    (dict(opacities=torch.tensor([0.5, 1.5], dtype=F64)), r"opacities must lie in \[0, 1\]"),
    (dict(scales=torch.tensor([[0.2] * 3, [-0.1] * 3], dtype=F64)), "scales must be >= 0"),
    (dict(quats=torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]], dtype=F64)), "rotation 1 is all zeros"),
    (dict(means=torch.zeros(2, 3, dtype=torch.int64)), "means must be float32 or float64"),
    (dict(means=torch.zeros(2, 3, dtype=torch.float32)), "share one dtype and device"),
    (dict(K=torch.tensor([[20.0, 1, 7.5], [0, 20, 7.5], [0, 0, 1]], dtype=F64)), "pinhole matrix"),
    (dict(K=torch.tensor([[-20.0, 0, 7.5], [0, 20, 7.5], [0, 0, 1]], dtype=F64)), "positive focal"),
    (dict(width=0), "width must be a positive int, got 0"),
    (dict(height=2.5), "height must be a positive int, got 2.5"),
    (dict(sh=[[0.0]]), "sh must be a torch.Tensor, got list"),
])
def test_bad_inputs_raise_precisely(changes, message):
    with pytest.raises(Vist3AInputError, match=message):
        rasterize_gaussians(**_args(**changes))


def test_bad_config_raises():
    with pytest.raises(Vist3AInputError, match="near_plane < far_plane"):
        RasterConfig(near_plane=2.0, far_plane=1.0)


def test_render_dispatch_and_backends():
    scene, camera = random_scene(10, seed=5), axis_camera(12, 9, 15.0)
    direct = render_scene(scene, camera, [0.0, 0.5, 1.0])
    for backend in ("auto", "torch"):
        out = render(scene, camera, backend=backend, background=[0.0, 0.5, 1.0])
        torch.testing.assert_close(out.color, direct.color, rtol=0, atol=0)
    with pytest.raises(Vist3AInputError, match="render backend 'triton' is not available"):
        render(scene, camera, backend="triton")  # "cpu": tests/test_cpu_rasterizer.py
    with pytest.raises(Vist3AInputError, match="unknown render backend 'cuda'"):
        render(scene, camera, backend="cuda")
    with pytest.raises(Vist3AInputError, match=r"lacks \['sh'\]"):
        render(SimpleNamespace(means=scene.means, scales=scene.scales, rotations=scene.rotations,
                               opacities=scene.opacities), camera)


def test_render_float32_camera_with_float64_scene_and_batches():
    scene = random_scene(12, seed=7)
    eyes = [(0.5, 0.2, -1.0), (-0.4, 0.0, -1.5)]
    views = [Camera.look_at(eye, (0.0, 0.0, 4.0), width=10, height=8) for eye in eyes]
    batch = Cameras(torch.stack([v.camtoworld for v in views]), torch.stack([v.K for v in views]), 10, 8)
    out = render(scene, batch)
    assert out.color.shape == (2, 8, 10, 3) and out.radii.shape == (2, 12) and out.color.dtype == F64
    for i, view in enumerate(views):
        single = render(scene, view)
        torch.testing.assert_close(out.color[i], single.color, rtol=0, atol=0)
        assert single.alpha.max() > 0.1
