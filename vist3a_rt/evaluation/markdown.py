"""``render_markdown(report)``: the human-readable page of an evaluation report (``report.run_eval``).

Everything shown is read from the report dict, so ``report.md`` never says more than
``report.json`` holds.
"""

from __future__ import annotations

REPORT_TITLE = "VIST3A evaluation on held-out compositions"
TITLES = {"reconstruction": "1. Reconstruction network from RGB frames",
          "stitched": "2. Stitched decoder from VAE latents", "robustness": "3. Robustness to latent noise",
          "faithfulness": "4. Faithfulness to the prompt", "consistency": "5. 3D consistency",
          "comparison": "6. Comparison with the baseline"}
_RECON_METRICS = (("psnr", "novel-view PSNR (dB)", "{:.2f}"), ("depth_abs_rel", "depth abs rel", "{:.4f}"),
                  ("depth_delta1", "depth δ1", "{:.3f}"), ("translation_error", "camera translation error", "{:.4f}"),
                  ("rotation_error_deg", "camera rotation error (°)", "{:.3f}"),
                  ("fov_error_deg", "field-of-view error (°)", "{:.3f}"))


def render_markdown(report: dict) -> str:
    sections = report["sections"]
    lines = [f"# {REPORT_TITLE}", "", *_header(report)]
    for name, render in (("reconstruction", _reconstruction), ("stitched", _stitched),
                         ("robustness", _robustness), ("faithfulness", _faithfulness),
                         ("consistency", _consistency), ("comparison", _comparison)):
        lines += render(sections[name], sections) if name in sections else _skipped(name, report)
    lines += _block("## Timings", _table(["stage", "seconds"],
                                         [[name, _num(value, "{:.1f}")] for name, value in report["timings"].items()]))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- building blocks


def _num(value, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows])


def _block(*paragraphs: str) -> list[str]:
    """Paragraphs (a heading, text, a table) separated by blank lines, one blank line after."""
    return [line for paragraph in paragraphs for line in (paragraph, "")]


# ---------------------------------------------------------------------------- sections


def _header(report: dict) -> list[str]:
    model, env, settings = report["model"], report["environment"], report["settings"]
    sizes, manifest = model["sizes"], model["manifest"]
    made = ""
    if "model" in manifest:
        made = f"{manifest['model']}, reward fine-tuned: {'yes' if manifest.get('reward_finetuned') else 'no'}; "
    what = (f"{made}video {sizes['video']} px, network {sizes['network']} px, {sizes['frames']} frames; "
            f"stitched at `{model['stitching']}`; LoRA folder: {model['lora'] or 'none'}")
    run = (f"created {report['created']}, commit `{env['commit'] or 'unknown'}`, torch {env['versions']['torch']}, "
           f"{settings['threads']} thread(s), device {settings['device']}")
    return [f"- model: `{model['source']}` ({what})", f"- command: `{report['command']}`", f"- {run}",
            f"- held-out stream seed {settings['seed']}; total time {_num(report['timings']['total'], '{:.1f}')} s",
            ""]


def _skipped(name: str, report: dict) -> list[str]:
    why = {"reconstruction": "--clips 0", "stitched": "--clips 0", "robustness": "--clips 0",
           "faithfulness": "--prompts 0", "consistency": "--prompts 0",
           "comparison": "no --baseline" if report["settings"]["baseline"] is None else "--prompts 0"}[name]
    return _block(f"## {TITLES[name]}", f"Not run ({why}).")


def _reconstruction(section: dict, sections: dict) -> list[str]:
    metrics = section["metrics"]
    rows = [[label, _num(metrics.get(key), fmt)] for key, label, fmt in _RECON_METRICS]
    text = (f"The unstitched network on the exact frames of {section['num_clips']} held-out clips; novel views "
            "half-way between the orbit frames, rendered by the world renderer; errors in the first camera's frame.")
    return _block(f"## {TITLES['reconstruction']}", text, _table(["metric", "value"], rows))


def _stitched(section: dict, sections: dict) -> list[str]:
    metrics, reference = section["metrics"], sections["reconstruction"]["metrics"]
    rows = []
    for key, label, fmt in _RECON_METRICS:
        a, b = reference.get(key), metrics.get(key)
        rows.append([label, _num(a, fmt), _num(b, fmt), _num(None if a is None or b is None else b - a, fmt)])
    rows.append(["novel-view PSNR with the world's frames (dB)", "", _num(metrics.get("psnr_world_frames")), ""])
    text = ("Raw VAE latents (posterior means) of the same clips, with their VAE decoding resized to the network "
            "size beside them (as at run time).")
    verdict = "within" if section["within_target"] else "NOT within"
    gap = (f"PSNR gap (1) − (2): **{_num(section['psnr_gap_db'])} dB**, {verdict} the "
           f"{section['target_db']:g} dB target.")
    header = ["metric", "reconstruction (1)", "stitched (2)", "(2) − (1)"]
    return (_block(f"## {TITLES['stitched']}", text, _table(header, rows), gap)
            + _layer_search(section["layer_search"]))


