"""The tiny random model writer: official layout, loadable by every consumer, deterministic."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import vist3a_rt  # noqa: E402
from vist3a_rt.errors import ConfigError  # noqa: E402
from vist3a_rt.testing import OFFICIAL_NEGATIVE_PROMPT, ORBIT_PROMPT_TEMPLATE, write_tiny_model  # noqa: E402
from vist3a_rt.testing.tiny_model import main  # noqa: E402

from conftest import fixture_dir  # noqa: E402

WEIGHT_FILES = ("anysplat/model.safetensors", "anysplat_stitched.pth", "lora/adapter_model.safetensors",
                "wan/text_encoder/model.safetensors", "wan/transformer/diffusion_pytorch_model.safetensors",
                "wan/vae/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- layout -----------------------------------------------------------------------------------


def test_layout_matches_the_official_fixture_folder(model):
    official = fixture_dir("e2e_tiny") / "model"
    assert set(file_hashes(model)) == set(file_hashes(official))
    ours, theirs = read_json(model / "wan/model_index.json"), read_json(official / "wan/model_index.json")
    assert ours == theirs  # same keys, same component classes, same pipeline flags


@pytest.mark.parametrize("config", ["wan/transformer/config.json", "wan/vae/config.json",
                                    "wan/scheduler/scheduler_config.json", "wan/tokenizer/tokenizer_config.json",
                                    "anysplat/config.json"])
def test_component_configs_are_the_fixtures(model, config):
    assert read_json(model / config) == read_json(fixture_dir("e2e_tiny") / "model" / config)


def test_weights_have_the_official_names_and_shapes(model):
    """At the default sizes every tensor matches the fixture's by name and shape (the text
    encoder's embedding table excepted: its vocabulary is our tokenizer's)."""
    from safetensors import safe_open

    official = fixture_dir("e2e_tiny") / "model"
    for name in WEIGHT_FILES:
        if name.endswith(".pth"):
            ours, theirs = (_flat_shapes(torch.load(root / name, weights_only=True)) for root in (model, official))
        else:
            ours, theirs = ({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                            for f in (safe_open(model / name, "pt"), safe_open(official / name, "pt")))
        if "text_encoder" in name:
            ours.pop("shared.weight"), theirs.pop("shared.weight")
        assert ours == theirs, name


def _flat_shapes(checkpoint: dict) -> dict:
    flat = {}
    for key, value in checkpoint.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        flat.update({f"{key}.{k}".rstrip("."): tuple(v.shape) for k, v in items})
    return flat


def test_text_encoder_vocabulary_is_the_tokenizer(model):
    tokenizer = read_json(model / "wan/tokenizer/tokenizer.json")
    assert read_json(model / "wan/text_encoder/config.json")["vocab_size"] == len(tokenizer["model"]["vocab"])
    assert [t["content"] for t in tokenizer["added_tokens"]] == ["<pad>", "</s>", "<unk>"]


# --- loading ----------------------------------------------------------------------------------


def test_stitched_decoder_loads_and_predicts_finite_gaussians(model):
    decoder = vist3a_rt.load_stitched_decoder(model / "vist3a.json", model / "anysplat",
                                              model / "anysplat_stitched.pth")
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 4, 6, 6, generator=generator)
    frames = torch.rand(1, 3, 13, 42, 42, generator=generator) * 2 - 1
    with torch.no_grad():
        out = decoder(latent, frames)
    assert out.num_gaussians == [13 * 42 * 42]
    assert out.means.shape == (1, 13 * 42 * 42, 3)
    for name in ("means", "covariances", "harmonics", "opacities", "scales", "rotations"):
        assert torch.isfinite(getattr(out, name)).all(), name
    # the camera head was made sane: rotations near identity, field of view near 1 rad
    rotations = out.extrinsics[0, :, :3, :3]
    assert (rotations.diagonal(dim1=-2, dim2=-1).sum(-1) > 2.5).all()
    focal = out.intrinsics[0, :, 0, 0]  # fx / W = 0.5 / tan(fov / 2)
    assert ((focal > 0.6) & (focal < 1.4)).all()


def test_wan_pipeline_and_lora_load_offline(model, monkeypatch):
    from diffusers import WanPipeline
    from peft import PeftModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pipe = WanPipeline.from_pretrained(model / "wan", local_files_only=True)
    for text in (ORBIT_PROMPT_TEMPLATE.format(prompt="a red cube on a wooden table"), OFFICIAL_NEGATIVE_PROMPT):
        ids = pipe.tokenizer(text).input_ids
        assert ids[-1] == 1 and 2 not in ids  # eos appended, no <unk>: the tokenizer knows these words
    prompt, negative = pipe.encode_prompt(ORBIT_PROMPT_TEMPLATE.format(prompt="a red cube"), OFFICIAL_NEGATIVE_PROMPT,
                                          max_sequence_length=64)
    latents, timestep = torch.randn(1, 16, 4, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([999])
    with torch.no_grad():
        cond = pipe.transformer(latents, timestep, prompt, return_dict=False)[0]
        uncond = pipe.transformer(latents, timestep, negative, return_dict=False)[0]
        adapted = PeftModel.from_pretrained(pipe.transformer, model / "lora")
        with_lora = adapted(latents, timestep, prompt, return_dict=False)[0]
    assert _relative_rms(cond, uncond) > 0.05  # the text conditioning matters
    assert _relative_rms(cond, with_lora) > 0.05  # so does the LoRA (its B is non-zero)


def _relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()


def test_other_sizes_load_and_run(tmp_path):
    path = write_tiny_model(tmp_path / "model", embed_dim=16, resolution=32, feedforward_resolution=28,
                            num_frames=9, with_lora=False)
    assert not (path / "lora").exists()
    decoder = vist3a_rt.load_stitched_decoder(path / "vist3a.json", path / "anysplat", path / "anysplat_stitched.pth")
    with torch.no_grad():
        out = decoder(torch.randn(1, 16, 3, 4, 4), torch.rand(1, 3, 9, 28, 28) * 2 - 1)
    assert out.num_gaussians == [9 * 28 * 28] and torch.isfinite(out.means).all()


# --- determinism, atomic writes, errors, CLI ---------------------------------------------------


def test_same_seed_gives_identical_files(model, tmp_path):
    again = write_tiny_model(tmp_path / "again", seed=0)
    assert file_hashes(again) == file_hashes(model)


def test_different_seed_changes_every_weight_file_and_no_lora_drops_only_the_adapter(model, tmp_path):
    assert main([str(tmp_path / "other"), "--seed", "1", "--no-lora"]) == 0
    ours, other = file_hashes(model), file_hashes(tmp_path / "other")
    assert set(ours) - set(other) == {"lora/adapter_config.json", "lora/adapter_model.safetensors"}
    for name in WEIGHT_FILES:
        if name in other:
            assert other[name] != ours[name], name


def test_existing_folder_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_tiny_model(target)
    assert main([str(target)]) == 2
    assert (target / "keep.txt").read_text() == "mine"
    write_tiny_model(target, with_lora=False, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "vist3a.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folders left behind


@pytest.mark.parametrize("sizes, message", [
    ({"embed_dim": 12}, "multiple of 8"),
    ({"resolution": 40}, "multiple of 16"),
    ({"feedforward_resolution": 48}, "14 px per stitched token"),
    ({"num_frames": 12}, "4\\*k \\+ 1"),
])
def test_bad_sizes_are_rejected_before_writing(tmp_path, sizes, message):
    with pytest.raises(ConfigError, match=message):
        write_tiny_model(tmp_path / "model", **sizes)
    assert list(tmp_path.iterdir()) == []


def test_global_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_tiny_model(tmp_path / "model", with_lora=False)
    assert torch.equal(torch.rand(3), expected)
