"""GaussianScene: validation, selection, and the PLY / .splat round trips."""

import math
import os
import stat

import numpy as np
from numpy.lib.recfunctions import repack_fields
import pytest
import torch

from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.scene import GaussianScene, normalize_quaternions
from vist3a_rt.scene import ply as ply_module
from vist3a_rt.scene.splat_format import SH_C0


def random_scene(n: int = 64, degree: int = 3, seed: int = 0) -> GaussianScene:
    g = torch.Generator().manual_seed(seed)
    return GaussianScene.from_unnormalized(
        means=torch.randn(n, 3, generator=g) * 3,
        scales=torch.exp(torch.empty(n, 3).uniform_(-8, 1, generator=g)),
        rotations=torch.randn(n, 4, generator=g),
        sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g),
        opacities=torch.rand(n, generator=g),
    )


def fields_of(scene: GaussianScene) -> dict:
    return {name: getattr(scene, name) for name in ("means", "scales", "rotations", "sh", "opacities")}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32 ulps between same-sign values (as int64)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def read_header(path) -> list[str]:
    data = path.read_bytes()
    return data[: data.index(b"end_header\n")].decode("ascii").splitlines()


# --- validation -------------------------------------------------------------------------------

def test_valid_scene_properties():
    scene = random_scene(10, degree=4)
    assert len(scene) == 10 and scene.sh_degree == 4
    assert "num_gaussians=10" in repr(scene) and "sh_degree=4" in repr(scene)
    assert torch.allclose(scene.rotations.norm(dim=-1), torch.ones(10))


def _bad(field, value):
    def make():
        f = fields_of(random_scene(5, degree=1))
        f[field] = value(f[field]) if callable(value) else value
        return f
    return make


def _set(index, new):
    def edit(t):
        t = t.clone()
        t[index] = new
        return t
    return edit


@pytest.mark.parametrize("make, message", [
    (_bad("means", torch.zeros(5, 4)), r"means must have shape \[N, 3\], got \[5, 4\]"),
    (_bad("means", np.zeros((5, 3), np.float32)), "means must be a torch.Tensor, got ndarray"),
    (_bad("scales", torch.ones(4, 3)), r"scales must have shape \[5, 3\] \(N=5 from means\), got \[4, 3\]"),
    (_bad("rotations", torch.ones(5, 3)), r"rotations must have shape \[5, 4\].*got \[5, 3\]"),
    (_bad("opacities", torch.ones(5, 1)), r"opacities must have shape \[5\].*got \[5, 1\]"),
    (_bad("sh", torch.zeros(5, 5, 3)), r"sh has K=5 .*\[5, 5, 3\].*\(1, 4, 9, 16, 25\)"),
    (_bad("sh", torch.zeros(5, 36, 3)), r"sh has K=36 .*degree <= 4"),
    (_bad("sh", torch.zeros(5, 4, 4)), r"sh must have shape \[N, K, 3\] with N=5 .*got \[5, 4, 4\]"),
    (_bad("sh", torch.zeros(5, 4)), r"sh must have shape \[N, K, 3\].*got \[5, 4\]"),
    (_bad("opacities", torch.ones(5, dtype=torch.int64)), "opacities must be a floating-point tensor"),
    (_bad("scales", lambda t: t.double()), "scales is torch.float64 .* but means is torch.float32"),
    (_bad("means", _set((2, 1), float("nan"))), r"means has non-finite values \(first at Gaussian 2\)"),
    (_bad("sh", _set((3, 2, 0), float("inf"))), r"sh has non-finite values \(first at Gaussian 3\)"),
    (_bad("opacities", _set(1, -0.1)), r"opacities must be in \[0, 1\].*Gaussian 1"),
    (_bad("opacities", _set(4, 1.5)), r"opacities must be in \[0, 1\].*Gaussian 4 has 1.5"),
    (_bad("scales", _set((0, 2), 0.0)), r"scales must be > 0.*Gaussian 0"),
    (_bad("scales", _set((3, 0), -1.0)), r"scales must be > 0.*Gaussian 3"),
    (_bad("rotations", _set(2, 0.0)), r"rotations must be unit quaternions.*Gaussian 2 has norm 0"),
    (_bad("rotations", lambda q: q * 1.01), r"rotations must be unit.*norm 1.01.*from_unnormalized"),
])
def test_validation_errors(make, message):
    with pytest.raises(Vist3AInputError, match=message):
        GaussianScene(**make())


