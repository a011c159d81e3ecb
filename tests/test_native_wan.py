"""The native Wan modules (vist3a_rt.generator.native: transformer, UMT5 encoder, loading) against
diffusers / transformers on tiny random models saved in the released layout; refusals as CheckpointError.
The generator built from them: tests/test_native_generator.py.

Tolerances: float32 outputs within 1e-5 of the reference, relative to the reference's largest
magnitude; bfloat16 by STYLE.md's rule: the native module's error against the float32 reference is
at most 2x the library module's own bfloat16 error (+1e-3 of the output scale for ties at tiny
errors).
"""

import json
import shutil

import pytest
import torch

from vist3a_rt.errors import CheckpointError, Vist3AInputError
from vist3a_rt.generator.native.loading import load_text_encoder, load_transformer
from vist3a_rt.generator.native.transformer import WanTransformerConfig
from vist3a_rt.generator.native.umt5 import UMT5Config

pytestmark = pytest.mark.usefixtures("single_thread")

def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random init plus noise on every parameter (zero-initialised tables included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return module.eval()


# --- tiny diffusers / transformers references ---------------------------------------------------------

TRANSFORMER_CONFIGS = {
    "official-like": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, cross_attn_norm=True),
    "no-cross-norm, head 12, patch 2x2x2": dict(patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=12,
                                                cross_attn_norm=False),
}


def diffusers_transformer(name: str, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(in_channels=16, out_channels=16, text_dim=24, freq_dim=32, ffn_dim=40, num_layers=2,
                                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
                                  **TRANSFORMER_CONFIGS[name])
    return perturbed(model, seed)


@pytest.fixture(scope="module", params=list(TRANSFORMER_CONFIGS))
def transformer_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    diffusers_transformer(request.param).save_pretrained(folder)
    return folder


def transformer_inputs(config: WanTransformerConfig, batch: int = 2, grid=(2, 3, 5), text_tokens: int = 7):
    generator = torch.Generator().manual_seed(3)
    size = [g * p for g, p in zip(grid, config.patch_size)]
    return dict(hidden_states=torch.randn(batch, config.in_channels, *size, generator=generator),
                timestep=torch.tensor([999, 313])[:batch],
                encoder_hidden_states=torch.randn(batch, text_tokens, config.text_dim, generator=generator))


def run(model, inputs, dtype=torch.float32):
    cast = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**cast, return_dict=False)[0].float()


UMT5_CONFIGS = {
    "gated-gelu": dict(feed_forward_proj="gated-gelu", num_layers=2),
    "relu, short max distance": dict(feed_forward_proj="relu", num_layers=1, relative_attention_max_distance=8),
}


@pytest.fixture(scope="module", params=list(UMT5_CONFIGS))
def text_encoder_dir(request, tmp_path_factory):
    from transformers import UMT5Config as LibraryConfig
    from transformers import UMT5EncoderModel

    torch.manual_seed(1)
    model = UMT5EncoderModel(LibraryConfig(vocab_size=50, d_model=16, d_kv=4, num_heads=3, d_ff=24, dropout_rate=0.0,
                                           relative_attention_num_buckets=8, **UMT5_CONFIGS[request.param]))
    folder = tmp_path_factory.mktemp("text_encoder")
    perturbed(model, 1).save_pretrained(folder)
    return folder


