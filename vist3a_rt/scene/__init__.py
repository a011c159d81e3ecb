"""Scene containers: Gaussian splats (``GaussianScene``) and cameras (``Camera``, ``Cameras``)."""

from .cameras import Camera, Cameras
from .gaussian_scene import DEFAULT_MIN_OPACITY, GaussianScene, normalize_quaternions

__all__ = ["Camera", "Cameras", "DEFAULT_MIN_OPACITY", "GaussianScene", "normalize_quaternions"]
