"""The vocabulary of export contracts: axes, tensor specs, profiles, contracts, stages.

An ``ExportContract`` describes a stage's graph from outside: named inputs and outputs, each
axis a fixed size or ``scale · dim + offset`` of a named *dim*, and a ``Profile`` giving each
dim's min / opt / max size (a TensorRT optimization profile; ``min == max`` is static). From it
come the ONNX ``dynamic_axes``, ``torch.export``'s ``dynamic_shapes``, per-input (min, opt,
max) shapes, shape dictionaries for buffers, and sample inputs. ``ExportStage`` pairs a
contract with the tensor-only module implementing it. The stages themselves are in
``contracts``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vist3a_rt.errors import Vist3AInputError

POINTS = ("min", "opt", "max")
SAMPLERS = ("normal", "uniform", "integers", "prefix_mask")


class ExportUnsupportedError(Vist3AInputError):
    """The model (or this configuration of it) cannot be exported as a static graph."""


# --- axes, tensors, profiles ---------------------------------------------------------------------

_AXIS = re.compile(r"(?:(?P<label>[A-Za-z_]\w*)=)?(?:(?P<scale>\d+)\*)?(?P<dim>[A-Za-z_]\w*)(?P<offset>[+-]\d+)?")


@dataclass(frozen=True)
class Axis:
    """A tensor axis whose size is ``scale · dim + offset`` for a named profile dim; ``label``
    names a derived axis (``frames`` for ``4*latent_frames-3``)."""

    dim: str
    scale: int = 1
    offset: int = 0
    label: str | None = None

    @property
    def expression(self) -> str:
        text = self.dim if self.scale == 1 else f"{self.scale}*{self.dim}"
        return text + (f"{self.offset:+d}" if self.offset else "")

    @property
    def name(self) -> str:
        """The ONNX ``dim_param``: the label, else the expression."""
        return self.label or self.expression

    def size(self, sizes: Mapping[str, int]) -> int:
        return self.scale * sizes[self.dim] + self.offset

    def to_text(self) -> str:
        """``latent_frames``, ``frames=4*latent_frames-3``: the JSON form (``parse`` reads it back)."""
        return f"{self.label}={self.expression}" if self.label else self.expression

    @classmethod
    def parse(cls, text: str) -> "Axis":
        match = _AXIS.fullmatch(text)
        if match is None:
            raise ValueError(f"bad axis expression {text!r}")
        return cls(match["dim"], int(match["scale"] or 1), int(match["offset"] or 0), match["label"])


AxisLike = int | Axis


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, axes, dtype, and how its sample values are drawn.

    ``values``: ``normal`` (standard normal), ``uniform`` in [low, high), ``integers`` in
    [low, high), ``prefix_mask`` (per row, a random number ≥ 1 of ones followed by zeros).
    """

    name: str
    axes: tuple[AxisLike, ...]
    dtype: torch.dtype = torch.float32
    values: str = "normal"
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.values not in SAMPLERS:
            raise ValueError(f"{self.name}: unknown sampler {self.values!r}; one of {SAMPLERS}")

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(a if isinstance(a, int) else a.size(sizes) for a in self.axes)

    def dims(self) -> set[str]:
        return {a.dim for a in self.axes if isinstance(a, Axis)}

    def sample(self, sizes: Mapping[str, int], generator: torch.Generator) -> Tensor:
        shape = self.shape(sizes)
        if self.values == "normal":
            return torch.randn(shape, generator=generator, dtype=self.dtype)
        if self.values == "uniform":
            return self.low + (self.high - self.low) * torch.rand(shape, generator=generator, dtype=self.dtype)
        if self.values == "integers":
            return torch.randint(int(self.low), int(self.high), shape, generator=generator, dtype=self.dtype)
        lengths = torch.randint(1, shape[-1] + 1, shape[:-1] + (1,), generator=generator)
        return (torch.arange(shape[-1]) < lengths).to(self.dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "axes": [a if isinstance(a, int) else a.to_text() for a in self.axes],
                "dtype": str(self.dtype).removeprefix("torch."), "values": self.values,
                "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensorSpec":
        axes = tuple(a if isinstance(a, int) else Axis.parse(a) for a in data["axes"])
        return cls(data["name"], axes, getattr(torch, data["dtype"]), data["values"], data["low"], data["high"])


@dataclass(frozen=True)
class Profile:
    """Sizes each dim may take: ``min[d] <= opt[d] <= max[d]``; ``min == max`` is static."""

    min: Mapping[str, int]
    opt: Mapping[str, int]
    max: Mapping[str, int]

    def __post_init__(self) -> None:
        if not set(self.min) == set(self.opt) == set(self.max):
            raise Vist3AInputError(f"profile min/opt/max name different dims: "
                                   f"{sorted(self.min)}, {sorted(self.opt)}, {sorted(self.max)}")
        for d in self.min:
            if not 1 <= self.min[d] <= self.opt[d] <= self.max[d]:
                raise Vist3AInputError(f"profile dim {d!r} needs 1 <= min <= opt <= max, got "
                                       f"{self.min[d]} / {self.opt[d]} / {self.max[d]}")

    @classmethod
    def static(cls, sizes: Mapping[str, int]) -> "Profile":
        return cls(dict(sizes), dict(sizes), dict(sizes))

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.opt)

    @property
    def dynamic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.opt if self.min[d] < self.max[d])

    def sizes(self, point: str | Mapping[str, int] = "opt") -> dict[str, int]:
        """Every dim's size at ``"min"``/``"opt"``/``"max"``, or ``point`` (opt fills dims it omits)."""
        if isinstance(point, str):
            if point not in POINTS:
                raise Vist3AInputError(f"profile point must be one of {POINTS} or a dict of sizes, got {point!r}")
            return dict(getattr(self, point))
        unknown = set(point) - set(self.opt)
        if unknown:
            raise Vist3AInputError(f"unknown profile dims {sorted(unknown)}; this profile has {list(self.opt)}")
        sizes = {**self.opt, **point}
        self.check(sizes)
        return sizes

    def check(self, sizes: Mapping[str, int], stage: str = "") -> None:
        for d, n in sizes.items():
            if d in self.opt and not self.min[d] <= n <= self.max[d]:
                where = f" of stage {stage!r}" if stage else ""
                raise Vist3AInputError(f"{d} = {n} is outside the exported profile{where}: "
                                       f"[{self.min[d]}, {self.max[d]}]")

    def trace_sizes(self) -> dict[str, int]:
        """Sizes to trace the export at: opt, but every dynamic dim >= 2 and distinct from the
        others (``torch.export`` specializes sizes 0 and 1, and may merge dims of equal size)."""
        sizes, used = dict(self.opt), set()
        for d in self.dynamic_dims:
            low, high = max(2, self.min[d]), self.max[d]
            candidates = [*range(max(low, self.opt[d]), high + 1), *range(self.opt[d] - 1, low - 1, -1)]
            sizes[d] = next((n for n in candidates if n not in used), candidates[0])
            used.add(sizes[d])
        return sizes

    def to_dict(self) -> dict:
        return {p: dict(getattr(self, p)) for p in POINTS}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Profile":
        return cls(*(dict(data[p]) for p in POINTS))


