"""Attention throughput on a GPU: the Triton flash-attention kernel against torch SDPA.

Scenario: the attention calls of the official models at their real shapes -- the stitched
decoder's frame and global layers (head dim 64, 2D RoPE, 13 frames of 32x32 patches + 5 special
tokens) and Wan 2.1's self-attention (head dim 128; 1.3B at 512^2 / 13 frames, 14B at 480p /
81 frames) -- plus a plain sweep over sequence length and head dim. Baseline, in the same run:
``F.scaled_dot_product_attention`` (whichever backend torch picks: flash / efficient / cuDNN),
with RoPE applied by the torch reference before it where the scenario has RoPE -- what the
model runs when ``VIST3A_ATTENTION`` is not "triton".

Reports TFLOP/s (forward 4 B H Nq Nk D flops, two matmuls; backward 2.5x that: five matmuls)
and median ms from ``triton.testing.do_bench``, and the max |Triton - SDPA| of each output,
so a fast wrong kernel cannot pass. Needs CUDA and triton; elsewhere it says so and exits 0.

``--wan``: instead, Wan's denoiser end to end at the block level -- a random-weight
``WanTransformer3DModel`` with the official block sizes (1.3B: 1536 wide, 12 heads; 14B: 5120
wide, 40 heads; head dim 128, 4096-dim text, 512 text tokens) and ``--wan-layers`` blocks,
in bfloat16 as ``from_pretrained(torch_dtype=bfloat16)`` loads it, one inference forward with
diffusers' SDPA processors and with ours (``vist3a_rt.generator.attention``: fused 3D RoPE).
Reports ms per forward and per block, the speedup, and max |ours - SDPA| relative to the
output's scale (and tokens/s in the JSON).

    python benchmarks/attention.py [--dtypes bf16 fp16] [--modes fwd fwd+bwd] [--quick] [--json out.json]
    python benchmarks/attention.py --wan [--wan-layers 2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DECODER_TOKENS = 32 * 32 + 5  # patches + camera / register tokens per frame
# (name, B, H, N, D, rope): batch, heads, tokens, head dim
SCENARIOS = [
    ("decoder frame attention", 13, 16, DECODER_TOKENS, 64, "2d"),
    ("decoder global attention", 1, 16, 13 * DECODER_TOKENS, 64, "2d"),
    ("Wan 1.3B 512^2 x 13 frames (CFG)", 2, 12, 4 * 32 * 32, 128, None),
    ("Wan 14B 480p x 81 frames", 1, 40, 21 * 30 * 52, 128, None),
] + [(f"sweep N={n} D={d}", max(1, 16384 // n), 16, n, d, None)
     for d in (64, 128) for n in (1024, 4096, 16384)]
QUICK = {"decoder frame attention", "Wan 1.3B 512^2 x 13 frames (CFG)", "sweep N=4096 D=64", "sweep N=4096 D=128"}


def flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    forward = 4.0 * B * H * N * N * D
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def measure(fn, mode: str, q, k, v, grad) -> float:
    """Median milliseconds of one forward (or forward + backward) call."""
    from triton.testing import do_bench

    if mode == "fwd":
        return do_bench(lambda: fn(q, k, v))

    def step():
        out = fn(q, k, v)
        out.backward(grad)

    return do_bench(step, grad_to_none=[q, k, v])


def run_scenario(name, B, H, N, D, rope_kind, dtype, mode):
    import torch
    import torch.nn.functional as F
    from vist3a_rt.kernels import triton_attention as ta

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    need_grad = mode == "fwd+bwd"
    q, k, v = (t.requires_grad_(need_grad) for t in (q, k, v))
    rope = None
    if rope_kind == "2d":
        frame = ta.wan_positions(1, 32, 32, device="cuda")[:, 1:]  # (row, col) per patch
        positions = torch.cat([torch.zeros(5, 2, device="cuda", dtype=frame.dtype), frame + 1])
        rope = ta.Rope.axial_2d(positions.repeat(N // DECODER_TOKENS, 1)[None].expand(B, N, 2), D)

    def triton_fn(q, k, v):
        return ta.flash_attention(q, k, v, rope=rope)

    def sdpa_fn(q, k, v):
        if rope is not None:
            q, k = ta.rope_reference(q, rope), ta.rope_reference(k, rope)
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        error = (triton_fn(q, k, v).float() - sdpa_fn(q, k, v).float()).abs().max().item()
    row = {"scenario": name, "B": B, "H": H, "N": N, "D": D, "rope": rope_kind or "-", "dtype": str(dtype)[6:],
           "mode": mode, "max_abs_diff": error}
    for label, fn in (("triton", triton_fn), ("sdpa", sdpa_fn)):
        try:
            ms = measure(fn, mode, q, k, v, grad)
        except torch.cuda.OutOfMemoryError:
            ms = float("nan")
            torch.cuda.empty_cache()
        row[f"{label}_ms"] = ms
        row[f"{label}_tflops"] = flops(B, H, N, D, mode) / (ms * 1e-3) / 1e12
    row["ratio"] = row["triton_tflops"] / row["sdpa_tflops"]
    return row


# (name, width, heads, ffn width, batch, latent frames, latent height, latent width)
WAN_SCENARIOS = [
    ("Wan 1.3B 512^2 x 13 frames (CFG)", 1536, 12, 8960, 2, 4, 64, 64),
    ("Wan 14B 480p x 81 frames", 5120, 40, 13824, 1, 21, 60, 104),
]
WAN_QUICK = {"Wan 1.3B 512^2 x 13 frames (CFG)"}


def wan_transformer(width: int, heads: int, ffn: int, layers: int):
    """Random Wan 2.1 T2V transformer on CUDA, bfloat16 except ``_keep_in_fp32_modules``."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("cuda"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=width // heads, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    keep = set(model._keep_in_fp32_modules)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(torch.bfloat16)
    return model


