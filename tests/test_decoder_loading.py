"""Loader internals: reduced-precision loads read through a scratch buffer must give exactly the
float32 weights cast, and every parameter must own its memory."""

import torch

from conftest import fixture_dir
import vist3a_rt as vr


def _load(dtype):
    folder = fixture_dir("anysplat_stitched_tiny")
    return vr.load_stitched_decoder(folder / "config.json", folder / "anysplat_base.safetensors",
                                    folder / "stitched_checkpoint.pth", dtype=dtype)


def test_bf16_weights_equal_fp32_weights_cast():
    fp32, bf16 = _load(torch.float32).state_dict(), _load(torch.bfloat16).state_dict()
    assert fp32.keys() == bf16.keys()
    for key, value in fp32.items():
        assert bf16[key].dtype == torch.bfloat16, key
        assert torch.equal(bf16[key], value.to(torch.bfloat16)), key


def test_parameters_do_not_share_memory():
    params = list(_load(torch.bfloat16).parameters())
    pointers = [p.untyped_storage().data_ptr() for p in params]
    assert len(set(pointers)) == len(pointers)  # no two weights alias one (scratch) buffer