def test_rotation_tolerance_accepts_float32_rounding():
    f = fields_of(random_scene(5))
    f["rotations"] = f["rotations"] * (1 + 5e-4)
    GaussianScene(**f)


def test_from_unnormalized_and_zero_quaternion():
    f = fields_of(random_scene(5))
    scene = GaussianScene.from_unnormalized(**{**f, "rotations": f["rotations"] * 7})
    torch.testing.assert_close(scene.rotations, f["rotations"])
    with pytest.raises(Vist3AInputError, match="quaternion 1 has zero"):
        normalize_quaternions(torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]))


def test_to_dtype_and_scene_is_read_only():
    scene = random_scene(8)
    double = scene.to(torch.float64)
    assert double.dtype == torch.float64 and torch.equal(double.means, scene.means.double())
    with pytest.raises(AttributeError):
        scene.means = scene.means


# --- prune / select ---------------------------------------------------------------------------

def test_prune_keeps_threshold_and_above():
    f = fields_of(random_scene(6))
    f["opacities"] = torch.tensor([0.0, 0.001, 1 / 255, 0.2, 0.5, 1.0])
    scene = GaussianScene(**f)
    pruned = scene.prune(min_opacity=0.2)
    assert pruned.opacities.tolist() == [pytest.approx(0.2), 0.5, 1.0]
    torch.testing.assert_close(pruned.means, scene.means[3:], rtol=0, atol=0)
    assert len(scene.prune()) == 4  # default 1/255 keeps the exact 1/255
    assert len(scene.prune(0.0)) == 6
    with pytest.raises(Vist3AInputError, match="min_opacity must be in"):
        scene.prune(2.0)


def test_select_mask_index_and_errors():
    scene = random_scene(5)
    assert torch.equal(scene.select([2, 0, 2]).means, scene.means[[2, 0, 2]])
    mask = torch.tensor([True, False, True, False, False])
    assert torch.equal(scene.select(mask).sh, scene.sh[mask])
    assert len(scene.select([])) == 0
    with pytest.raises(Vist3AInputError, match=r"bool mask must have shape \[5\], got \[3\]"):
        scene.select(torch.tensor([True, False, True]))
    with pytest.raises(Vist3AInputError, match="out of range"):
        scene.select([0, 5])
    with pytest.raises(Vist3AInputError, match="integer index"):
        scene.select(torch.tensor([0.5]))


# --- PLY --------------------------------------------------------------------------------------

def assert_ply_round_trip(original: GaussianScene, loaded: GaussianScene, k: int) -> None:
    """Bit-exact except where the format's float32 log/logit cannot hold the value (ply.py)."""
    assert torch.equal(loaded.means, original.means)
    assert torch.equal(loaded.rotations, original.rotations)
    assert torch.equal(loaded.sh, original.sh[:, :k])
    for name, encode in (("scales", ply_module.encode_scales), ("opacities", ply_module.encode_opacities)):
        stored = torch.from_numpy(encode(getattr(original, name).numpy())).double().abs()
        ulps = ulp_distance(getattr(loaded, name), getattr(original, name))
        assert (ulps <= stored.floor()).all(), name
        assert (ulps[stored < 1] == 0).all(), name


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_ply_round_trip(tmp_path, degree):
    scene = random_scene(300, degree=degree, seed=degree)
    scene.save_ply(tmp_path / "s.ply")
    loaded = GaussianScene.load_ply(tmp_path / "s.ply")
    assert loaded.sh_degree == min(degree, 3)  # degree 4 is saved as 3 by default
    assert_ply_round_trip(scene, loaded, k=loaded.sh.shape[1])


def test_ply_explicit_degree_4_and_dc_only(tmp_path):
    scene = random_scene(50, degree=4)
    scene.save_ply(tmp_path / "d4.ply", sh_degree=4)
    assert_ply_round_trip(scene, GaussianScene.load_ply(tmp_path / "d4.ply"), k=25)
    scene.save_ply(tmp_path / "dc.ply", dc_only=True)
    assert not any("f_rest" in line for line in read_header(tmp_path / "dc.ply"))
    assert_ply_round_trip(scene, GaussianScene.load_ply(tmp_path / "dc.ply"), k=1)
    with pytest.raises(Vist3AInputError, match=r"sh_degree must be an int in \[0, 2\]"):
        random_scene(5, degree=2).save_ply(tmp_path / "x.ply", sh_degree=3)
    with pytest.raises(Vist3AInputError, match="dc_only=True conflicts"):
        scene.save_ply(tmp_path / "x.ply", sh_degree=2, dc_only=True)


