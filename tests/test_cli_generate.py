"""``vist3a-rt generate`` on a tiny random model in the official on-disk layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vist3a_rt.cli import main
from vist3a_rt.scene import GaussianScene
from vist3a_rt.testing import write_tiny_model

FAST = ["--steps", "2", "--no-preview"]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "model", seed=3)


def test_generate_writes_scene_cameras_preview_and_meta(tiny_model, tmp_path):
    out = tmp_path / "cabin"
    args = ["generate", "a wooden cabin in the snow", "--model", str(tiny_model), "--out", str(out),
            "--steps", "2", "--preview-frames", "2", "--preview-size", "32"]
    assert main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files[:2] == ["cameras.json", "meta.json"] and files[2] in ("preview.gif", "preview.mp4")
    assert files[3] == "scene.ply" and len(files) == 4
    scene = GaussianScene.load_ply(out / "scene.ply")
    assert len(scene) == 13 * 42 * 42
    plyfile = pytest.importorskip("plyfile", reason="plyfile is in the [dev] extra")
    assert plyfile.PlyData.read(str(out / "scene.ply"))["vertex"].count == len(scene)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompt"] == "a wooden cabin in the snow" and meta["settings"]["num_steps"] == 2
    assert len(json.loads((out / "cameras.json").read_text())["frames"]) == 13


def test_same_seed_gives_byte_identical_ply(tiny_model, tmp_path):
    for name in ("a", "b"):
        assert main(["generate", "a red cube", "--model", str(tiny_model), "--out", str(tmp_path / name),
                     "--seed", "5", *FAST]) == 0
    assert (tmp_path / "a" / "scene.ply").read_bytes() == (tmp_path / "b" / "scene.ply").read_bytes()
    assert main(["generate", "a red cube", "--model", str(tiny_model), "--out", str(tmp_path / "c"),
                 "--seed", "6", *FAST]) == 0
    assert (tmp_path / "a" / "scene.ply").read_bytes() != (tmp_path / "c" / "scene.ply").read_bytes()


def test_prompts_file_gives_one_folder_per_prompt(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    assert main(["generate", "--prompts", str(prompts), "--model", str(tiny_model),
                 "--out", str(tmp_path / "runs"), "--seed", "10", *FAST]) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["000-a-red-cube", "001-a-blue-sphere"]
    seeds = [json.loads((tmp_path / "runs" / f / "meta.json").read_text())["seed"] for f in folders]
    assert seeds == [10, 11]


@pytest.mark.parametrize("extra, message", [
    (["--frames", "14"], r"num_frames must be 4k\+1 .* got 14"),
    (["--height", "50"], r"height must be a multiple of 16 .* got 50"),
    (["--steps", "0"], r"steps"),
    (["--guidance", "-1"], r"guidance"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--frames", "2"], r"not available|4k\+1"),
])
def test_bad_settings_exit_2_and_write_nothing(tiny_model, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["generate", "a cube", "--model", str(tiny_model), "--out", str(out), *FAST, *extra]) == 2
    assert not out.exists()
    assert re.search(message, capsys.readouterr().err)


def test_empty_prompt_and_missing_model_exit_2(tiny_model, tmp_path, capsys, monkeypatch):
    import vist3a_rt.models as models

    assert main(["generate", "   ", "--model", str(tiny_model), "--out", str(tmp_path / "x")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "a cube", "--model", str(tmp_path / "nowhere")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    # default model: the embedded one; an install without it says so
    monkeypatch.setattr(models, "embedded_model_dir", lambda name="nano": tmp_path / "no-package" / name)
    assert main(["generate", "a cube", "--out", str(tmp_path / "y")]) == 2
    assert "embedded model 'nano' is not installed" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_missing_piece_and_foreign_lora_exit_2(tiny_model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "anysplat_stitched.pth").unlink()
    assert main(["generate", "a cube", "--model", str(broken), *FAST]) == 2
    assert "anysplat_stitched.pth" in capsys.readouterr().err
    shutil.copy(tiny_model / "anysplat_stitched.pth", broken / "anysplat_stitched.pth")
    config_path = broken / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["attn9.to_q"]
    config_path.write_text(json.dumps(config))
    assert main(["generate", "a cube", "--model", str(broken), "--out", str(tmp_path / "y"), *FAST]) == 2
    assert "attn9.to_q" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_existing_output_is_kept_unless_overwrite(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["generate", "a cube", "--model", str(tiny_model), "--out", str(out), *FAST]) == 2
    assert (out / "keep.txt").exists() and "not empty" in capsys.readouterr().err
    assert main(["generate", "a cube", "--model", str(tiny_model), "--out", str(out), "--overwrite", *FAST]) == 0
    assert (out / "scene.ply").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupt_or_error_mid_run_leaves_no_output(tiny_model, tmp_path, monkeypatch, failure):
    from vist3a_rt.decoder.network import StitchedDecoder

    def explode(self, *args, **kwargs):
        raise failure("stop here")

    monkeypatch.setattr(StitchedDecoder, "forward", explode)
    out = tmp_path / "out"
    assert main(["generate", "a cube", "--model", str(tiny_model), "--out", str(out), *FAST]) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vist3a_rt.cli", "generate", "a cube", "--model", str(tiny_model),
                           "--frames", "6"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "4k+1" in proc.stderr
