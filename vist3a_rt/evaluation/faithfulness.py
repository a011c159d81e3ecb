"""Sections 4 and 5 of the report: text-to-3D on held-out compositions.

Each prompt (a held-out clip's caption) is generated with ``Vist3A.generate`` at seed
``seed + i``. The generated scene is rendered at its predicted cameras (``vist3a_rt.render``,
the decoder's background; pixels with accumulated opacity below 0.5 are left out of the check)
and its VAE-decoded frames are kept (already at the network size). Then:

4. *faithfulness*: ``AttributeChecker`` judges both image sets against the prompt's objects
   (``parse_world_prompt``): colour, shape, both, per prompt and as rates. ``render`` (the 3D
   result) is the headline; ``frames`` tells whether a failure comes from the video or the 3D.
5. *3D consistency*: PSNR between the renders at the predicted cameras and the decoded frames.

``compare`` puts a baseline's sections 4–5 (same prompts and seeds) beside the model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from ..pipeline.vist3a import Vist3A
from ..training.recon import psnr
from .attribute_check import AttributeChecker, CheckResult, parse_world_prompt, pass_rates
from .world_eval import render_scene

MIN_ALPHA = 0.5  # rendered pixels less opaque than this show the background, not the scene


@dataclass
class GeneratedPrompt:
    index: int
    prompt: str
    seed: int
    render_check: CheckResult
    frames_check: CheckResult
    consistency_psnr: float
    num_gaussians: int
    seconds: float

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "seed": self.seed,
                "render": self.render_check.to_dict(), "frames": self.frames_check.to_dict(),
                "consistency_psnr": self.consistency_psnr, "num_gaussians": self.num_gaussians,
                "seconds": self.seconds}


def generate_and_check(runtime: Vist3A, prompts: list[str], checker: AttributeChecker,
                       background: Tensor,  # [3] the decoder's render background
                       *, seed: int = 0, steps: int | None = None, log=None) -> list[GeneratedPrompt]:
    """Generate each prompt (seed ``seed + i``), judge its renders and decoded frames, measure consistency."""
    records = []
    for index, prompt in enumerate(prompts):
        objects = parse_world_prompt(prompt)
        start = time.perf_counter()
        result = runtime.generate(prompt, seed=seed + index, num_steps=steps)
        rendered, alpha = render_scene(result.scene, result.cameras, background)
        frames = (result.frames[0].float().transpose(0, 1) + 1) / 2  # [T, 3, H, W], the network size
        records.append(GeneratedPrompt(
            index=index, prompt=prompt, seed=seed + index,
            render_check=checker.check(rendered, objects, alpha >= MIN_ALPHA),
            frames_check=checker.check(frames, objects),
            consistency_psnr=float(psnr(rendered, frames).mean()), num_gaussians=len(result.scene),
            seconds=time.perf_counter() - start))
        if log is not None:
            r = records[-1].render_check
            log(f"  prompt {index + 1}/{len(prompts)}: colour {_mark(r.colour)} shape {_mark(r.shape)} "
                f"({records[-1].seconds:.1f} s) {prompt}")
    return records


def faithfulness_section(records: list[GeneratedPrompt], validation: dict, generation: dict) -> dict:
    """4. Pass rates on the renders (headline) and on the decoded frames, every prompt's verdicts,
    how the checker itself scores exact world renders (``validate_checker``), and the
    ``generation`` settings (steps, guidance, seed base)."""
    return {"num_prompts": len(records), "generation": generation,
            "rates": {"render": pass_rates([r.render_check for r in records]),
                      "frames": pass_rates([r.frames_check for r in records])},
            "checker_validation": validation,
            "prompts": [r.to_dict() for r in records]}


def consistency_section(records: list[GeneratedPrompt]) -> dict:
    """5. PSNR of the renders at the predicted cameras against the VAE-decoded frames."""
    values = [r.consistency_psnr for r in records]
    return {"num_prompts": len(values), "psnr_mean": sum(values) / len(values) if values else float("nan"),
            "psnr_min": min(values, default=float("nan")), "psnr_max": max(values, default=float("nan"))}


def compare(model: dict, baseline: dict) -> dict:
    """6. Baseline → model for the headline numbers of sections 4 and 5 (each a report's sections)."""
    rows = []
    for name, section, path in (("colour", "faithfulness", ("rates", "render", "colour")),
                                ("shape", "faithfulness", ("rates", "render", "shape")),
                                ("both", "faithfulness", ("rates", "render", "both")),
                                ("consistency_psnr", "consistency", ("psnr_mean",))):
        before, after = _get(baseline[section], path), _get(model[section], path)
        rows.append({"metric": name, "baseline": before, "model": after, "delta": after - before})
    return {"rows": rows}


def _get(tree: dict, path: tuple[str, ...]) -> float:
    for key in path:
        tree = tree[key]
    return tree


def _mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


__all__ = ["GeneratedPrompt", "compare", "consistency_section", "faithfulness_section", "generate_and_check"]