def test_ply_exact_where_the_format_allows(tmp_path):
    """Scales in (1/e, e) and opacities >= 0.5 (or |logit| < 1), and 0 and 1, are bit-exact."""
    g = torch.Generator().manual_seed(1)
    n = 20000
    f = fields_of(random_scene(n))
    f["scales"] = torch.exp(torch.empty(n, 3).uniform_(-0.999, 0.999, generator=g))
    f["opacities"] = torch.cat([torch.rand(n - 4, generator=g) * 0.5 + 0.5,
                                torch.tensor([0.0, 1.0, 2.0 ** -149, 0.3])])
    scene = GaussianScene(**f)
    scene.save_ply(tmp_path / "s.ply")
    loaded = GaussianScene.load_ply(tmp_path / "s.ply")
    assert torch.equal(loaded.scales, scene.scales)
    assert torch.equal(loaded.opacities, scene.opacities)


def test_ply_opacity_0_and_1_store_finite_logits(tmp_path):
    import plyfile

    f = fields_of(random_scene(2))
    f["opacities"] = torch.tensor([0.0, 1.0])
    GaussianScene(**f).save_ply(tmp_path / "s.ply")
    stored = plyfile.PlyData.read(str(tmp_path / "s.ply"))["vertex"]["opacity"]
    assert stored.tolist() == [-ply_module.LOGIT_LIMIT, ply_module.LOGIT_LIMIT]


def test_ply_property_names_and_order(tmp_path):
    random_scene(3, degree=1).save_ply(tmp_path / "s.ply")
    rest = [f"property float f_rest_{i}" for i in range(9)]
    assert read_header(tmp_path / "s.ply") == [
        "ply", "format binary_little_endian 1.0", "element vertex 3",
        *(f"property float {name}" for name in ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]),
        *rest,
        *(f"property float {name}" for name in
          ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]),
    ]
    size = (tmp_path / "s.ply").stat().st_size
    header_size = (tmp_path / "s.ply").read_bytes().index(b"end_header\n") + len("end_header\n")
    assert size == header_size + 3 * 4 * (9 + 9 + 8)


def test_plyfile_reads_our_file_with_3dgs_encodings(tmp_path):
    import plyfile  # a [dev] dependency: fail, don't skip, when it is missing

    scene = random_scene(40, degree=3)
    scene.save_ply(tmp_path / "s.ply")
    vertex = plyfile.PlyData.read(str(tmp_path / "s.ply"))["vertex"]
    assert vertex.data.dtype == np.dtype([(name, "<f4") for name in ply_module.property_names(3)])

    def col(name):
        return torch.from_numpy(np.asarray(vertex[name]).copy())

    assert torch.equal(torch.stack([col("x"), col("y"), col("z")], 1), scene.means)
    assert all(torch.equal(col(n), torch.zeros(40)) for n in ("nx", "ny", "nz"))
    assert torch.equal(torch.stack([col(f"rot_{i}") for i in range(4)], 1), scene.rotations)
    for c in range(3):
        assert torch.equal(col(f"f_dc_{c}"), scene.sh[:, 0, c])
        for k in range(1, 16):  # INRIA order: channel-major
            assert torch.equal(col(f"f_rest_{c * 15 + k - 1}"), scene.sh[:, k, c])
    log_scales = torch.stack([col(f"scale_{i}") for i in range(3)], 1)
    torch.testing.assert_close(log_scales.exp(), scene.scales, rtol=2e-6, atol=0)
    torch.testing.assert_close(torch.sigmoid(col("opacity")), scene.opacities, rtol=2e-6, atol=1e-7)


def test_load_accepts_any_property_order_and_types(tmp_path):
    import plyfile

    scene = random_scene(20, degree=1)
    scene.save_ply(tmp_path / "ours.ply")
    data = plyfile.PlyData.read(str(tmp_path / "ours.ply"))["vertex"].data
    names = list(reversed(data.dtype.names))
    shuffled = np.empty(len(data), [(n, "<f8" if n == "x" else "<f4") for n in names] + [("red", "u1")])
    for n in names:
        shuffled[n] = data[n]
    shuffled["red"] = 7
    plyfile.PlyData([plyfile.PlyElement.describe(shuffled, "vertex")]).write(str(tmp_path / "t.ply"))
    loaded = GaussianScene.load_ply(tmp_path / "t.ply")
    assert_ply_round_trip(scene, loaded, k=4)


