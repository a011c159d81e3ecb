"""The procedural world of VIST3A-nano: exact renders, true captions, a clean held-out split,
orbit cameras, determinism and the disk cache."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vist3a_rt.errors import ConfigError, Vist3AInputError
from vist3a_rt.scene.cameras import Camera, Cameras
from vist3a_rt.training.world import (COLOURS, SHAPES, VOCABULARY, Orbit, Primitive, SceneGraph, WorldConfig,
                                      WorldDataset, WorldRender, collate_world, heldout_compositions, orbit_cameras,
                                      render, sample_scene, uses_heldout)
from vist3a_rt.training.world.captions import SHAPE_WORDS
from vist3a_rt.training.world.compositions import canonical_triple, is_heldout_composition, is_heldout_object

pytestmark = pytest.mark.usefixtures("single_thread")  # torch ops in the checks; the renderer is numpy

_DUMMY_ORBIT = Orbit((0.0, 0.0, 0.0), 1.0, 30.0, 0.0, 0.0, 45.0, 1)


@pytest.fixture(scope="module")
def train_scenes():
    return [sample_scene(seed, "train") for seed in range(500)]


@pytest.fixture(scope="module")
def heldout_scenes():
    return [sample_scene(seed, "heldout") for seed in range(150)]


def _project(cameras: Cameras, points: np.ndarray, frame: int = 0) -> np.ndarray:  # [P, 3] -> [P, 3] (u, v, z)
    w2c = torch.linalg.inv(cameras.camtoworld[frame].double()).numpy()
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    pix = cam @ cameras.K[frame].double().numpy().T
    return np.concatenate([pix[:, :2] / pix[:, 2:], cam[:, 2:]], 1)


# --- the analytic renderer on known scenes ------------------------------------------------------

def _one_object(shape: str, yaw: float = 0.0) -> SceneGraph:
    return SceneGraph((Primitive(shape, "red", "small", (0.0, 0.0, 0.0), yaw),), (), _DUMMY_ORBIT)


def _centre_pixel_hit(scene: SceneGraph, camera: Camera) -> tuple[WorldRender, float, int]:
    out = render(scene, Cameras(camera.camtoworld[None], camera.K[None], camera.width, camera.height))
    return out, float(out.depth[0, 32, 32]), int(out.object_ids[0, 32, 32])


@pytest.mark.parametrize("shape, front", [("sphere", 1.0), ("cube", 1.0), ("cylinder", 1.0), ("cone", 0.5)])
def test_side_view_depth_is_exact(shape, front):
    """Eye at distance d on the axis through the object's mid-height: the centre pixel (65 px:
    its centre is the principal point) sees the nearest surface point at depth d - front * s;
    the bottom-centre pixel sees the ground at depth h f / 32 (in front of the object); above the
    horizon the sky (id -1, depth 0)."""
    s, d = 0.35, 6.0
    h = s  # mid-height of every shape (height 2 s)
    camera = Camera.look_at((d, 0.0, h), (0.0, 0.0, h), up=(0.0, 0.0, 1.0), fov_y_deg=45.0, width=65, height=65)
    out, depth, ident = _centre_pixel_hit(_one_object(shape), camera)
    assert ident == 1
    assert depth == pytest.approx(d - front * s, abs=1e-5)
    focal = float(camera.K[1, 1])
    assert int(out.object_ids[0, 64, 32]) == 0
    assert float(out.depth[0, 64, 32]) == pytest.approx(h * focal / 32.0, rel=1e-5)
    above = out.object_ids[0, :32]  # above the horizon: the object or the sky, never the ground
    assert set(above.unique().tolist()) == {-1, 1} and (out.depth[0, :32][above == -1] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_top_view_sees_the_top_at_exact_depth(shape):
    s, height = 0.35, 5.0
    c2w = torch.eye(4)  # straight down: image right = +x, image down = -y
    c2w[:3, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    c2w[:3, 3] = torch.tensor([0.0, 0.0, height])
    camera = Camera(c2w, Camera.look_at((1, 0, 0), (0, 0, 0), width=65, height=65).K, 65, 65)
    out, depth, ident = _centre_pixel_hit(_one_object(shape, yaw=0.3), camera)
    assert ident == 1 and depth == pytest.approx(height - 2 * s, abs=1e-4)
    assert int(out.object_ids[0, 0, 0]) == 0 and float(out.depth[0, 0, 0]) == pytest.approx(height, rel=1e-6)
    if shape in ("cube", "cylinder"):  # seen from straight above, only the flat top shows
        top = out.depth[0][out.object_ids[0] == 1]
        torch.testing.assert_close(top, torch.full_like(top, height - 2 * s), atol=1e-5, rtol=0)


def test_sphere_depth_matches_a_float64_reference():
    scene = SceneGraph((Primitive("sphere", "blue", "large", (0.3, -0.2, 0.0)),), (), _DUMMY_ORBIT)
    camera = Camera.look_at((2.0, -3.0, 2.5), (0.0, 0.0, 0.4), up=(0.0, 0.0, 1.0), width=80, height=60)
    out = render(scene, Cameras(camera.camtoworld[None], camera.K[None], 80, 60))
    v, u = np.meshgrid(np.arange(60) + 0.5, np.arange(80) + 0.5, indexing="ij")
    K, c2w = camera.K.double().numpy(), camera.camtoworld.double().numpy()
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ c2w[:3, :3].T
    oc = c2w[:3, 3] - np.array(scene.objects[0].centre)
    a, b = (rays * rays).sum(-1), (rays * oc).sum(-1)
    disc = b * b - a * ((oc * oc).sum() - 0.6**2)
    hit = disc > 0
    t = (-b - np.sqrt(np.where(hit, disc, 0))) / a  # camera z, since rays have camera z = 1
    ours = out.object_ids[0].numpy() == 1
    assert (ours != hit).sum() <= 2 and ours.sum() > 300  # at most a grazing pixel or two differ
    both = ours & hit
    np.testing.assert_allclose(out.depth[0].numpy()[both], t[both], atol=2e-5, rtol=0)


def test_lighting_is_lambertian_with_shadows():
    scene = _one_object("sphere")
    camera = Camera.look_at((0.0, -6.0, 3.0), (0.0, 0.0, 0.35), up=(0.0, 0.0, 1.0), width=64, height=64)
    cameras = Cameras(camera.camtoworld[None], camera.K[None], 64, 64)
    lit, unlit = render(scene, cameras), render(scene, cameras, WorldConfig(shadows=False))
    ground = lit.object_ids[0] == 0
    assert (lit.rgb[0][:, ground] <= unlit.rgb[0][:, ground] + 1e-7).all()  # shadows only darken
    assert (lit.rgb[0][:, ground] < unlit.rgb[0][:, ground] - 0.05).any()  # and the sphere casts one
    red = lit.rgb[0][:, lit.object_ids[0] == 1]
    assert (red[0] > red[1] + 0.02).all() and red[0].max() > 2 * red[0].min()  # red, shaded


# --- scenes, captions, relations ----------------------------------------------------------------

def test_relations_hold_in_the_first_frame(train_scenes, heldout_scenes):
    for scene in train_scenes[:300] + heldout_scenes:
        cameras = orbit_cameras(scene.orbit, 64, 64)
        proj = _project(cameras, np.array([o.centre for o in scene.objects]))
        for rel in scene.relations:
            s, o = proj[rel.subject], proj[rel.object]
            below, above = scene.objects[rel.object], scene.objects[rel.subject]
            assert {"left_of": s[0] < o[0], "right_of": s[0] > o[0], "in_front_of": s[2] < o[2],
                    "behind": s[2] > o[2],
                    "on_top_of": above.position[2] == pytest.approx(below.top) and s[1] < o[1]
                    and math.dist(above.position[:2], below.position[:2]) < 1e-9}[rel.relation], (scene.caption, rel)


_CAPTION_RELATIONS = (("left", "left_of"), ("right", "right_of"), ("front", "in_front_of"), ("behind", "behind"),
                      ("back", "behind"), ("under", "under"), ("below", "under"), ("beneath", "under"),
                      ("underneath", "under"), ("on", "on_top_of"))


def test_two_object_captions_say_what_frame_0_shows(train_scenes):
    """Read the caption alone (colours name the objects) and check it against frame 0's projection."""
    checked = set()
    for scene in train_scenes:
        if len(scene.objects) != 2:
            continue
        words = scene.caption.split()
        colours = [w for w in words if w in COLOURS]
        relation = next(rel for key, rel in _CAPTION_RELATIONS if key in words)
        if words[0] not in ("a", "an", "there"):  # "left of a blue cone there is a red cube"
            colours = colours[::-1]
        by_colour = {o.colour: i for i, o in enumerate(scene.objects)}
        proj = _project(orbit_cameras(scene.orbit, 64, 64), np.array([o.centre for o in scene.objects]))
        s, o = proj[by_colour[colours[0]]], proj[by_colour[colours[1]]]
        assert {"left_of": s[0] < o[0], "right_of": s[0] > o[0], "in_front_of": s[2] < o[2],
                "behind": s[2] > o[2], "on_top_of": s[1] < o[1], "under": s[1] > o[1]}[relation], scene.caption
        checked.add(relation)
    assert checked == {"left_of", "right_of", "in_front_of", "behind", "on_top_of", "under"}


