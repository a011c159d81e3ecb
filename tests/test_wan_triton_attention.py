"""Wan's denoiser on the Triton attention processor against diffusers' own (SDPA) processor.

Tiny random ``WanTransformer3DModel``s (the "micro" nano preset: 2 layers, 2 heads of 16
channels); without a GPU the processor is force-installed and its kernels run in Triton's
interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), with a GPU on CUDA. Token grids
are chosen so the kernel's 16-row blocks have ragged tails. Tolerances: float32 -- 1e-5
relative to the output's scale; bfloat16 -- STYLE.md's rule (error against the float32 model
at most twice that of the SDPA model in bfloat16). The compile test lowers every kernel the
processor launches, at every autotune config, to a sm_90 cubin with no GPU present.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'vist3a-rt[triton]')")
pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from vist3a_rt.errors import ConfigError
from vist3a_rt.generator import attention as wan_attention
from vist3a_rt.generator.attention import WanTritonAttnProcessor, use_triton_attention
from vist3a_rt.training.nano_models import NanoConfig, build_transformer

LATENT = (3, 6, 10)  # frames, height, width -> 3 x 3 x 5 = 45 tokens: 2 full blocks of 16 + 13
TEXT_TOKENS = 20


@pytest.fixture(scope="module")
def device():
    from vist3a_rt.kernels import triton_attention

    if not triton_attention.INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels")
    return "cpu" if triton_attention.INTERPRET else "cuda"


def micro_transformer(seed: int = 0, **changes):
    config = NanoConfig.from_name("micro")
    if not changes:
        return build_transformer(config, seed=seed).eval()
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    base = dict(build_transformer(config, seed=seed).config)
    return WanTransformer3DModel(**{**{k: v for k, v in base.items() if not k.startswith("_")}, **changes}).eval()


def denoiser_inputs(transformer, device, batch=2, text_tokens=TEXT_TOKENS, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, *LATENT, generator=g)
    text = torch.randn(batch, text_tokens, transformer.config.text_dim, generator=g)
    timestep = torch.tensor([700, 300][:batch])
    return latents.to(device, dtype), timestep.to(device), text.to(device, dtype)


def run(transformer, *inputs, **kwargs):
    with torch.no_grad():
        return transformer(*inputs, return_dict=False, **kwargs)[0]


def cast_like_from_pretrained(model, dtype):
    """``model`` in ``dtype`` except ``_keep_in_fp32_modules`` (as ``from_pretrained(torch_dtype=)``
    loads it: the RoPE tables, time embedder and norms stay float32)."""
    model = copy.deepcopy(model)
    keep = set(model._keep_in_fp32_modules)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model


def assert_relative_close(value, expected, tolerance):
    error = (value.float() - expected.float()).abs().max().item()
    assert error <= tolerance * expected.abs().max().item(), (error, expected.abs().max().item())


# ---------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("fused_projections", [False, True])
def test_transformer_float32_matches_sdpa(device, fused_projections):
    """Whole denoiser forward (self-attention with fused 3D RoPE, cross-attention on the text),
    CFG-like batch of 2 at different timesteps."""
    transformer = micro_transformer().to(device)
    if fused_projections:
        transformer.fuse_qkv_projections()
    inputs = denoiser_inputs(transformer, device)
    expected = run(transformer, *inputs)
    wan_attention.install_triton_attention(transformer)
    assert all(isinstance(p, WanTritonAttnProcessor) for p in transformer.attn_processors.values())
    assert_relative_close(run(transformer, *inputs), expected, 1e-5)
    wan_attention.install_default_attention(transformer)
    assert all(type(p) is WanAttnProcessor for p in transformer.attn_processors.values())
    assert torch.equal(run(transformer, *inputs), expected)


def test_image_to_video_branch_matches_sdpa(device):
    """I2V transformers (image tokens before 512 text tokens, ``add_k_proj``): the second,
    image-context attention is a Triton call too."""
    transformer = micro_transformer(num_layers=1, image_dim=8, added_kv_proj_dim=32).to(device)
    latents, timestep, text = denoiser_inputs(transformer, device, batch=1, text_tokens=512)
    image = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(5)).to(device)
    expected = run(transformer, latents, timestep, text, encoder_hidden_states_image=image)
    wan_attention.install_triton_attention(transformer)
    assert_relative_close(run(transformer, latents, timestep, text, encoder_hidden_states_image=image),
                          expected, 1e-5)


def test_untagged_rotary_tables_are_applied_in_torch(device):
    """A self-attention called with diffusers' plain (cos, sin) tables, not the tagged output of
    the transformer's ``rope``, rotates q and k in torch before the kernel: same result."""
    transformer = micro_transformer().to(device)
    attn = transformer.blocks[0].attn1
    latents, _, _ = denoiser_inputs(transformer, device)
    rotary = tuple(transformer.rope(latents))  # no hook installed: plain tables
    x = torch.randn(2, rotary[0].shape[1], 32, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        expected = WanAttnProcessor()(attn, x, None, None, rotary)
        torch.testing.assert_close(WanTritonAttnProcessor()(attn, x, None, None, rotary), expected,
                                   rtol=1e-5, atol=1e-5)
        wan_attention.install_triton_attention(transformer)
        tagged = transformer.rope(latents)
        assert tagged.rope.positions.shape == (1, rotary[0].shape[1], 3)
        torch.testing.assert_close(attn(x, None, None, tagged), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_within_twice_torch_error(device):
    transformer = micro_transformer(seed=1).to(device)
    latents, timestep, text = denoiser_inputs(transformer, device, seed=1)
    exact = run(transformer, latents, timestep, text)
    low = cast_like_from_pretrained(transformer, torch.bfloat16)
    low_inputs = (latents.bfloat16(), timestep, text.bfloat16())
    torch_low = run(low, *low_inputs)
    wan_attention.install_triton_attention(low)
    ours = run(low, *low_inputs)
    assert ours.dtype == torch.bfloat16
    error = (ours.float() - exact).abs().max().item()
    assert error <= 2 * (torch_low.float() - exact).abs().max().item(), error


def test_an_attention_mask_is_refused(device):
    transformer = micro_transformer().to(device)
    x = torch.randn(1, 8, 32).to(device)
    with pytest.raises(ValueError, match="takes no attention mask"):
        WanTritonAttnProcessor()(transformer.blocks[0].attn2, x, x, torch.ones(1, 1, 8, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------- the switch


def processor_types(transformer) -> set[type]:
    return {type(p) for p in transformer.attn_processors.values()}


def test_switch_off_keeps_sdpa(monkeypatch):
    monkeypatch.delenv("VIST3A_ATTENTION", raising=False)
    transformer = micro_transformer()
    choice = use_triton_attention(transformer)
    assert choice.backend == "sdpa" and "VIST3A_ATTENTION is not 'triton'" in choice.reason
    assert processor_types(transformer) == {WanAttnProcessor}


@pytest.mark.parametrize("how", ["environment", "argument"])
def test_cpu_keeps_sdpa_even_when_requested_and_says_why(monkeypatch, how):
    monkeypatch.setenv("VIST3A_ATTENTION", "triton" if how == "environment" else "sdpa")
    transformer = micro_transformer()
    choice = use_triton_attention(transformer, enabled=True if how == "argument" else None)
    assert choice.backend == "sdpa"
    assert choice.reason == ("Triton attention requested, but the transformer is on cpu and the Triton kernels "
                             "need CUDA")
    assert processor_types(transformer) == {WanAttnProcessor}
    assert type(transformer.rope(torch.zeros(1, 16, *LATENT))) is tuple  # no tagging hook


def test_switch_installs_and_removes_where_available(monkeypatch):
    """Where the checks pass (faked here: CPU), the Triton processors and the RoPE tag go in;
    ``enabled=False`` puts diffusers' processors back and removes the tag."""
    monkeypatch.setattr(wan_attention, "_why_not_triton", lambda transformer: "")
    transformer = micro_transformer()
    latents = torch.zeros(1, 16, *LATENT)
    assert use_triton_attention(transformer, enabled=True).backend == "triton"
    assert processor_types(transformer) == {WanTritonAttnProcessor}
    assert hasattr(transformer.rope(latents), "rope")
    assert use_triton_attention(transformer, enabled=True).backend == "triton"  # idempotent: one hook
    assert len(transformer.rope._forward_hooks) == 1
    assert use_triton_attention(transformer, enabled=False).backend == "sdpa"
    assert processor_types(transformer) == {WanAttnProcessor}
    assert type(transformer.rope(latents)) is tuple and not transformer.rope._forward_hooks


def test_switch_refuses_a_bad_setting(monkeypatch):
    monkeypatch.setenv("VIST3A_ATTENTION", "flash")
    with pytest.raises(ConfigError, match="must be 'sdpa' or 'triton', got 'flash'"):
        use_triton_attention(micro_transformer())


# ---------------------------------------------------------------------------- compiles for Hopper

COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vist3a_rt.generator.attention import aot_variants

part, parts, wanted = int(sys.argv[1]), int(sys.argv[2]), eval(sys.argv[3])
chosen = [v for v in aot_variants(head_dims=(64, 128), dtype="bf16")
          if "BLOCK_M" not in v["constexprs"] or (v["constexprs"]["BLOCK_M"], v["constexprs"]["BLOCK_N"]) in wanted]
for i, v in enumerate(chosen):
    if i % parts != part:
        continue
    kernel = triton.compile(ASTSource(v["fn"], v["signature"], v["constexprs"], v["attrs"]),
                            target=GPUTarget("cuda", 90, 32), options=v["options"])
    c = v["constexprs"]
    assert kernel.asm["cubin"] and "sm_90" in kernel.asm["ptx"], v["fn"].__name__
    assert kernel.metadata.shared <= 227 * 1024, (v["fn"].__name__, c, kernel.metadata.shared)
    print(v["fn"].__name__, c["HEAD_DIM"], c.get("ROPE", "-"), c.get("BLOCK_M", "-"), c["BLOCK_N"])
"""


def test_processor_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Self-attention with fused 3D RoPE, cross-attention, and the k rotation, bfloat16, head
    dims 64 and 128, at the smallest and the largest forward autotune tile (the largest is the
    one that tests shared memory): cubins for sm_90 in two fresh processes (interpreter off,
    empty cache). Every config was compiled once by hand (26 kernels, 90-135 s); the suite keeps
    the two extremes so that CI on a busy machine stays well inside its time limit."""
    from vist3a_rt.kernels.triton_attention import GPU_FORWARD_CONFIGS

    tiles = sorted({(m, n) for m, n, _, _ in GPU_FORWARD_CONFIGS}, key=lambda t: t[0] * t[1])
    wanted = {tiles[0], tiles[-1]}
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    parts = 2
    runs = [subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT, str(i), str(parts), repr(wanted)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(parts)]
    compiled = []
    for process in runs:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        compiled += [tuple(line.split()) for line in out.splitlines()]
    for head_dim in ("64", "128"):
        for rope in ("True", "False"):
            blocks = {(m, n) for name, d, r, m, n in compiled
                      if name == "_attn_fwd" and (d, r) == (head_dim, rope)}
            assert blocks == {(str(m), str(n)) for m, n in wanted}, (head_dim, rope, blocks)
        assert any(name == "_rope_kernel" and d == head_dim for name, d, *_ in compiled)
