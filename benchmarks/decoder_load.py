"""Load time and peak RSS of the full-size stitched decoder, against the bytes of its weights.

Scenario: the official VIST3A decoder artifacts at official size (``DecoderConfig()``:
AnySplat/VGGT-1B widths and depths) — random values written in the official formats, the
base ``model.safetensors`` under official names and ``anysplat_stitched.pth`` (LoRA r64/a32 on
every Linear/Conv2d, stitching conv, DINO tokens) saved by ``torch.save`` — loaded with
``vist3a_rt.load_stitched_decoder(None, base, stitched, dtype)``. Baseline, in the same run:
the naive way — ``torch.load`` the .pth fully, safetensors ``load_file`` the base, build the
model normally on the CPU, cut / merge LoRA in plain torch, ``load_state_dict`` (a copy),
then ``.to(dtype)``.

Every load runs in a fresh subprocess, so RSS is clean. Memory is reported as ΔRSS above
the RSS after ``import torch, vist3a_rt`` (and the decoder modules both loaders use): peak
from VmHWM (``ru_maxrss`` recorded alongside), final after the load, and the peak of the
anonymous part (sampled from /proc/self/status every 10 ms; the rest of RSS is mapped file
pages), and the final RSS again after ``malloc_trim`` (freed temporaries that glibc kept in
the heap are returned: what remains is live). Ratios divide by the weight bytes (parameters
of the loaded model at that dtype): a loader that never holds a second copy stays near 1.0.
Both loaders must give the same weights (a few sampled per parameter; the run fails otherwise).

The files (~4.4 GiB base + ~0.4 GiB stitched, fp32) are generated once into ``--workdir``
one tensor at a time and reused while their manifest matches the config. Loads read them
from the page cache unless ``--cold``, which evicts both files (posix_fadvise DONTNEED)
before every load. Linux only (/proc).

    python benchmarks/decoder_load.py [--workdir /tmp/vist3a-bench] [--repeats 3]
                                      [--dtypes fp32 bf16] [--loaders ours naive] [--cold] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import resource
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

# Only the standard library at module level: the driver stays small (a fork/exec child's
# ru_maxrss starts at its parent's high-water mark), and a worker measures RSS before torch.

GENERATOR_VERSION = 1
BASE_FILE, STITCHED_FILE, MANIFEST = "model.safetensors", "anysplat_stitched.pth", "manifest.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
DINO = "encoder.aggregator.patch_embed."
DINO_TOKENS = ("mask_token", "cls_token", "register_tokens")
GiB = 2**30
SAMPLES_PER_PARAMETER = 4  # weights compared between the loaders (first / evenly spaced / last)
SAME_WEIGHTS_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # max |ours - naive| / max |naive| over the samples


# --- memory probes -----------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    wanted, found = ("VmRSS", "VmHWM", "RssAnon", "RssFile"), {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0]) * 1024
    return found


class PeakSampler(threading.Thread):
    """Polls /proc/self/status: VmHWM already is the peak of the total, this adds the peak anonymous part."""

    def __init__(self, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak, self._done = interval_s, {}, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for key, value in proc_status().items():
                self.peak[key] = max(value, self.peak.get(key, 0))
            self._done.wait(self.interval_s)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        return self.peak


# --- 1. the official-format files, random values, official size ---------------------------

def generate(workdir: Path) -> dict:
    """Write ``model.safetensors`` and ``anysplat_stitched.pth`` unless a matching manifest says they exist."""
    import torch
    from vist3a_rt.decoder.config import DecoderConfig

    config = DecoderConfig()
    # compared with the manifest as JSON reads it back (tuples become lists)
    key = json.loads(json.dumps({"generator": GENERATOR_VERSION, "config": config.to_dict()}))
    if (manifest := _valid_manifest(workdir, key)) is not None:
        return {**manifest, "cached": True}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MANIFEST).unlink(missing_ok=True)
    rng = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    _write_base(workdir / BASE_FILE, config, rng)
    _atomic_torch_save(_stitched_checkpoint(config, rng), workdir / STITCHED_FILE)
    files = {name: (workdir / name).stat().st_size for name in (BASE_FILE, STITCHED_FILE)}
    manifest = {**key, "files": files, "seconds": time.perf_counter() - start}
    (workdir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return {**manifest, "cached": False}


def _valid_manifest(workdir: Path, key: dict) -> dict | None:
    """The manifest (written last) when it is for this generator and config and the file sizes still match."""
    try:
        manifest = json.loads((workdir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if {k: manifest.get(k) for k in key} != key:
        return None
    sizes_ok = all((workdir / name).is_file() and (workdir / name).stat().st_size == size
                   for name, size in manifest.get("files", {}).items())
    return manifest if sizes_ok and len(manifest.get("files", {})) == 2 else None


def _random(shape, rng):
    import torch
    return torch.randn(tuple(shape), generator=rng) * 0.02


def _write_base(path: Path, config, rng) -> None:
    """AnySplat base weights under official names (= our ``state_dict()`` names), one tensor at a time."""
    from vist3a_rt.decoder.loading import meta_parameters
    from vist3a_rt.decoder.network import ReconstructionModel

    with meta_parameters():
        model = ReconstructionModel(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    write_safetensors_streaming(path, shapes, lambda name, shape: _random(shape, rng))


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], make_tensor) -> None:
    """A float32 safetensors file written tensor by tensor: u64-LE header length, JSON header, raw bytes.

    ``make_tensor(name, shape)`` returns a float32 CPU tensor; only one is alive at a time.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            out.write(make_tensor(name, shape).contiguous().numpy().data)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