def run_wan_scenario(name, width, heads, ffn, batch, frames, height, width_latent, layers):
    import torch
    from triton.testing import do_bench
    from vist3a_rt.generator.attention import use_triton_attention

    model = wan_transformer(width, heads, ffn, layers)
    gen = torch.Generator(device="cuda").manual_seed(0)
    latents = torch.randn(batch, 16, frames, height, width_latent, device="cuda", generator=gen).bfloat16()
    text = torch.randn(batch, 512, 4096, device="cuda", generator=gen).bfloat16()
    timestep = torch.full((batch,), 500, device="cuda")
    tokens = frames * (height // 2) * (width_latent // 2)
    row = {"scenario": name, "width": width, "heads": heads, "layers": layers, "batch": batch, "tokens": tokens}
    outputs = {}
    for label, enabled in (("sdpa", False), ("triton", True)):
        choice = use_triton_attention(model, enabled=enabled)
        if choice.backend != label:
            raise RuntimeError(f"could not switch to {label}: {choice.reason}")
        with torch.no_grad():
            outputs[label] = model(latents, timestep, text, return_dict=False)[0].float()
            ms = do_bench(lambda: model(latents, timestep, text, return_dict=False))
        row[f"{label}_ms"] = ms
        row[f"{label}_block_ms"] = ms / layers
        row[f"{label}_tokens_per_s"] = batch * tokens / (ms * 1e-3)
    row["speedup"] = row["sdpa_ms"] / row["triton_ms"]
    scale = outputs["sdpa"].abs().max().item()
    row["max_rel_diff"] = (outputs["triton"] - outputs["sdpa"]).abs().max().item() / scale
    return row


WAN_HEADER = (f"{'scenario':34} {'tokens':>7} {'layers':>6} {'sdpa ms':>9} {'triton ms':>10} "
              f"{'sdpa ms/blk':>11} {'triton ms/blk':>13} {'speedup':>7} {'rel|diff|':>9}")


def format_wan_row(r: dict) -> str:
    return (f"{r['scenario']:34} {r['batch'] * r['tokens']:7d} {r['layers']:6d} {r['sdpa_ms']:9.2f} "
            f"{r['triton_ms']:10.2f} {r['sdpa_block_ms']:11.2f} {r['triton_block_ms']:13.2f} "
            f"{r['speedup']:7.2f} {r['max_rel_diff']:9.2e}")


HEADER = (f"{'scenario':34} {'dtype':8} {'mode':8} {'triton TFLOP/s':>14} {'sdpa TFLOP/s':>13} "
          f"{'ratio':>6} {'triton ms':>10} {'sdpa ms':>9} {'max|diff|':>9}")


def format_row(r: dict) -> str:
    return (f"{r['scenario']:34} {r['dtype']:8} {r['mode']:8} {r['triton_tflops']:14.1f} "
            f"{r['sdpa_tflops']:13.1f} {r['ratio']:6.2f} {r['triton_ms']:10.3f} {r['sdpa_ms']:9.3f} "
            f"{r['max_abs_diff']:9.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--quick", action="store_true", help="four scenarios only")
    parser.add_argument("--json", help="also write every row here")
    parser.add_argument("--wan", action="store_true",
                        help="Wan's denoiser forward with diffusers' SDPA processors vs ours instead")
    parser.add_argument("--wan-layers", type=int, default=2, help="transformer blocks in --wan models")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs CUDA (a GPU and a CUDA build of torch); "
              "none is visible here, so there is nothing to measure.")
        return 0
    try:
        import triton
    except ImportError:
        print("benchmarks/attention.py needs triton: pip install 'vist3a-rt[triton]'")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.wan:
        return run_wan(args)
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for dtype_name in args.dtypes:
        for mode in args.modes:
            for scenario in SCENARIOS:
                if args.quick and scenario[0] not in QUICK:
                    continue
                rows.append(run_scenario(*scenario, getattr(torch, DTYPES[dtype_name]), mode))
                print(format_row(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


def run_wan(args) -> int:
    import torch

    print(WAN_HEADER)
    print("-" * len(WAN_HEADER))
    rows = []
    for scenario in WAN_SCENARIOS:
        if args.quick and scenario[0] not in WAN_QUICK:
            continue
        rows.append(run_wan_scenario(*scenario, args.wan_layers))
        print(format_wan_row(rows[-1]), flush=True)
        torch.cuda.empty_cache()  # the scenario's model is gone: give its memory back
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "wan_rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
