"""Cold start: a fresh Python process from launch to its first denoising step done.

The parent notes the wall-clock time, then starts ``python -m vist3a_rt.bench.cold_start``,
which imports the runtime, loads the model and generates with one denoising step, and prints
one JSON line of wall-clock instants (``time.time()``, comparable across the two processes):

* ``imported`` — ``vist3a_rt`` and torch imported (interpreter start included);
* ``loaded`` — ``Vist3A.load`` returned;
* ``first_step_done`` — ``loaded`` + the generation's text and denoise stage times (one step):
  generation starts right after loading and its stages run back to back, so this is when the
  first step's latents existed;

plus the child's peak RSS after that whole one-step generation (VAE and 3D decode included, so
the peak of a full generation: more steps reuse the same buffers) and torch's CUDA peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CHILD_TIMEOUT_S = 900


def measure_cold_start(model: str, backend: str, *, device: str = "cpu", prompt: str, seed: int = 0,
                       threads: int | None = None) -> dict:
    """Launch the child and return its phases in seconds since launch, and its peak memory."""
    command = [sys.executable, "-m", "vist3a_rt.bench.cold_start", "--model", str(model), "--backend", backend,
               "--device", device, "--prompt", prompt, "--seed", str(seed)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        command += ["--threads", str(threads)]
    launched = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"cold-start process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {"import_s": child["imported"] - launched, "load_s": child["loaded"] - child["imported"],
            "first_step_s": child["first_step_done"] - launched, "peak_rss_mib": child["peak_rss_mib"],
            "gpu_peak_mib": child["gpu_peak_mib"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one cold start (run by vist3a-rt bench)")
    for option in ("--model", "--backend", "--device", "--prompt"):
        parser.add_argument(option, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    from vist3a_rt import Vist3A
    from vist3a_rt.bench.memory import gpu_peak_mib, peak_rss_mib
    from vist3a_rt.bundle import is_bundle, load_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    imported = time.time()
    if args.backend == "onnxruntime" and is_bundle(args.model):  # its own thread setting
        model = load_bundle(args.model, backend=args.backend, device=args.device, intra_op_threads=args.threads)
    else:
        model = Vist3A.load(args.model, backend=args.backend, device=args.device)
    loaded = time.time()
    result = model.generate(args.prompt, seed=args.seed, num_steps=1)
    first_step_done = loaded + result.timings["text"] + result.timings["denoise"]
    print(json.dumps({"imported": imported, "loaded": loaded, "first_step_done": first_step_done,
                      "peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": gpu_peak_mib(args.device)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