def test_captions_name_every_object_in_the_vocabulary(train_scenes, heldout_scenes):
    for scene in train_scenes + heldout_scenes:
        words = scene.caption.split()
        assert set(words) <= set(VOCABULARY), scene.caption
        for obj in scene.objects:
            assert obj.colour in words and set(SHAPE_WORDS[obj.shape]) & set(words), scene.caption
    captions = {s.caption for s in train_scenes}
    assert len(captions) > 0.95 * len(train_scenes)
    starts = {c.split()[0] for c in captions}
    assert {"a", "an", "there"} < starts and len(starts) > 5  # relation-first phrasings too
    counts = np.bincount([len(s.objects) for s in train_scenes], minlength=4)
    assert counts[1] > 50 and counts[2] > 100 and counts[3] > 100, counts


def test_scene_graph_round_trips_through_json(train_scenes):
    for scene in train_scenes[:20]:
        assert SceneGraph.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    config = WorldConfig(orbit_span_deg=90.0, elevation_deg=(30.0, 35.0))
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError):
        WorldConfig(orbit_span_deg=400.0)
    with pytest.raises(Vist3AInputError):
        sample_scene(0, "test")
    with pytest.raises(Vist3AInputError):
        WorldDataset("train", height=0)


# --- held-out compositions ----------------------------------------------------------------------

