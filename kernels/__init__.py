"""Custom kernels of vist3a-rt, installed as ``vist3a_rt.kernels``.

Each op sits next to (or names) its pure-torch reference. Importing this package loads no
native code: compiled modules load on first use and say how to build them when missing.

* ``cpu_raster`` -- C++ CPU Gaussian-splat rasterizer (oracle: ``vist3a_rt.rendering.reference``).
"""
