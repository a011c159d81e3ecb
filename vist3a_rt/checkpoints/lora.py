"""LoRA of the stitched reconstruction network: the official spec grammar and merging.

The spec is a comma-separated list of chunks, as the official training scripts take it:
``r<rank>`` (default 8), ``a<alpha>`` (32), ``d<dropout>`` (0.0), ``b<none|all|lora_only>``
(lora_only), ``t<name>|<name>...`` (target substrings; none = every Linear and Conv2d),
``f<0|1>`` (fan_in_fan_out, 0), and the flags ``enc`` and ``fix_head`` (training-only).
Example: ``r64,a32,d0.0,f0``. Scaling is alpha / r.

Checkpoints store, per LoRA module ``<name>``: ``<name>.lora_A``, ``<name>.lora_B`` and,
when the module has a bias and bias mode is lora_only/all, ``<name>.bias`` (which replaces
the base bias). Linear: A (r, in), B (out, r); delta = B @ A. Conv2d with a k x k kernel:
A (r*k, in*k), B (out*k, r*k); the (out*k, in*k) product is read row-major as (out, in, k, k).
At load we fold ``scaling * delta`` into the base weight, so inference pays nothing for LoRA.
"""

from __future__ import annotations

import contextlib

import re
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError

LORA_SUFFIXES = (".lora_A", ".lora_B")
_CHUNK = re.compile(r"(?P<key>[radf])(?P<num>\d+(?:\.\d*)?)|b(?P<bias>[a-z_]+)|t(?P<targets>.+)")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.0
    bias: str = "lora_only"
    target_modules: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    finetune_encoder: bool = False
    freeze_head: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, module_name: str) -> bool:
        """Official rule: a module is targeted when any target string is a substring of its name."""
        return not self.target_modules or any(t in module_name for t in self.target_modules)


def parse_lora_spec(spec: str) -> LoraSpec:
    """Parse ``"r64,a32,d0.0,f0"``-style specs; unknown or malformed chunks raise ConfigError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"LoRA spec must be a non-empty string like 'r64,a32,d0.0,f0', got {spec!r}")
    fields: dict = {}
    for raw in spec.split(","):
        chunk = raw.strip()
        if chunk.lower() == "enc":
            fields["finetune_encoder"] = True
            continue
        if chunk.lower() in ("fix_head", "fixhead"):
            fields["freeze_head"] = True
            continue
        fields.update(_parse_chunk(chunk, spec))
    parsed = LoraSpec(**fields)
    if parsed.r <= 0:
        raise ConfigError(f"LoRA rank must be positive in {spec!r}")
    return parsed


def _parse_chunk(chunk: str, spec: str) -> dict:
    match = _CHUNK.fullmatch(chunk)
    if match is None:
        raise ConfigError(f"bad LoRA spec chunk {chunk!r} in {spec!r} (expected r<int>, a<int>, d<float>, "
                          "b<none|all|lora_only>, t<a|b|...>, f<0|1>, enc or fix_head)")
    if match["bias"] is not None:
        if match["bias"] not in ("none", "all", "lora_only"):
            raise ConfigError(f"LoRA bias mode must be none|all|lora_only, got {match['bias']!r} in {spec!r}")
        return {"bias": match["bias"]}
    if match["targets"] is not None:
        return {"target_modules": tuple(t for t in match["targets"].split("|") if t)}
    key, num = match["key"], match["num"]
    if key in "raf" and not num.isdigit():
        raise ConfigError(f"LoRA chunk {chunk!r} in {spec!r} needs an integer")
    if key == "f" and num not in ("0", "1"):
        raise ConfigError(f"LoRA fan_in_fan_out chunk must be f0 or f1, got {chunk!r}")
    names = {"r": "r", "a": "alpha", "d": "dropout", "f": "fan_in_fan_out"}
    return {names[key]: _convert(key, num)}


def _convert(key: str, num: str):
    if key == "d":
        return float(num)
    if key == "f":
        return num == "1"
    return int(num)


def lora_module_names(lora_state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the modules that carry LoRA factors in a checkpoint's ``lora`` dict."""
    return sorted({k[: -len(s)] for k in lora_state for s in LORA_SUFFIXES if k.endswith(s)})