def test_load_normalises_raw_trainer_quaternions(tmp_path):
    import plyfile

    random_scene(4).save_ply(tmp_path / "s.ply")
    data = plyfile.PlyData.read(str(tmp_path / "s.ply"))["vertex"].data.copy()
    data["rot_0"], data["rot_1"], data["rot_2"], data["rot_3"] = 2.0, 0.0, 0.0, 0.0
    plyfile.PlyData([plyfile.PlyElement.describe(data, "vertex")]).write(str(tmp_path / "raw.ply"))
    assert torch.equal(GaussianScene.load_ply(tmp_path / "raw.ply").rotations,
                       torch.tensor([[1.0, 0, 0, 0]]).expand(4, 4))
    data["rot_0"][2] = 0.0
    plyfile.PlyData([plyfile.PlyElement.describe(data, "vertex")]).write(str(tmp_path / "zero.ply"))
    with pytest.raises(Vist3AInputError, match=r"zero.ply: rotations: quaternion 2 has zero"):
        GaussianScene.load_ply(tmp_path / "zero.ply")


def test_empty_scene_ply_and_splat(tmp_path):
    scene = random_scene(0, degree=2)
    scene.save_ply(tmp_path / "e.ply")
    loaded = GaussianScene.load_ply(tmp_path / "e.ply")
    assert len(loaded) == 0 and loaded.sh.shape == (0, 9, 3)
    scene.save_splat(tmp_path / "e.splat")
    assert (tmp_path / "e.splat").stat().st_size == 0
    assert len(GaussianScene.load_splat(tmp_path / "e.splat")) == 0


# --- bad files --------------------------------------------------------------------------------

def _header(*lines: str) -> bytes:
    return ("\n".join(["ply", *lines, "end_header"]) + "\n").encode()