def test_heldout_split_is_clean(train_scenes, heldout_scenes):
    assert not any(uses_heldout(s.objects, s.relations) for s in train_scenes)
    assert all(uses_heldout(s.objects, s.relations) for s in heldout_scenes)
    assert {s.split for s in train_scenes} == {"train"} and {s.split for s in heldout_scenes} == {"heldout"}


def test_heldout_rule_leaves_every_attribute_in_training():
    compositions = heldout_compositions()
    assert len(compositions) >= 64 and len(set(compositions)) == len(compositions)
    assert all(is_heldout_composition(c) for c in compositions)
    for shape in SHAPES:
        assert sum(not is_heldout_object(c, shape) for c in COLOURS) >= 6
    for colour in COLOURS:
        assert sum(not is_heldout_object(colour, s) for s in SHAPES) >= 2
    a, b = ("red", "cube"), ("blue", "sphere")  # a mirror phrasing is the same composition
    assert canonical_triple(a, "left_of", b) == canonical_triple(b, "right_of", a)
    assert canonical_triple(a, "behind", b) == canonical_triple(b, "in_front_of", a)


# --- cameras -----------------------------------------------------------------------------------

def test_orbit_cameras_circle_the_target(train_scenes):
    config = WorldConfig()
    for scene in train_scenes[:20]:
        cameras = orbit_cameras(scene.orbit, 96, 64)
        c2w = cameras.camtoworld.double()
        assert len(cameras) == 13 and cameras.width == 96 and cameras.height == 64
        R, eye = c2w[:, :3, :3], c2w[:, :3, 3]
        target = torch.tensor(scene.orbit.target, dtype=torch.float64)
        torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(13, 3, 3),
                                   atol=1e-6, rtol=0)
        assert torch.allclose(torch.linalg.det(R), torch.ones(13, dtype=torch.float64), atol=1e-6)
        offset = eye - target
        torch.testing.assert_close(offset.norm(dim=1), torch.full((13,), config.camera_distance, dtype=torch.float64))
        torch.testing.assert_close(R[:, :, 2], -offset / offset.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)
        assert (R[:, 2, 1] < 0).all()  # image down points down in the world (z up)
        elevation = torch.rad2deg(torch.asin(offset[:, 2] / config.camera_distance))
        torch.testing.assert_close(elevation, elevation[:1].expand(13), atol=1e-4, rtol=0)
        azimuth = torch.atan2(offset[:, 1], offset[:, 0])
        steps = torch.rad2deg(torch.remainder(azimuth[1:] - azimuth[:-1], 2 * math.pi))
        torch.testing.assert_close(steps, torch.full((12,), config.orbit_span_deg / 12, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        u, v, _ = _project(cameras, np.array([scene.orbit.target]))[0]
        assert u == pytest.approx(48.0, abs=1e-3) and v == pytest.approx(32.0, abs=1e-3)
        assert torch.allclose(cameras.K[:, 0, 0], cameras.K[:, 1, 1])


# --- the data set: determinism, layout, cache, speed ---------------------------------------------

def _assert_same_sample(a: dict, b: dict) -> None:
    for key in ("video", "depth", "object_ids", "camtoworld", "intrinsics"):
        assert torch.equal(a[key], b[key]), key
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"]


def test_same_seed_same_arrays():
    first, second = WorldDataset("train", seed=3, length=3), WorldDataset("train", seed=3, length=3)
    for a, b in zip(first, second):
        _assert_same_sample(a, b)
    assert sample_scene(12345) == sample_scene(12345)
    other = WorldDataset("train", seed=4).sample(0)
    assert other["caption"] != first.sample(0)["caption"] or not torch.equal(other["video"], first.sample(0)["video"])


def test_sample_layout_and_worker_sharding():
    dataset = WorldDataset("heldout", seed=1, height=48, width=80, start=5, length=4)
    sample = dataset.sample(5)
    assert sample["video"].shape == (3, 13, 48, 80) and sample["video"].dtype == torch.float32
    assert -1.0 <= float(sample["video"].min()) and float(sample["video"].max()) <= 1.0
    assert sample["depth"].shape == (13, 48, 80) and sample["object_ids"].shape == (13, 48, 80)
    assert sample["camtoworld"].shape == (13, 4, 4) and sample["intrinsics"].shape == (13, 3, 3)
    assert isinstance(sample["cameras"], Cameras) and sample["scene"]["split"] == "heldout"
    ids = set(sample["object_ids"].unique().tolist())
    assert ids == set(range(len(sample["scene"]["objects"]) + 1))  # every object shows up
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_world)
    batches = list(loader)
    assert sorted(i for b in batches for i in b["index"]) == [5, 6, 7, 8]
    assert batches[0]["video"].shape == (2, 3, 13, 48, 80)
    by_index = {i: (b, k) for b in batches for k, i in enumerate(b["index"])}
    batch, k = by_index[5]
    assert torch.equal(batch["video"][k], sample["video"]) and batch["caption"][k] == sample["caption"]


@pytest.mark.parametrize("policy, kept", [("stop", [0, 1]), ("lru", [4, 5])])  # stop keeps the first, lru the latest
def test_cache_respects_the_cap_and_changes_nothing(tmp_path, policy, kept):
    fresh = WorldDataset("train", seed=2, length=6)
    probe = WorldDataset("train", seed=2, length=1, cache_dir=tmp_path / "probe")
    probe.sample(0)
    cap = int(2.5 * probe.cache.size_bytes())  # room for two samples (they differ by a few bytes of JSON)
    cached = WorldDataset("train", seed=2, length=6, cache_dir=tmp_path / policy, cache_max_bytes=cap,
                          cache_policy=policy)
    for a, b in zip(fresh, cached):
        _assert_same_sample(a, b)
        assert cached.cache.size_bytes() <= cap
    assert {f.stem for f in (tmp_path / policy).glob("*.npz")} == {cached.cache_key(i) for i in kept}
    for a, b in zip(fresh, cached):  # a second epoch: hits and misses give the same samples
        _assert_same_sample(a, b)
    assert cached.cache.size_bytes() <= cap
    (tmp_path / policy / f"{cached.cache_key(kept[-1])}.npz").write_bytes(b"truncated")  # reads as a miss
    _assert_same_sample(cached.sample(kept[-1]), fresh.sample(kept[-1]))


def test_render_speed_sanity(train_scenes):
    """Not a timed assertion: prints the throughput (target <= ~50 ms per 64x64 frame)."""
    scenes = train_scenes[:10]
    cameras = [orbit_cameras(s.orbit, 64, 64) for s in scenes]
    render(scenes[0], cameras[0])
    start = time.perf_counter()
    for scene, cams in zip(scenes, cameras):
        render(scene, cams)
    per_clip = (time.perf_counter() - start) / len(scenes)
    start = time.perf_counter()
    for seed in range(10):
        WorldDataset("train", seed=seed).sample(0)
    per_sample = (time.perf_counter() - start) / 10
    print(f"\nworld render: {1e3 * per_clip / 13:.2f} ms per 64x64 frame, {1 / per_clip:.1f} clips/s; "
          f"full sample (scene + render + tensors): {1e3 * per_sample:.1f} ms")
    assert per_clip < 60.0  # only catches a pathological slowdown (a minute per clip)