def _stitched_checkpoint(config, rng) -> dict:
    """``anysplat_stitched.pth``: LoRA of every module ``lora_targets`` selects, stitching conv, DINO tokens."""
    from vist3a_rt.checkpoints.lora import parse_lora_spec
    from vist3a_rt.decoder.loading import lora_targets, meta_parameters
    from vist3a_rt.decoder.network import StitchedDecoder

    with meta_parameters():
        model = StitchedDecoder(config)
    spec = parse_lora_spec(config.stitching.lora_config)
    lora = {f"{name}.{part}": _random(shape, rng)
            for name in lora_targets(model, spec)
            for part, shape in lora_shapes(model.get_submodule(name), spec.r).items()}
    params = dict(model.named_parameters())
    return {"lora": lora,
            "stitching_layer": {k: _random(p.shape, rng) for k, p in model.stitching_layer.named_parameters()},
            **{token: _random(params[DINO + token].shape, rng) for token in DINO_TOKENS}}


def lora_shapes(module, r: int) -> dict[str, tuple[int, ...]]:
    """Official factor shapes: Linear A (r, in), B (out, r); Conv2d k x k: A (r·k, in·k), B (out·k, r·k); + bias."""
    out_ch, in_ch = module.weight.shape[:2]
    k = module.weight.shape[2] if module.weight.dim() == 4 else 1
    if module.weight.dim() == 4 and module.weight.shape[2] != module.weight.shape[3]:
        raise ValueError(f"official conv LoRA needs a square kernel, got {list(module.weight.shape)}")
    shapes = {"lora_A": (r * k, in_ch * k), "lora_B": (out_ch * k, r * k)}
    if module.bias is not None:
        shapes["bias"] = (out_ch,)
    return shapes


def _atomic_torch_save(obj, path: Path) -> None:
    import torch
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    tmp.replace(path)


# --- 2. one load per process ---------------------------------------------------------------

def load_ours(workdir: Path, dtype):
    import vist3a_rt
    return vist3a_rt.load_stitched_decoder(None, workdir / BASE_FILE, workdir / STITCHED_FILE, dtype=dtype)


