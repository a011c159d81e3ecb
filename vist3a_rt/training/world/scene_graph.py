"""The scene graph of the procedural world: primitives, relations between them, and the orbit.

A ``SceneGraph`` is plain data (JSON round-trip through ``to_dict`` / ``from_dict``); ``sampling``
draws one from a seed, ``render`` draws pixels from one, ``captions`` describes one.

Geometry (world frame z up, ground z = 0; every primitive stands upright on its support):

| shape    | scale s (small 0.35, large 0.6) | height | footprint radius (collisions) |
|----------|---------------------------------|--------|-------------------------------|
| cube     | half edge s, turned by ``yaw``  | 2 s    | s sqrt(2)                     |
| sphere   | radius s                        | 2 s    | s                             |
| cylinder | radius s, vertical axis         | 2 s    | s                             |
| cone     | base radius s, apex up          | 2 s    | s                             |

Relations are stated as ``subject relation object`` ("0 left_of 1": object 0 is left of object 1)
and hold **in the first camera view** (frame 0 of the orbit): left/right = smaller/larger image x,
in front of/behind = smaller/larger camera depth, on top of = resting on the object's top face
(only cubes and cylinders have one), centred on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ConfigError

COLOURS: dict[str, tuple[float, float, float]] = {  # linear albedo
    "red": (0.85, 0.08, 0.08), "green": (0.1, 0.65, 0.15), "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1), "orange": (1.0, 0.48, 0.05), "purple": (0.5, 0.15, 0.7),
    "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05), "pink": (1.0, 0.5, 0.72),
    "brown": (0.45, 0.25, 0.1),
}
SHAPES = ("cube", "sphere", "cylinder", "cone")
SIZES: dict[str, float] = {"small": 0.35, "large": 0.6}
RELATIONS = ("left_of", "right_of", "in_front_of", "behind", "on_top_of")
FLAT_TOPPED = ("cube", "cylinder")  # shapes something can be stacked on


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {sorted(choices)}, got {value!r}")


@dataclass(frozen=True)
class Primitive:
    """One object: ``position`` is (x, y, z of its bottom); ``yaw`` turns it about world z."""

    shape: str
    colour: str
    size: str
    position: tuple[float, float, float]
    yaw: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("size", self.size, SIZES)

    @property
    def scale(self) -> float:
        return SIZES[self.size]

    @property
    def height(self) -> float:
        return 2.0 * self.scale

    @property
    def footprint_radius(self) -> float:
        return self.scale * (math.sqrt(2.0) if self.shape == "cube" else 1.0)

    @property
    def top(self) -> float:
        return self.position[2] + self.height

    @property
    def centre(self) -> tuple[float, float, float]:
        """Centre of the bounding box (what relations and projections are measured on)."""
        x, y, z = self.position
        return (x, y, z + 0.5 * self.height)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "position": list(self.position), "yaw": self.yaw}

    @classmethod
    def from_dict(cls, data: dict) -> "Primitive":
        return cls(data["shape"], data["colour"], data["size"], tuple(data["position"]), data.get("yaw", 0.0))


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[object]`` (indices into ``SceneGraph.objects``)."""

    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        _check_choice("relation", self.relation, RELATIONS)

    def to_dict(self) -> dict:
        return {"subject": self.subject, "relation": self.relation, "object": self.object}

    @classmethod
    def from_dict(cls, data: dict) -> "Relation":
        return cls(data["subject"], data["relation"], data["object"])


@dataclass(frozen=True)
class Orbit:
    """Orbit cameras: eye at ``distance`` from ``target``, fixed elevation, azimuth sweeping
    ``span_deg`` from ``start_azimuth_deg`` (counter-clockwise seen from above, i.e. the camera
    moves towards its own right) over ``num_frames`` evenly spaced frames."""

    target: tuple[float, float, float]
    distance: float
    elevation_deg: float
    start_azimuth_deg: float
    span_deg: float
    fov_y_deg: float
    num_frames: int

    def to_dict(self) -> dict:
        return {"target": list(self.target), "distance": self.distance, "elevation_deg": self.elevation_deg,
                "start_azimuth_deg": self.start_azimuth_deg, "span_deg": self.span_deg,
                "fov_y_deg": self.fov_y_deg, "num_frames": self.num_frames}

    @classmethod
    def from_dict(cls, data: dict) -> "Orbit":
        return cls(**{**data, "target": tuple(data["target"])})


@dataclass(frozen=True)
class SceneGraph:
    """A sampled scene: objects, the relations its caption states, cameras, caption, provenance."""

    objects: tuple[Primitive, ...]
    relations: tuple[Relation, ...]
    orbit: Orbit
    caption: str = ""
    seed: int | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        for rel in self.relations:
            if not (0 <= rel.subject < len(self.objects) and 0 <= rel.object < len(self.objects)):
                raise ConfigError(f"relation {rel} refers past the {len(self.objects)} objects")

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects],
                "relations": [r.to_dict() for r in self.relations],
                "orbit": self.orbit.to_dict(), "caption": self.caption, "seed": self.seed, "split": self.split}

    @classmethod
    def from_dict(cls, data: dict) -> "SceneGraph":
        try:
            return cls(tuple(Primitive.from_dict(o) for o in data["objects"]),
                       tuple(Relation.from_dict(r) for r in data["relations"]),
                       Orbit.from_dict(data["orbit"]), data.get("caption", ""), data.get("seed"),
                       data.get("split"))
        except (KeyError, TypeError) as err:
            raise ConfigError(f"not a scene-graph dict: {err!r}") from err
