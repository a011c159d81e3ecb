"""VIST3A-nano on the procedural world's held-out compositions: the evaluation report.

Runs ``vist3a_rt.evaluation.run_eval`` (the same as ``vist3a-rt eval``) and writes report.md +
report.json; the baseline, when given, is the same model before reward fine-tuning, on the same
prompts and seeds. Prints the headline numbers with their units.

    python benchmarks/nano_eval.py --model MODEL_FOLDER [--baseline FOLDER] [--clips 8] [--prompts 64]
                                   [--steps N] [--out out/nano_eval] [--threads 1]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder in the released layout (or 'nano')")
    parser.add_argument("--baseline", default=None, help="model folder to compare with (e.g. before reward)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/nano_eval")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    return parser.parse_args(argv)


def headline(report: dict) -> list[str]:
    sections, lines = report["sections"], []
    if "stitched" in sections:
        recon, stitched = sections["reconstruction"]["metrics"], sections["stitched"]
        lines.append(f"novel-view PSNR: reconstruction {recon['psnr']:.2f} dB, stitched "
                     f"{stitched['metrics']['psnr']:.2f} dB (gap {stitched['psnr_gap_db']:+.2f} dB)")
        for row in sections["robustness"]["levels"]:
            lines.append(f"noise {row['level']:g} x std: stitched {row['psnr_stitched']:.2f} dB vs decode->reconstruct "
                         f"{row['psnr_decode_then_reconstruct']:.2f} dB ({row['advantage_db']:+.2f} dB)")
    if "faithfulness" in sections:
        rates = sections["faithfulness"]["rates"]["render"]
        lines.append(f"faithfulness over {rates['num_prompts']} prompts: colour {100 * rates['colour']:.1f}%, shape "
                     f"{100 * rates['shape']:.1f}%, both {100 * rates['both']:.1f}%")
        lines.append(f"3D consistency: {sections['consistency']['psnr_mean']:.2f} dB; "
                     f"{report['timings']['seconds_per_prompt']:.2f} s per prompt")
    for row in sections.get("comparison", {}).get("rows", []):
        lines.append(f"baseline -> model, {row['metric']}: {row['baseline']:.3f} -> {row['model']:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from vist3a_rt.errors import Vist3AInputError
    from vist3a_rt.evaluation import EvalSettings, check_output_folder, run_eval, write_report

    torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    started = time.perf_counter()
    try:
        settings = EvalSettings(model=args.model, baseline=args.baseline, clips=args.clips, prompts=args.prompts,
                                steps=args.steps, seed=args.seed)
        check_output_folder(args.out)
        report = run_eval(settings, command=command, log=lambda line: print(line, file=sys.stderr, flush=True))
        paths = write_report(report, args.out)
    except Vist3AInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(headline(report)))
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