def load_naive(workdir: Path, dtype):
    """What one writes without a loader: everything in RAM, a randomly initialised model, a copy in."""
    import torch
    from safetensors.torch import load_file
    from vist3a_rt.decoder.config import DecoderConfig
    from vist3a_rt.decoder.network import StitchedDecoder

    config = DecoderConfig()
    ckpt = torch.load(workdir / STITCHED_FILE, map_location="cpu", weights_only=True)
    base = load_file(workdir / BASE_FILE)
    model = StitchedDecoder(config)
    model.load_state_dict(naive_stitched_state(base, ckpt, config))
    return model.to(dtype).eval()


def naive_stitched_state(base: dict, ckpt: dict, config) -> dict:
    """The stitched state dict in plain torch: DINO cut and renumbered, tokens replaced, LoRA folded in."""
    from vist3a_rt.checkpoints.lora import parse_lora_spec

    cut, state = config.stitching.stitched_layer_index, {}
    for key, value in base.items():
        if key.startswith(DINO + "patch_embed."):
            continue
        if key.startswith(DINO + "blocks."):
            index, rest = key[len(DINO + "blocks."):].split(".", 1)
            if int(index) < cut:
                continue
            key = f"{DINO}blocks.{int(index) - cut}.{rest}"
        state[key] = value
    state.update({DINO + token: ckpt[token] for token in DINO_TOKENS})
    state.update({f"stitching_layer.{k}": v for k, v in ckpt["stitching_layer"].items()})
    scaling, lora = parse_lora_spec(config.stitching.lora_config).scaling, ckpt["lora"]
    for key in [k for k in lora if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        weight = state[f"{name}.weight"]
        state[f"{name}.weight"] = weight + scaling * (lora[f"{name}.lora_B"] @ lora[key]).reshape(weight.shape)
    state.update({k: v for k, v in lora.items() if k.endswith(".bias")})
    return state


LOADERS = {"ours": load_ours, "naive": load_naive}


def measure_load(loader: str, dtype_name: str, workdir: Path) -> dict:
    """Runs in a fresh worker process: RSS before/after imports, load wall time, peak and final RSS."""
    before_import = proc_status()
    import torch
    import vist3a_rt
    import vist3a_rt.decoder.loading  # noqa: F401  (the modules both loaders use, imported before timing)
    import safetensors.torch  # noqa: F401

    after_import = proc_status()
    dtype = getattr(torch, DTYPES[dtype_name])
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model = LOADERS[loader](workdir, dtype)
    seconds = time.perf_counter() - start
    sampled, final = sampler.stop(), proc_status()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trimmed = release_freed_heap()
    return {"loader": loader, "dtype": dtype_name, "load_s": seconds, "library": os.path.dirname(vist3a_rt.__file__),
            "rss_before_import": before_import["VmRSS"], "rss_after_import": after_import["VmRSS"],
            "anon_after_import": after_import["RssAnon"], "vm_hwm": final["VmHWM"], "ru_maxrss": ru_maxrss,
            "peak_anon_sampled": sampled.get("RssAnon", 0), "rss_final": final["VmRSS"],
            "rss_final_anon": final["RssAnon"], "rss_final_file": final["RssFile"], "rss_final_trimmed": trimmed,
            **model_facts(model, dtype), "samples": weight_samples(model)}


def release_freed_heap() -> int | None:
    """RSS once glibc has handed freed heap back (``malloc_trim``): what is left is live memory.

    Freed temporaries below glibc's (dynamic, up to 32 MiB) mmap threshold stay in the heap and
    count in RSS; the difference to the final RSS is memory the loader freed but the process keeps.
    """
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is None:
        return None
    gc.collect()
    trim(0)
    return proc_status()["VmRSS"]


def model_facts(model, dtype) -> dict:
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "on_meta": [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta],
            "wrong_dtype": [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]}


def weight_samples(model) -> list[float]:
    """A few weights of every parameter (sorted by name), to check both loaders built the same model."""
    import torch
    samples = []
    for _, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        samples += flat[torch.linspace(0, flat.numel() - 1, SAMPLES_PER_PARAMETER).long()].float().tolist()
    return samples


# --- 3. the driver -------------------------------------------------------------------------