def lora_delta_check(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, name: str,
                     rank: int | None = None) -> None:
    """Check that B @ A fits ``weight`` (Linear [out,in] or Conv2d [out,in,k,k]: (out·k, in·k)).
    With ``rank``, A must have exactly r rows (r·k for a k x k conv), as the spec declares."""
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise CheckpointError(f"LoRA factors of {name!r} have incompatible shapes "
                              f"A {list(lora_A.shape)}, B {list(lora_B.shape)}")
    kernel = weight.shape[2] if weight.dim() == 4 else 1
    if rank is not None and lora_A.shape[0] != rank * kernel:
        raise CheckpointError(f"LoRA of {name!r} has rank {lora_A.shape[0] // kernel} (lora_A {list(lora_A.shape)}), "
                              f"but the LoRA spec says r={rank}")
    if weight.dim() == 4:
        expected = (weight.shape[0] * weight.shape[2], weight.shape[1] * weight.shape[3])
    elif weight.dim() == 2:
        expected = tuple(weight.shape)
    else:
        raise CheckpointError(f"LoRA on {name!r}, whose weight {list(weight.shape)} is neither Linear nor Conv2d")
    product = (lora_B.shape[0], lora_A.shape[1])
    if product != expected:
        raise CheckpointError(f"LoRA of {name!r}: B@A has shape {list(product)}, which does not fit the base "
                              f"weight {list(weight.shape)} (expected {list(expected)})")


def lora_delta(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, name: str,
               rank: int | None = None) -> torch.Tensor:
    """The dense update B @ A laid out like ``weight``."""
    lora_delta_check(weight, lora_A, lora_B, name, rank)
    return (lora_B.to(torch.float32) @ lora_A.to(torch.float32)).reshape(weight.shape)


def merge_lora(state: dict[str, torch.Tensor], lora_state: dict[str, torch.Tensor], spec: LoraSpec,
               expected_modules: list[str]) -> dict[str, torch.Tensor]:
    """Fold a LoRA checkpoint into ``state`` (same module naming) and return the merged dict.

    ``expected_modules`` are the modules the spec selects in the model; the checkpoint must
    hold LoRA factors for exactly those (a mismatch means a foreign or wrong-config file).
    Saved biases of LoRA modules replace the base biases (official "lora_only" bias mode).
    """
    found = check_lora_state(lora_state, expected_modules, spec)
    merged = dict(state)
    for name in found:
        merged[f"{name}.weight"] = merged_weight(name, merged[f"{name}.weight"], lora_state, spec)
        if f"{name}.bias" in lora_state:
            merged[f"{name}.bias"] = replacement_bias(name, merged.get(f"{name}.bias"), lora_state)
    return merged


def check_lora_state(lora_state: dict[str, torch.Tensor], expected_modules: list[str], spec: LoraSpec) -> list[str]:
    """Validate a checkpoint's LoRA entries against the model's targets; returns the module names."""
    found = lora_module_names(lora_state)
    _check_same_modules(found, expected_modules)
    _check_no_stray_keys(lora_state, set(found))
    for name in found:
        A, _ = _factors(lora_state, name)
        if A.dim() != 2 or A.shape[0] % spec.r:
            raise CheckpointError(f"LoRA of {name!r} has lora_A of shape {list(A.shape)}, which does not fit "
                                  f"the spec's rank r={spec.r}")
    return found


def merged_weight(name: str, base: torch.Tensor, lora_state: dict[str, torch.Tensor], spec: LoraSpec) -> torch.Tensor:
    """``base + scaling * B @ A`` for one module, as a new float32-or-base-dtype tensor."""
    return merge_into(name, base.clone(), lora_state, spec)


