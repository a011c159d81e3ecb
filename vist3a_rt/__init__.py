"""vist3a-rt: a low-latency runtime for VIST3A text-to-3D.

Importing this package is cheap and needs no GPU, TensorRT or built extension.
"""

__version__ = "0.1.0"
