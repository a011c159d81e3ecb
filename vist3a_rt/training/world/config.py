"""``WorldConfig``: everything about the procedural world that is not drawn per scene.

The constructor signature is the schema; ``to_dict`` / ``from_dict`` round-trip through JSON and
the dict is part of every disk-cache key, so changing a field never serves stale renders.

World frame: metres-like units, **z up**, ground plane z = 0. Defaults are chosen so that the
ground fills the whole image (elevation > half the vertical field of view: no sky, so every
pixel has a depth) and a three-object layout stays in view over the whole orbit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ...errors import ConfigError


@dataclass(frozen=True)
class WorldConfig:
    num_frames: int = 13  # the official reconstruction input: 13 frames (4 latent frames)
    orbit_span_deg: float = 120.0  # azimuth covered from the first to the last frame
    camera_distance: float = 4.5  # eye to orbit target, the same for every frame and scene
    elevation_deg: tuple[float, float] = (28.0, 45.0)  # drawn once per scene, uniform
    fov_y_deg: float = 45.0  # vertical field of view; fx = fy (square pixels)
    object_count_weights: tuple[float, float, float] = (0.2, 0.4, 0.4)  # P(1, 2, 3 objects)
    light_direction: tuple[float, float, float] = (0.45, 0.3, 0.85)  # towards the sun, world frame
    ambient: float = 0.35  # radiance = albedo * (ambient + (1 - ambient) * max(n.l, 0) * lit)
    shadows: bool = True  # hard shadows from the directional light (objects cast, all receive)
    ground_tile: float = 0.5  # checker tile edge on the ground plane

    def __post_init__(self) -> None:
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ConfigError(f"num_frames must be an int >= 1, got {self.num_frames!r}")
        if not 0.0 <= self.orbit_span_deg <= 360.0:
            raise ConfigError(f"orbit_span_deg must be in [0, 360], got {self.orbit_span_deg}")
        low, high = self.elevation_deg
        if not 0.0 < low <= high < 90.0:
            raise ConfigError(f"elevation_deg must be (low, high) with 0 < low <= high < 90, got {self.elevation_deg}")
        if not 0.0 < self.fov_y_deg < 180.0 or self.camera_distance <= 0 or self.ground_tile <= 0:
            raise ConfigError("fov_y_deg must be in (0, 180); camera_distance and ground_tile positive")
        weights = self.object_count_weights
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(f"object_count_weights must be 3 non-negative weights, got {weights}")
        if not 0.0 <= self.ambient <= 1.0 or sum(c * c for c in self.light_direction) == 0:
            raise ConfigError("ambient must be in [0, 1] and light_direction non-zero")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "WorldConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown WorldConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
