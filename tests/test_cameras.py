import json

import pytest
import torch

from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.scene import Camera, Cameras


def _orbit(n: int = 3) -> Cameras:
    cams = [Camera.look_at((3 * torch.cos(torch.tensor(a)).item(), -1.0, 3 * torch.sin(torch.tensor(a)).item()),
                           (0, 0, 0), width=64, height=48) for a in torch.linspace(0, 3, n).tolist()]
    return Cameras(torch.stack([c.camtoworld for c in cams]), torch.stack([c.K for c in cams]), 64, 48)


def test_look_at_points_optical_axis_at_target():
    cam = Camera.look_at((0.0, -1.0, -4.0), (0.0, 0.0, 0.0), width=32, height=32)
    target_in_cam = cam.worldtocam @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert target_in_cam[:2].abs().max() < 1e-6 and target_in_cam[2] > 0  # straight ahead, in front
    rotation = cam.camtoworld[:3, :3]
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(3), atol=1e-6, rtol=0)


def test_from_normalized_scales_rows_by_image_size():
    K_norm = torch.tensor([[[0.9, 0.0, 0.5], [0.0, 1.1, 0.5], [0.0, 0.0, 1.0]]])
    cams = Cameras.from_normalized(torch.eye(4)[None], K_norm, width=40, height=30)
    expected = torch.tensor([[36.0, 0.0, 20.0], [0.0, 33.0, 15.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(cams.K[0], expected, atol=1e-5, rtol=0)


def test_json_round_trip(tmp_path):
    cams = _orbit()
    cams.save_json(tmp_path / "cameras.json")
    data = json.loads((tmp_path / "cameras.json").read_text())
    assert data["extrinsics"] == "camera_to_world" and data["convention"] == "opencv"
    assert len(data["frames"]) == 3 and {"camtoworld", "fx", "fy", "cx", "cy"} <= set(data["frames"][0])
    back = Cameras.load_json(tmp_path / "cameras.json")
    assert (back.width, back.height, len(back)) == (64, 48, 3)
    torch.testing.assert_close(back.camtoworld, cams.camtoworld, atol=0, rtol=0)
    torch.testing.assert_close(back.K, cams.K, atol=0, rtol=0)


def test_indexing_gives_single_views():
    cams = _orbit()
    view = cams[1]
    assert isinstance(view, Camera) and (view.width, view.height) == (64, 48)
    torch.testing.assert_close(view.camtoworld, cams.camtoworld[1])


@pytest.mark.parametrize("c2w, K, match", [
    (torch.eye(3), torch.eye(3), r"camtoworld must end in shape \[4, 4\]"),
    (torch.eye(4), torch.eye(4), r"K must end in shape \[3, 3\]"),
    (torch.full((4, 4), float("nan")), torch.eye(3), "camtoworld has non-finite values"),
])
def test_bad_camera_inputs(c2w, K, match):
    with pytest.raises(Vist3AInputError, match=match):
        Camera(c2w, K, 8, 8)


def test_bad_sizes_and_sequences():
    with pytest.raises(Vist3AInputError, match="image size must be positive"):
        Camera(torch.eye(4), torch.eye(3), 0, 8)
    with pytest.raises(Vist3AInputError, match="the same T"):
        Cameras(torch.eye(4).repeat(2, 1, 1), torch.eye(3).repeat(3, 1, 1), 8, 8)
    with pytest.raises(Vist3AInputError, match="not a cameras.json layout"):
        Cameras.from_json_dict({"frames": [{"fx": 1.0}]})
