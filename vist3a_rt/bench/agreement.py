"""How closely a backend's output follows torch eager's on the same prompt and seed."""

from __future__ import annotations

import math

from torch import Tensor


def tensor_agreement(output: Tensor, reference: Tensor) -> dict[str, float]:
    """Max |output − reference|, and that divided by max |reference| (the relative error)."""
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {list(output.shape)} vs reference {list(reference.shape)}")
    output, reference = output.detach().double().cpu(), reference.detach().double().cpu()
    max_abs = (output - reference).abs().max().item() if reference.numel() else 0.0
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)}


def psnr(image: Tensor, reference: Tensor, *, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (``inf`` when identical)."""
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {list(image.shape)} vs reference {list(reference.shape)}")
    mse = (image.detach().double().cpu() - reference.detach().double().cpu()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


# --- per stage: a bundle's graphs against the torch modules they were exported from ---------------


def stage_agreement(runtime, torch_model, *, seed: int = 7) -> dict[str, dict[str, float]]:
    """Max relative error of each output of each stage of ``runtime`` (a ``BundlePipeline``) against
    the eager module it was exported from (``export.contracts.model_stages(torch_model)``; so
    ``torch_model`` is the bundle on the torch backend, the library classes the export used), on
    the contract's sample inputs at its opt sizes; and ``denoiser_split``: the runtime's denoiser
    path (trimmed text → context graph → step graph) against the torch transformer's forward on
    the full, padded text embeddings of a real prompt pair (the check that the split is exact)."""
    from vist3a_rt.export.contracts import model_stages
    from vist3a_rt.export.spec import ExportContract

    references = model_stages(torch_model)
    errors = {}
    for name, entry in runtime.manifest["stages"].items():
        inputs = ExportContract.from_dict(entry["contract"]).sample_inputs("opt", seed=seed)
        expected = references[name].reference(inputs)
        got = runtime.backend.run(name, inputs)
        errors[name] = {key: tensor_agreement(got[key], value)["max_rel"] for key, value in expected.items()}
    errors["denoiser_split"] = {"velocity": denoiser_split_agreement(runtime, torch_model, seed=seed)}
    return errors


def denoiser_split_agreement(runtime, torch_model, *, seed: int = 7,
                             prompt: str = "a red cube left of a blue sphere") -> float:
    """Relative error of the runtime's context + step graphs against ``transformer(latents, t, text)``."""
    import torch

    from vist3a_rt.bundle import context as text_context
    from vist3a_rt.generator.text import OFFICIAL_NEGATIVE_PROMPT, wrap_prompt

    generator = torch_model.generator
    with torch.inference_mode():
        texts = [generator.encode_prompt([wrap_prompt(prompt)]),
                 generator.encode_prompt([OFFICIAL_NEGATIVE_PROMPT], allow_empty=True)]
        shape = runtime.latent_shape
        latents = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(seed))
        timestep = torch.full((2,), 700.0)
        expected = generator.transformer(hidden_states=latents, timestep=timestep,
                                         encoder_hidden_states=torch.cat(texts), return_dict=False)[0]
    parts = []
    for embedding in texts:
        trimmed, used = text_context.trim(embedding.float())
        parts.append((runtime.backend.run("denoiser_context", {"encoder_hidden_states": trimmed})["context"], used))
    context, log_counts = text_context.join(parts, texts[0].shape[1])
    got = runtime.backend.run("denoiser", {"latents": latents, "timestep": timestep, "context": context,
                                           "context_log_counts": log_counts})["velocity"]
    return tensor_agreement(got, expected)["max_rel"]