@pytest.mark.parametrize("content, message", [
    (b"hello world\n", r"not a PLY file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, r"not a PLY file"),
    (b"", r"not a PLY file"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n", r"truncated PLY header"),
    (_header("format ascii 1.0", "element vertex 0"), r"unsupported PLY format 'ascii 1.0'"),
    (_header("format binary_big_endian 1.0", "element vertex 0"), r"unsupported PLY format 'binary_big_endian"),
    (_header("format binary_little_endian 1.0", "element chunk 1", "property float min_x"),
     r"unsupported element 'chunk 1'.*compressed PLY"),
    (_header("format binary_little_endian 1.0", "element vertex 1", "property list uchar int vertex_indices"),
     r"unsupported list property"),
    (_header("format binary_little_endian 1.0", "element vertex 0", "property float x"),
     r"missing vertex properties \['y', 'z', 'f_dc_0'"),
    (_header("format binary_little_endian 1.0", "element vertex 1", "property float x", "property float x"),
     r"duplicate vertex property 'x'"),
    (_header("element vertex 0"), r"lacks a 'format' line"),
])
def test_bad_ply_files(tmp_path, content, message):
    (tmp_path / "bad.ply").write_bytes(content)
    with pytest.raises(Vist3AInputError, match=message):
        GaussianScene.load_ply(tmp_path / "bad.ply")


def test_truncated_ply(tmp_path):
    random_scene(10).save_ply(tmp_path / "s.ply")
    data = (tmp_path / "s.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-5])
    with pytest.raises(Vist3AInputError, match=r"truncated: header declares 10 vertices \(2480 bytes\) but 2475"):
        GaussianScene.load_ply(tmp_path / "cut.ply")


def test_wrong_f_rest_count_and_bad_values(tmp_path):
    import plyfile

    random_scene(3, degree=1).save_ply(tmp_path / "s.ply")
    data = plyfile.PlyData.read(str(tmp_path / "s.ply"))["vertex"].data
    keep = repack_fields(data[[n for n in data.dtype.names if n != "f_rest_8"]])
    plyfile.PlyData([plyfile.PlyElement.describe(keep, "vertex")]).write(str(tmp_path / "r.ply"))
    with pytest.raises(Vist3AInputError, match=r"r.ply: f_rest_\* .* found 8"):
        GaussianScene.load_ply(tmp_path / "r.ply")
    nan = data.copy()
    nan["x"][1] = np.nan
    plyfile.PlyData([plyfile.PlyElement.describe(nan, "vertex")]).write(str(tmp_path / "n.ply"))
    with pytest.raises(Vist3AInputError, match=r"n.ply: means has non-finite values \(first at Gaussian 1\)"):
        GaussianScene.load_ply(tmp_path / "n.ply")


def test_missing_file_and_unwritable_targets(tmp_path):
    scene = random_scene(3)
    with pytest.raises(Vist3AInputError, match="cannot read"):
        GaussianScene.load_ply(tmp_path / "nope.ply")
    with pytest.raises(Vist3AInputError, match="directory .* does not exist"):
        scene.save_ply(tmp_path / "missing" / "s.ply")
    (tmp_path / "adir").mkdir()
    with pytest.raises(Vist3AInputError, match="cannot write"):
        scene.save_ply(tmp_path / "adir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]  # no temp file left behind


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(Vist3AInputError, match="cannot write .*Permission denied"):
            random_scene(3).save_ply(readonly / "s.ply")
    finally:
        readonly.chmod(stat.S_IRWXU)


def test_unwritable_directory_any_user(tmp_path, monkeypatch):
    """Root ignores directory permissions, so simulate the OS refusing to create the file."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ply_module.os, "open", refuse)
    with pytest.raises(Vist3AInputError, match=r"cannot write .*s.ply: Permission denied"):
        random_scene(3).save_ply(tmp_path / "s.ply")
    with pytest.raises(Vist3AInputError, match=r"cannot write .*s.splat: Permission denied"):
        random_scene(3).save_splat(tmp_path / "s.splat")


def test_save_replaces_existing_file_atomically(tmp_path):
    target = tmp_path / "s.ply"
    target.write_bytes(b"old")
    random_scene(3).save_ply(target)
    assert len(GaussianScene.load_ply(target)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["s.ply"]


# --- .splat -----------------------------------------------------------------------------------

def test_splat_round_trip_within_quantisation(tmp_path):
    f = fields_of(random_scene(500, degree=2))
    f["sh"][:, 0] = (torch.rand(500, 3) - 0.5) / SH_C0 * 0.99  # colours inside [0, 1]: no clipping
    scene = GaussianScene(**f)
    scene.save_splat(tmp_path / "s.splat")
    assert (tmp_path / "s.splat").stat().st_size == 32 * 500
    loaded = GaussianScene.load_splat(tmp_path / "s.splat")
    assert loaded.sh_degree == 0

    row_of = {tuple(m.tolist()): i for i, m in enumerate(scene.means)}
    order = torch.tensor([row_of[tuple(m.tolist())] for m in loaded.means])
    original = scene.select(order)
    exact_importance = original.scales.double().prod(1) * original.opacities.double()
    assert (exact_importance[:-1] >= exact_importance[1:]).all()  # sorted by descending importance

    assert torch.equal(loaded.scales, original.scales)
    torch.testing.assert_close(loaded.sh[:, 0], original.sh[:, 0], rtol=0, atol=0.5 / 255 / SH_C0 + 1e-6)
    torch.testing.assert_close(loaded.opacities, original.opacities, rtol=0, atol=0.5 / 255 + 1e-7)
    torch.testing.assert_close(loaded.rotations, original.rotations, rtol=0, atol=0.012)


def test_splat_rejects_wrong_size(tmp_path):
    (tmp_path / "b.splat").write_bytes(b"\0" * 33)
    with pytest.raises(Vist3AInputError, match="size 33 bytes is not a multiple of the 32-byte record"):
        GaussianScene.load_splat(tmp_path / "b.splat")


def test_scale_error_bound_is_reached():
    """The loss documented in ply.py is real (a float32 log cannot hold every float32 scale)
    and stays within floor(|log s|) ulps; if this fails, update ply.py's docstring."""
    x = torch.exp(torch.linspace(-9, -4, 200000, dtype=torch.float64)).float()
    log_x = ply_module.encode_scales(x.numpy()[:, None])
    back = torch.from_numpy(ply_module.decode_scales(log_x))[:, 0]
    ulps = ulp_distance(back, x)
    assert (ulps <= torch.from_numpy(log_x[:, 0]).double().abs().floor()).all()
    assert ulps.max() >= 4
