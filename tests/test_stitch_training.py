"""``stitch`` distillation on the tiny fixture network: losses fall, and the saved checkpoint is
an official ``anysplat_stitched.pth`` that our loader merges back to the same network."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
import vist3a_rt as vr
from vist3a_rt.training.lora import add_lora, lora_state_dict, merge_lora_layers
from vist3a_rt.training.stitch import StitchSettings, StitchTrainer, build_student, gradient_loss_multi_scale

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fixture():
    folder = fixture_dir("anysplat_stitched_tiny")
    search = load_file(str(folder / "io_layer_search.safetensors"))
    frames = search["videos.feedforward_image_uint8"][:3].float() / 127.5 - 1  # [3, 3, 13, 42, 42]
    return {"folder": folder, "frames": frames, "latent": search["vae.latent_sample_fp32"][:3],
            "init": {"weight": search["fit.enc_blocks_2.weight"], "bias": search["fit.enc_blocks_2.bias"]}}


def _teacher(fixture):
    folder = fixture["folder"]
    return vr.load_reconstruction_model(folder / "config.json", folder / "anysplat_base.safetensors")


def test_student_starts_as_the_teacher_cut(fixture):
    teacher = _teacher(fixture)
    student = build_student(teacher, fixture["init"])
    dino_t, dino_s = teacher.encoder.aggregator.patch_embed, student.encoder.aggregator.patch_embed
    assert len(dino_s.blocks) == len(dino_t.blocks) - 2
    assert torch.equal(dino_s.blocks[0].attn.qkv.weight, dino_t.blocks[2].attn.qkv.weight)
    assert torch.equal(student.stitching_layer.weight, fixture["init"]["weight"])


def test_distillation_lowers_the_loss_and_saves_an_official_checkpoint(fixture, tmp_path):
    torch.manual_seed(0)
    teacher = _teacher(fixture)
    trainer = StitchTrainer(teacher, build_student(teacher, fixture["init"]), StitchSettings(lr=3e-4))
    batch = (fixture["latent"][:2], fixture["frames"][:2])
    losses = [trainer.step(*batch)["total"] for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 0.057 -> 0.031
    random_init = StitchTrainer(teacher, build_student(teacher, None), StitchSettings(lr=3e-4))
    assert random_init.step(*batch)["total"] > losses[0]  # the layer-search init starts closer
    trainable = {n for n, p in trainer.student.named_parameters() if p.requires_grad}
    assert all(("lora_" in n or n.endswith(".bias") or n.startswith("stitching_layer")
                or n.rsplit(".", 1)[-1] in ("cls_token", "register_tokens", "mask_token")) for n in trainable)

    path = trainer.save(tmp_path / "anysplat_stitched.pth")
    folder = fixture["folder"]
    loaded = vr.load_stitched_decoder(folder / "config.json", folder / "anysplat_base.safetensors", path)
    trainer.student.eval()
    with torch.no_grad():
        ours, theirs = trainer.student(*batch), loaded(*batch)
    torch.testing.assert_close(theirs.means, ours.means, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.extrinsics, ours.extrinsics, atol=1e-4, rtol=1e-4)


def test_lora_wrappers_start_at_identity_and_merge(fixture):
    teacher = _teacher(fixture)
    student = build_student(teacher, fixture["init"]).eval()
    batch = (fixture["latent"][:1], fixture["frames"][:1])
    with torch.no_grad():
        before = student(*batch).means
    spec = vr.DecoderConfig.load(fixture["folder"] / "config.json").stitching.lora_config
    from vist3a_rt.checkpoints.lora import parse_lora_spec
    names = add_lora(student, parse_lora_spec(spec))
    assert len(names) == 281  # the official target count for this network
    with torch.no_grad():
        torch.testing.assert_close(student(*batch).means, before, atol=0, rtol=0)  # B = 0 at start
        for name, module in student.named_modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_(0, 0.01)
        wrapped = student(*batch).means
        merge_lora_layers(student)
        torch.testing.assert_close(student(*batch).means, wrapped, atol=1e-5, rtol=1e-5)
    assert not lora_state_dict(student)


def test_gradient_loss_is_zero_for_equal_depths_and_positive_otherwise():
    depth = torch.rand(2, 5, 8, 8, 1)
    assert gradient_loss_multi_scale(depth, depth).item() == 0
    assert gradient_loss_multi_scale(depth + torch.rand_like(depth), depth).item() > 0