def token_batch():
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 50, (2, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # a padded prompt next to a full one
    return ids.masked_fill(mask == 0, 0), mask


# --- the transformer -------------------------------------------------------------------------------


def test_transformer_matches_diffusers_fp32(transformer_dir):
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel.from_pretrained(transformer_dir).eval()
    native = load_transformer(transformer_dir)
    inputs = transformer_inputs(native.config)
    expected, actual = run(reference, inputs), run(native, inputs)
    assert relative_error(actual, expected) <= 1e-5
    assert native(**inputs).sample.shape == expected.shape  # diffusers' return_dict form


def test_text_context_computed_once_gives_the_same_prediction(transformer_dir):
    native = load_transformer(transformer_dir)
    inputs = transformer_inputs(native.config)
    with torch.no_grad():
        cached = native.text_context(inputs["encoder_hidden_states"])
        assert torch.equal(native(**inputs).sample, native(**{**inputs, "encoder_hidden_states": cached}).sample)
    with pytest.raises(Vist3AInputError, match="text batch 2 does not match hidden_states batch 1"):
        native(inputs["hidden_states"][:1], inputs["timestep"][:1], cached)


def test_transformer_bf16_within_twice_diffusers_error(transformer_dir):
    from diffusers import WanTransformer3DModel

    inputs = transformer_inputs(WanTransformerConfig.from_dict(json.loads((transformer_dir / "config.json").read_text())))
    exact = run(WanTransformer3DModel.from_pretrained(transformer_dir).eval(), inputs)
    reference = WanTransformer3DModel.from_pretrained(transformer_dir, torch_dtype=torch.bfloat16).eval()
    native = load_transformer(transformer_dir, dtype=torch.bfloat16)
    # the same parameters stay float32 (diffusers' _keep_in_fp32_modules)
    assert {n: p.dtype for n, p in native.named_parameters()} == {n: p.dtype for n, p in reference.named_parameters()}
    library_error = relative_error(run(reference, inputs, torch.bfloat16), exact)
    assert relative_error(run(native, inputs, torch.bfloat16), exact) <= 2 * library_error + 1e-3


def test_transformer_state_is_the_file(transformer_dir):
    from safetensors import safe_open

    native = load_transformer(transformer_dir)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in native.parameters())
    with safe_open(str(transformer_dir / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(native.state_dict())


# --- the text encoder ------------------------------------------------------------------------------


def test_umt5_matches_transformers_fp32(text_encoder_dir):
    from transformers import UMT5EncoderModel

    ids, mask = token_batch()
    with torch.no_grad():
        expected = UMT5EncoderModel.from_pretrained(text_encoder_dir).eval()(ids, mask).last_hidden_state
        native = load_text_encoder(text_encoder_dir)
        actual = native(ids, mask).last_hidden_state
    assert relative_error(actual, expected) <= 1e-5
    assert native.shared.weight is native.encoder.embed_tokens.weight  # the tie survives loading


def test_umt5_bf16_within_twice_transformers_error(text_encoder_dir):
    from transformers import UMT5EncoderModel

    ids, mask = token_batch()
    with torch.no_grad():
        exact = UMT5EncoderModel.from_pretrained(text_encoder_dir).eval()(ids, mask).last_hidden_state
        library = UMT5EncoderModel.from_pretrained(text_encoder_dir, dtype=torch.bfloat16).eval()(ids, mask)
        native = load_text_encoder(text_encoder_dir, dtype=torch.bfloat16)(ids, mask)
    library_error = relative_error(library.last_hidden_state, exact)
    assert relative_error(native.last_hidden_state, exact) <= 2 * library_error + 1e-3


# --- refusals ------------------------------------------------------------------------------------------


def _copy_with_config(folder, tmp_path, **changes):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("changes, message", [
    (dict(image_dim=1280), r"image-to-video .*impl='diffusers'"),
    (dict(added_kv_proj_dim=32), "image-to-video"),
    (dict(qk_norm="layer_norm"), "qk_norm 'layer_norm' is not supported"),
    (dict(window_size=[-1, -1]), r"unknown Wan transformer config keys \['window_size'\]"),
    (dict(num_layers=3), r"1 missing|missing \(e\.g\. \['blocks\.2"),
    (dict(ffn_dim=48), r"tensor blocks\.0\.ffn\.net\.0\.proj\.\w+ has shape \[40.*config.json gives \[48"),
])
def test_bad_transformer_config(transformer_dir, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_transformer(_copy_with_config(transformer_dir, tmp_path, **changes))


def test_bad_transformer_weights(transformer_dir, tmp_path):
    copy = _copy_with_config(transformer_dir, tmp_path)
    weights = copy / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_transformer(copy)
    weights.unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_transformer(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_transformer(copy)


def test_bad_text_encoder(text_encoder_dir, tmp_path):
    with pytest.raises(CheckpointError, match="feed_forward_proj 'gated-swish-x' is not supported"):
        load_text_encoder(_copy_with_config(text_encoder_dir, tmp_path, feed_forward_proj="gated-swish-x"))
    with pytest.raises(CheckpointError, match="model_type 't5'"):
        load_text_encoder(_copy_with_config(text_encoder_dir, tmp_path / "t5", model_type="t5"))
    with pytest.raises(CheckpointError, match=r"shape \[8, 3\], config.json gives \[16, 3\]"):
        load_text_encoder(_copy_with_config(text_encoder_dir, tmp_path / "buckets", relative_attention_num_buckets=16))


def test_config_dataclasses_reject_nonsense():
    with pytest.raises(Exception, match="patch_size"):
        WanTransformerConfig.from_dict({"patch_size": [1, 2]})
    with pytest.raises(Exception, match="num_heads"):
        UMT5Config.from_dict({"num_heads": 0})