def merge_into(name: str, weight: torch.Tensor, lora_state: dict[str, torch.Tensor], spec: LoraSpec,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Add ``scaling * B @ A`` to ``weight`` in place when it is a contiguous float32 tensor the
    caller owns (the loader's freshly read weights), so merging allocates no second copy.
    ``scratch``: an optional float32 buffer of at least weight.numel() elements for B @ A."""
    A, B = _factors(lora_state, name)
    lora_delta_check(weight, A, B, name, rank=spec.r)
    if spec.fan_in_fan_out:
        return (_fan_in_fan_out_base(weight, name).float() + spec.scaling * (B.float() @ A.float())).to(weight.dtype)
    target = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().contiguous()
    # The official merge's operation order, W += (B @ A) * scaling, keeps results bit-identical to
    # it (a fused addmm rounds differently); the one temporary is freed before the next tensor.
    with _one_thread_if_small(weight.numel()):
        if scratch is not None and scratch.numel() >= weight.numel():
            delta = torch.matmul(B.float(), A.float(), out=scratch[: weight.numel()].view(B.shape[0], A.shape[1]))
        else:
            delta = B.float() @ A.float()
        delta.mul_(spec.scaling)
        # a k x k conv weight [out, in, k, k] read row-major is exactly the [out*k, in*k] product's layout
        target.view(delta.shape).add_(delta)
    return target if target is weight else target.to(weight.dtype)


SMALL_MERGE_NUMEL = 1 << 18  # below this a delta is microseconds of work on one thread


@contextlib.contextmanager
def _one_thread_if_small(numel: int):
    """Tiny merges on one thread: OpenMP's fork/join per op costs more than the work, and on a busy
    machine each parallel region waits for a core (157 nano merges took 5.7 s at 2 threads under
    load, 2 ms on one)."""
    threads = torch.get_num_threads()
    if numel >= SMALL_MERGE_NUMEL or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _factors(lora_state, name):
    try:
        return lora_state[f"{name}.lora_A"], lora_state[f"{name}.lora_B"]
    except KeyError as err:
        raise CheckpointError(f"LoRA module {name!r} is missing {err.args[0]!r}") from None


def _fan_in_fan_out_base(base: torch.Tensor, name: str) -> torch.Tensor:
    # Official f1 layers copy the (out, in) weight into (in, out) storage and run x @ W, so
    # the effective base weight is the transpose; this only works for square layers there.
    if base.dim() != 2 or base.shape[0] != base.shape[1]:
        raise CheckpointError(f"fan_in_fan_out LoRA on non-square layer {name!r} {list(base.shape)} "
                              "cannot be reproduced (the official code fails there too)")
    return base.t()


def replacement_bias(name: str, base_bias: torch.Tensor | None, lora_state: dict) -> torch.Tensor:
    """The checkpoint's saved bias of a LoRA module, which replaces the base bias."""
    saved = lora_state[f"{name}.bias"]
    if base_bias is None:
        raise CheckpointError(f"checkpoint has a bias for LoRA module {name!r}, which has no bias in the model")
    if saved.shape != base_bias.shape:
        raise CheckpointError(f"bias of {name!r}: checkpoint {list(saved.shape)}, model {list(base_bias.shape)}")
    return saved.to(base_bias.dtype)


def _check_same_modules(found: list[str], expected: list[str]) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError("LoRA modules in the checkpoint do not match the model and LoRA spec: "
                              f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                              f"(e.g. {extra[:3]})")


def _check_no_stray_keys(lora_state: dict, modules: set[str]) -> None:
    stray = [k for k in lora_state if k.rsplit(".", 1)[0] not in modules
             or not k.endswith((".lora_A", ".lora_B", ".bias"))]
    if stray:
        raise CheckpointError(f"unexpected keys in the LoRA state: {stray[:5]}")
