// CPU Gaussian-splat rasterizer (forward only): the interface the Python binding calls.
//
// Semantics are those of the pure-torch reference, vist3a_rt/rendering/reference.py (gsplat 1.4
// "classic", RGB+D, pinhole); raster.cpp says where the arithmetic differs (precision only).
// No libtorch, no Python: plain float32 / float64 buffers in, float32 / int32 buffers out.
#pragma once

#include <cstdint>

namespace vist3a::cpu_raster {

constexpr int kMaxShDegree = 4;  // K = (degree + 1)^2 <= 25 coefficients per colour

struct Settings {
  double near_plane = 1e-10;
  double far_plane = 1e10;
  double eps2d = 0.3;        // px^2 low-pass added to every projected covariance
  double radius_clip = 0.1;  // Gaussians with radius <= this (px) are dropped
  int tile_size = 16;
  bool clamp_color = true;
  int num_threads = 0;  // <= 0: std::thread::hardware_concurrency()
};

struct Camera {
  double viewmat[16];  // row-major world-to-camera; the last row is ignored
  double fx, fy, cx, cy;
  double centre[3];  // camera centre in world space, inverse(viewmat)[:3, 3]
  int width, height;
};

struct Scene {
  const float* means;      // [N, 3] world
  const float* quats;      // [N, 4] w first, any nonzero norm
  const float* scales;     // [N, 3] linear
  const float* opacities;  // [N] in [0, 1]
  const float* sh;         // [N, K, 3], DC first
  int64_t count;           // N
  int num_coeffs;          // K
};

struct Image {
  float* color;    // [H, W, 3]
  float* depth;    // [H, W] sum of w z
  float* alpha;    // [H, W] 1 - final transmittance
  int32_t* radii;  // [N], 0 where the Gaussian was dropped
};

struct Stats {  // where the time went, for benchmarks
  double project_ms = 0, sort_ms = 0, bin_ms = 0, composite_ms = 0;
  int64_t visible = 0;        // Gaussians with radius > 0
  int64_t intersections = 0;  // (tile, Gaussian) pairs composited
  int threads = 0;
};

// Renders ``scene`` into ``image`` (caller-allocated). ``background``: 3 floats or nullptr (black).
Stats rasterize(const Scene& scene, const Camera& camera, const float* background,
                const Settings& settings, const Image& image);

}  // namespace vist3a::cpu_raster