def run_worker(*args: str) -> dict:
    """Run this file as a worker in a fresh interpreter; its last stdout line is a JSON record."""
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {' '.join(args)} failed with exit code {proc.returncode} (output above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evict_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check_run(run: dict) -> None:
    if run["on_meta"] or run["wrong_dtype"]:
        raise SystemExit(f"{run['loader']} {run['dtype']}: {len(run['on_meta'])} tensors left on meta "
                         f"(e.g. {run['on_meta'][:3]}), {len(run['wrong_dtype'])} parameters not "
                         f"{run['dtype']} (e.g. {run['wrong_dtype'][:3]})")


def relative_difference(ours: list[float], naive: list[float]) -> float:
    if len(ours) != len(naive):
        return math.inf
    scale = max(abs(x) for x in naive) or 1.0
    return max(abs(a - b) for a, b in zip(ours, naive)) / scale


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        for loader in dict.fromkeys(r["loader"] for r in runs):
            group = [r for r in runs if r["dtype"] == dtype and r["loader"] == loader]
            if group:
                rows.append(_summary_row(dtype, loader, group))
    return rows


def _summary_row(dtype: str, loader: str, group: list[dict]) -> dict:
    def spread(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    weight_bytes = group[0]["weight_bytes"]
    peak = spread([r["vm_hwm"] - r["rss_after_import"] for r in group])
    final = spread([r["rss_final"] - r["rss_after_import"] for r in group])
    trimmed = [r["rss_final_trimmed"] - r["rss_after_import"] for r in group if r["rss_final_trimmed"] is not None]
    return {"dtype": dtype, "loader": loader, "repeats": len(group), "parameters": group[0]["parameters"],
            "weight_bytes": weight_bytes, "load_s": spread([r["load_s"] for r in group]),
            "peak_rss_delta": peak, "peak_ratio": peak["median"] / weight_bytes,
            "final_rss_delta": final, "final_ratio": final["median"] / weight_bytes,
            "trimmed_rss_delta": spread(trimmed) if trimmed else None,
            "trimmed_ratio": statistics.median(trimmed) / weight_bytes if trimmed else math.nan,
            "peak_anon_delta": spread([r["peak_anon_sampled"] - r["anon_after_import"] for r in group]),
            "ru_maxrss": spread([r["ru_maxrss"] for r in group]),
            "rss_after_import": spread([r["rss_after_import"] for r in group]),
            "rss_before_import": spread([r["rss_before_import"] for r in group])}


def print_table(rows: list[dict], files: dict, args, same: dict) -> None:
    head = rows[0]
    print(f"\nstitched decoder load, official size: {head['parameters']:,} parameters; files "
          f"{files[BASE_FILE] / GiB:.2f} GiB base + {files[STITCHED_FILE] / GiB:.2f} GiB stitched (fp32); "
          f"page cache {'cold' if args.cold else 'warm'}; {args.repeats} fresh processes each; "
          f"median [min-max]; Δ = above RSS after imports ({head['rss_after_import']['median'] / GiB:.2f} GiB)")
    print(f"{'dtype':5} {'loader':6} {'weights GiB':>11} {'load s':>18} {'peak ΔRSS GiB':>19} {'peak/w':>6} "
          f"{'peak anon/w':>11} {'final ΔRSS GiB':>14} {'final/w':>7} {'trimmed/w':>9} {'ru_maxrss GiB':>13}")
    for r in rows:
        t, p, w = r["load_s"], r["peak_rss_delta"], r["weight_bytes"]
        print(f"{r['dtype']:5} {r['loader']:6} {w / GiB:11.2f} "
              f"{t['median']:7.1f} [{t['min']:4.1f}-{t['max']:4.1f}] "
              f"{p['median'] / GiB:6.2f} [{p['min'] / GiB:4.2f}-{p['max'] / GiB:4.2f}] {r['peak_ratio']:6.2f} "
              f"{r['peak_anon_delta']['median'] / w:11.2f} {r['final_rss_delta']['median'] / GiB:14.2f} "
              f"{r['final_ratio']:7.2f} {r['trimmed_ratio']:9.2f} {r['ru_maxrss']['median'] / GiB:13.2f}")
    print("peak/w: (VmHWM - RSS after imports) / weight bytes; peak anon/w: the same for the anonymous part "
          "(sampled); trimmed/w: final, after malloc_trim gave freed heap back")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        by = {r["loader"]: r for r in rows if r["dtype"] == dtype}
        if {"ours", "naive"} <= set(by):
            ours, naive = by["ours"], by["naive"]
            print(f"{dtype}: naive / ours: load time {naive['load_s']['median'] / ours['load_s']['median']:.2f}x, "
                  f"peak ΔRSS {naive['peak_rss_delta']['median'] / ours['peak_rss_delta']['median']:.2f}x; "
                  f"same weights (max rel. diff of sampled weights {same[dtype]:.1e})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vist3a-bench"),
                        help="where the generated files live (reused while valid)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per dtype and loader")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--loaders", nargs="+", choices=sorted(LOADERS), default=["ours", "naive"])
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each load")
    parser.add_argument("--json", type=Path, help="also write the summary and every run here")
    parser.add_argument("--generate-only", action="store_true", help="write (or validate) the files and stop")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # internal: generate | LOADER DTYPE
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        name, *rest = args.worker
        record = generate(args.workdir) if name == "generate" else measure_load(name, rest[0], args.workdir)
        print(json.dumps(record))
        return
    # 1. files (in a worker too: this process never imports torch)
    generated = run_worker("generate", "--workdir", str(args.workdir))
    print(f"files in {args.workdir}: {'reused' if generated['cached'] else 'written'} "
          f"({generated['seconds']:.0f} s to generate)", file=sys.stderr)
    if args.generate_only:
        return
    # 2. loads, interleaved so drift (thermal, page cache) spreads over all configurations
    runs = []
    for repeat in range(args.repeats):
        for dtype in args.dtypes:
            for loader in args.loaders:
                if args.cold:
                    evict_from_page_cache([args.workdir / BASE_FILE, args.workdir / STITCHED_FILE])
                load_average = os.getloadavg()[0]  # other work on the machine skews the times
                run = run_worker(loader, dtype, "--workdir", str(args.workdir))
                check_run(run)
                runs.append({**run, "repeat": repeat, "load_average_1m": load_average})
                print(f"  {repeat}: {dtype} {loader}: {run['load_s']:.1f} s, peak ΔRSS "
                      f"{(run['vm_hwm'] - run['rss_after_import']) / GiB:.2f} GiB", file=sys.stderr)
    # 3. same model from both loaders, then the table
    same = _compare_loaders(runs)
    rows = summarize(runs)
    print_table(rows, generated["files"], args, same)
    print(f"library: {sorted({r['library'] for r in runs})}; machine: {os.cpu_count()} CPUs, "
          f"1-min load average before the loads "
          f"{min(r['load_average_1m'] for r in runs):.1f}-{max(r['load_average_1m'] for r in runs):.1f}")
    if args.json:
        for run in runs:
            run.pop("samples")
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "files": generated["files"], "same_weights_rel_diff": same,
                                         "summary": rows, "runs": runs}, indent=1))


def _compare_loaders(runs: list[dict]) -> dict[str, float]:
    """Max relative difference of the sampled weights, ours vs naive, per dtype; fails past the tolerance."""
    same = {}
    for dtype in dict.fromkeys(r["dtype"] for r in runs):
        ours = [r for r in runs if r["dtype"] == dtype and r["loader"] == "ours"]
        naive = [r for r in runs if r["dtype"] == dtype and r["loader"] == "naive"]
        if ours and naive:
            same[dtype] = max(relative_difference(r["samples"], naive[0]["samples"]) for r in ours)
            if same[dtype] > SAME_WEIGHTS_TOLERANCE[dtype]:
                raise SystemExit(f"{dtype}: our loader and the naive one give different weights "
                                 f"(max relative difference {same[dtype]:.2e} of sampled weights)")
    return same


if __name__ == "__main__":
    main()