def _layer_search(search: dict) -> list[str]:
    if not search["present"]:
        return _block("### Layer search", search["note"][0].upper() + search["note"][1:] + ".")
    best = search["ranking"][0]["mse"] if search["ranking"] else None
    rows = [[str(r["rank"]), f"`{r['block']}`", f"{r['mse']:.6f}", _pct(r["mse"] / best - 1 if best else None)]
            for r in search["ranking"]]
    facts = ", ".join(f"{key} {search[key]}" for key in ("num_videos", "conv_spec", "ridge") if key in search)
    return _block("### Layer search", f"Best block `{search['best_block']}` ({facts}).",
                  _table(["rank", "block", "MSE", "vs best"], rows))


def _robustness(section: dict, sections: dict) -> list[str]:
    rows = [[f"{r['level']:g}", _num(r["psnr_stitched"]), _num(r["psnr_decode_then_reconstruct"]),
             _num(r["advantage_db"])] for r in section["levels"]]
    text = (f"Gaussian noise of level × the per-channel latent std added to the raw latents of "
            f"{section['num_clips']} clips (one draw per clip, scaled). (a) stitched decoding of the noisy latents; "
            "(b) VAE-decode them, then the unstitched network. Novel-view PSNR in dB.")
    header = ["noise level", "(a) stitched", "(b) decode → reconstruct", "(a) − (b)"]
    return _block(f"## {TITLES['robustness']}", text, _table(header, rows))


def _faithfulness(section: dict, sections: dict) -> list[str]:
    rates, check, generation = section["rates"], section["checker_validation"], section["generation"]
    text = (f"{section['num_prompts']} held-out captions, generated with {generation['num_steps']} steps, guidance "
            f"{generation['guidance_scale']:g}, seed {generation['seed_base']} + index. Colour and shape are judged "
            "from pixels by a checker that shares nothing with the reward model: shading-invariant nearest "
            "reference colours against the ground's greys, and nearest-neighbour silhouettes from exact renders "
            "of train-split scenes (`vist3a_rt.evaluation.attribute_check`).")
    rows = [[source, _pct(r["colour"]), _pct(r["shape"]), _pct(r["both"])]
            for source, r in (("renders of the 3D scene", rates["render"]), ("VAE-decoded frames", rates["frames"]))]
    validation = [[case, _pct(check[key]["colour"]), _pct(check[key]["shape"]), _pct(check[key]["both"])]
                  for case, key in (("own captions (should pass)", "ground_truth"),
                                    ("next clip's caption (should fail)", "wrong_prompt"),
                                    ("shapes swapped (shape should fail)", "wrong_shapes"))]
    per_prompt = [[str(p["index"]), str(p["seed"]), p["prompt"], _verdict(p["render"]["colour"]),
                   _verdict(p["render"]["shape"]), _verdict(p["render"]["both"]), _verdict(p["frames"]["both"])]
                  for p in section["prompts"]]
    return _block(f"## {TITLES['faithfulness']}", text, _table(["images judged", "colour", "shape", "both"], rows),
                  f"Checker validation on exact world renders of the same compositions at {check['size'][0]} px:",
                  _table(["prompts", "colour", "shape", "both"], validation),
                  "Per prompt (renders; last column: decoded frames):",
                  _table(["#", "seed", "prompt", "colour", "shape", "both", "frames both"], per_prompt))


def _consistency(section: dict, sections: dict) -> list[str]:
    text = (f"PSNR between the generated scene rendered at its predicted cameras and the VAE-decoded frames, over "
            f"{section['num_prompts']} prompts: mean **{_num(section['psnr_mean'])} dB** "
            f"(min {_num(section['psnr_min'])}, max {_num(section['psnr_max'])}).")
    return _block(f"## {TITLES['consistency']}", text)


def _comparison(section: dict, sections: dict) -> list[str]:
    rows = []
    for r in section["rows"]:
        if r["metric"] == "consistency_psnr":
            rows.append(["consistency PSNR", _num(r["baseline"]) + " dB", _num(r["model"]) + " dB",
                         _num(r["delta"], "{:+.2f} dB")])
        else:
            delta = None if r["delta"] is None else 100 * r["delta"]
            rows.append([f"{r['metric']} pass rate", _pct(r["baseline"]), _pct(r["model"]),
                         _num(delta, "{:+.1f} pp")])
    text = f"Baseline `{section['baseline']}`, same prompts and seeds (faithfulness on the renders)."
    return _block(f"## {TITLES['comparison']}", text, _table(["metric", "baseline", "model", "change"], rows))


__all__ = ["REPORT_TITLE", "TITLES", "render_markdown"]