# --- the contract --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportContract:
    """A stage's inputs, outputs and profile; everything an exporter or a backend needs."""

    stage: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: Profile
    notes: str = ""

    def __post_init__(self) -> None:
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.stage}: tensor names must be unique, got {names}")
        used = set().union(*(t.dims() for t in (*self.inputs, *self.outputs)))
        if used != set(self.profile.dims):
            raise Vist3AInputError(f"{self.stage}: the profile must size exactly the dims {sorted(used)}, "
                                   f"got {sorted(self.profile.dims)}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX / TorchScript-exporter form: tensor name → {axis index: axis name}, dynamic axes only."""
        dynamic = set(self.profile.dynamic_dims)
        result = {}
        for t in (*self.inputs, *self.outputs):
            axes = {i: a.name for i, a in enumerate(t.axes) if isinstance(a, Axis) and a.dim in dynamic}
            if axes:
                result[t.name] = axes
        return result

    def dynamic_shapes(self) -> tuple[dict[int, object] | None, ...]:
        """``torch.export`` form: per input, {axis index: Dim expression} for its dynamic axes."""
        from torch.export import Dim

        dims = {d: Dim(d, min=self.profile.min[d], max=self.profile.max[d]) for d in self.profile.dynamic_dims}
        return tuple({i: a.scale * dims[a.dim] + a.offset for i, a in enumerate(t.axes)
                      if isinstance(a, Axis) and a.dim in dims} or None for t in self.inputs)

    def shape_dict(self, point: str | Mapping[str, int] = "opt") -> dict[str, tuple[int, ...]]:
        """Every input's and output's shape at a profile point (for allocating I/O buffers)."""
        sizes = self.profile.sizes(point)
        return {t.name: t.shape(sizes) for t in (*self.inputs, *self.outputs)}

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per input, its (min, opt, max) shapes: a TensorRT optimization profile."""
        return {t.name: tuple(t.shape(self.profile.sizes(p)) for p in POINTS) for t in self.inputs}

    def sample_inputs(self, point: str | Mapping[str, int] = "opt", *, seed: int = 0) -> dict[str, Tensor]:
        """Deterministic sample inputs at a profile point (``"trace"``: the export's trace sizes)."""
        sizes = self.profile.trace_sizes() if point == "trace" else self.profile.sizes(point)
        generator = torch.Generator().manual_seed(seed)
        return {t.name: t.sample(sizes, generator) for t in self.inputs}

    def sizes_of(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """The dim sizes that ``shapes`` (input name → shape) imply; checks every axis agrees."""
        missing = set(self.input_names) - set(shapes)
        if missing:
            raise Vist3AInputError(f"stage {self.stage!r} is missing inputs {sorted(missing)}")
        sizes: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(shapes[t.name])
            if len(shape) != len(t.axes):
                raise Vist3AInputError(f"{self.stage} input {t.name!r} must have {len(t.axes)} axes "
                                       f"{self._axes_text(t)}, got shape {list(shape)}")
            for i, (axis, n) in enumerate(zip(t.axes, shape)):
                self._match_axis(t, i, axis, n, sizes)
        return sizes

    def check_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """``sizes_of`` plus the profile's bounds: what a backend checks before running."""
        sizes = self.sizes_of(shapes)
        self.profile.check(sizes, self.stage)
        return sizes

    def _match_axis(self, t: TensorSpec, i: int, axis: AxisLike, n: int, sizes: dict[str, int]) -> None:
        if isinstance(axis, int):
            expected = axis
        else:
            value, rest = divmod(n - axis.offset, axis.scale)
            expected = axis.size({axis.dim: sizes.setdefault(axis.dim, value)}) if not rest else None
        if n != expected:
            raise Vist3AInputError(f"{self.stage} input {t.name!r} axis {i} is {n}, expected "
                                   f"{axis if isinstance(axis, int) else axis.expression} with {sizes}")

    @staticmethod
    def _axes_text(t: TensorSpec) -> str:
        return "[" + ", ".join(str(a) if isinstance(a, int) else a.name for a in t.axes) + "]"

    def to_dict(self) -> dict:
        return {"stage": self.stage, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "profile": self.profile.to_dict(),
                "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ExportContract":
        return cls(data["stage"], tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in data["outputs"]), Profile.from_dict(data["profile"]),
                   data.get("notes", ""))


@dataclass
class ExportStage:
    """A contract and the tensor-only module that implements it (put in eval mode)."""

    contract: ExportContract
    module: nn.Module = field(repr=False)

    def __post_init__(self) -> None:
        self.module.eval()

    @property
    def name(self) -> str:
        return self.contract.stage

    @torch.inference_mode()
    def reference(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The stage run in eager torch on ``inputs`` (name → tensor): name → output."""
        outputs = self.module(*(inputs[name] for name in self.contract.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.contract.output_names, outputs))
