// CPU Gaussian-splat rasterizer, forward: projection, SH colour, tile binning, compositing.
//
// The oracle is vist3a_rt/rendering/reference.py; every rule here is its rule (see its
// docstring): EWA projection with gsplat's Jacobian clamp and eps2d, radius =
// ceil(3 sqrt(largest eigenvalue)) with the 0.01 gap floor, radius_clip, near/far and on-screen
// culling, SH (degree from K) along normalize(mean - centre) + 0.5 clamped at 0, tiles of
// ``tile_size`` px seen through the radius box, per tile front to back by (depth, index),
// alpha = min(0.999, o exp(-sigma)) skipped when sigma < 0 or alpha < 1/255, the pixel ends
// before the Gaussian that would bring T to <= 1e-4, background weighted by the final T,
// depth = sum w z, colour clamped to [0, 1].
//
// Precision: float32 in, float32 out, float64 inside (projection, radius, tile box, depth key,
// colour, and per pixel sigma, alpha, transmittance, blending; only each Gaussian's final rgb
// and z are kept as float32): the rules are threshold tests (radius ceil, alpha >= 1/255,
// T(1 - alpha) <= 1e-4, depth ties), and computed in float32 a few pixels per frame land on
// the other side of one, an error of up to alpha * T there. Against the float64 reference the
// outputs agree to their float32 rounding.
//
// Speed, without changing a single decision of the rules above:
//   * Gaussians are sorted once by (depth, index) with a stable radix sort and binned into tiles
//     in that order, so every tile list is already depth-sorted (what the reference gets from its
//     global sort followed by a stable sort by tile);
//   * a Gaussian only visits the pixels of the bounding box of its ellipse sigma <= ln(255 o)
//     (widened by a hair against rounding): outside it alpha < 1/255 for certain, so the
//     reference skips those pixels too; tiles the box misses are left out of the binning;
//   * pixels go four at a time through branch-free vector code (SSE baseline, an AVX2 clone
//     where the CPU has it); exp(-sigma) mostly comes from products of per-tile factors (see
//     blend), and a tile's next Gaussians are prefetched;
//   * projection, binning and compositing run on std::threads (compositing: dynamic schedule,
//     one tile = one task), and no result depends on the thread count;
//   * a tile stops at the first Gaussian after which all its pixels have terminated.
#include "raster.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace vist3a::cpu_raster {
namespace {

constexpr double kAlphaMax = 0.999;              // gsplat caps alpha so 1 - alpha never reaches 0
constexpr double kAlphaMin = 1.0 / 255.0;        // contributions below one 8-bit step are skipped
constexpr double kTransmittanceMin = 1e-4;       // the pixel ends before T would reach this
constexpr double kNormalizeEps = 1e-12;          // torch.nn.functional.normalize's floor
constexpr double kSigmaCutMargin = 1e-9;         // per-pixel early skip: far above the error of exp
constexpr double kBoxSlack = 1e-6;               // px: pixel boxes are widened by this (+1e-9
                                                 // of their size) against rounding
constexpr int kFeatures = 4;                     // r, g, b, depth
constexpr double kPi = 3.14159265358979323846;

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// One drawable Gaussian, packed for compositing.
struct Splat {
  double mean_x, mean_y;            // pixel coordinates of the projected mean
  double conic_xx, conic_xy, conic_yy;
  double opacity;
  double sigma_skip;                // sigma above this gives alpha < 1/255 (with a margin)
  float feature[kFeatures];         // rgb (after +0.5 and the clamp), camera-space z
  int32_t box_x0, box_x1;           // inclusive pixel columns where alpha >= 1/255 is possible
  int32_t box_y0, box_y1;           // inclusive pixel rows
};

struct TileRect {
  int32_t x0, x1, y0, y1;  // half-open tile ranges; empty when x0 >= x1 or y0 >= y1
};

// Runs fn(worker) for worker = 0 .. threads-1, worker 0 on the calling thread, and joins them;
// an exception in a worker (std::bad_alloc) is rethrown here instead of terminating the
// process, and a thread that cannot be started has its share run here.
template <class Fn>
void run_workers(int threads, Fn&& fn) {
  std::vector<std::exception_ptr> errors(threads);
  auto guarded = [&](int worker) {
    try {
      fn(worker);
    } catch (...) {
      errors[worker] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads > 1 ? threads - 1 : 0);
  for (int worker = 1; worker < threads; ++worker) {
    try {
      pool.emplace_back(guarded, worker);
    } catch (const std::system_error&) {  // no thread to be had: run its share here
      guarded(worker);
    }
  }
  guarded(0);
  for (auto& thread : pool) thread.join();
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

// [begin, end) of ``count`` items for ``worker`` of ``threads`` (contiguous, balanced).
inline std::pair<int64_t, int64_t> share(int64_t count, int worker, int threads) {
  return {count * worker / threads, count * (worker + 1) / threads};
}

// ------------------------------------------------------------------------------ vectors

// Four doubles at a time (GCC/Clang vector extensions: two SSE2 instructions per vector in the
// x86-64-v2 baseline, one with AVX2, NEON on ARM). Compositing works in float64 because the rules
// are threshold tests (alpha >= 1/255, T(1 - alpha) <= 1e-4) that float32 rounding would flip
// on a few pixels per frame, each lane being one pixel that sees its Gaussians in order.
constexpr int kLanes = 4;
typedef double Doubles __attribute__((vector_size(32)));
typedef int64_t Masks __attribute__((vector_size(32)));  // lane masks: -1 true, 0 false
typedef float Floats4 __attribute__((vector_size(16)));
// Helpers taking or returning vectors are always inlined: a 32-byte vector crosses a call
// differently with and without AVX, and an AVX2 clone must never call an SSE copy.
#define VIST3A_INLINE __attribute__((always_inline)) inline

// The baseline build is x86-64-v2 (SSE4.2); on Linux x86-64 the hot loops are also compiled for
// AVX2 and picked at load time when the CPU has it (same maths, no FMA: the same bits either
// way, see -ffp-contract=off in CMakeLists.txt).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VIST3A_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VIST3A_SIMD_CLONES
#endif

VIST3A_INLINE Doubles broadcast(double v) { return Doubles{v, v, v, v}; }
VIST3A_INLINE Masks broadcast_mask(int64_t v) { return Masks{v, v, v, v}; }
VIST3A_INLINE Doubles select(Masks mask, Doubles yes, Doubles no) { return mask ? yes : no; }

// exp(x), Cephes' rational approximation (~1 ulp, like libm's exp), x clamped to [-700, 700]
// (beyond, alpha is skipped anyway or the value is unused; no inf, no garbage exponent bits).
VIST3A_INLINE Doubles exp_clamped(Doubles x) {
  const Doubles low = broadcast(-700.0), high = broadcast(700.0);
  x = select(x < low, low, x);
  x = select(x > high, high, x);
  // n = round(x / ln 2) via the 1.5 * 2^52 trick: exact for |n| < 2^51, no float->int instruction
  const Doubles magic = broadcast(6755399441055744.0);
  const Doubles shifted = x * broadcast(1.4426950408889634073599) + magic;
  const Doubles n = shifted - magic;
  const Masks n_int = (Masks)shifted - (Masks)magic;
  x = x - n * broadcast(6.93145751953125e-1) - n * broadcast(1.42860682030941723212e-6);
  const Doubles xx = x * x;
  const Doubles p = x * ((broadcast(1.26177193074810590878e-4) * xx +
                          broadcast(3.02994407707441961300e-2)) * xx +
                         broadcast(9.99999999999999999910e-1));
  const Doubles q = ((broadcast(3.00198505138664455042e-6) * xx +
                      broadcast(2.52448340349684104192e-3)) * xx +
                     broadcast(2.27265548208155028766e-1)) * xx +
                    broadcast(2.00000000000000000009e0);
  const Doubles e = broadcast(1.0) + broadcast(2.0) * (p / (q - p));
  return e * (Doubles)((n_int + broadcast_mask(1023)) << 52);  // times 2^n
}

// Loads and stores of four doubles (or floats) at any address.
VIST3A_INLINE Doubles load(const double* at) {
  Doubles v;
  __builtin_memcpy(&v, at, sizeof v);
  return v;
}
VIST3A_INLINE void store(double* at, Doubles v) { __builtin_memcpy(at, &v, sizeof v); }
VIST3A_INLINE Doubles load_floats(const float* at) {  // four floats, widened
  Floats4 v;
  __builtin_memcpy(&v, at, sizeof v);
  return __builtin_convertvector(v, Doubles);
}

// ------------------------------------------------------------------------------ SH colour

// N_l^m (m >= 0) times sqrt(2) for m > 0: the orthonormal real harmonic's constant (sh.py),
// and the constants of the Legendre recurrence.
struct ShNormalization {
  double value[kMaxShDegree + 1][kMaxShDegree + 1] = {};
  // Legendre recurrence Q_l = a Q_{l-1} z - b Q_{l-2}: a = (2l-1)/(l-m), b = (l+m-1)/(l-m)
  double step_a[kMaxShDegree + 1][kMaxShDegree + 1] = {};
  double step_b[kMaxShDegree + 1][kMaxShDegree + 1] = {};
  ShNormalization() {
    for (int l = 0; l <= kMaxShDegree; ++l)
      for (int m = 0; m < l; ++m) {
        step_a[l][m] = double(2 * l - 1) / (l - m);
        step_b[l][m] = double(l + m - 1) / (l - m);
      }
    auto factorial = [](int n) { double f = 1; for (int i = 2; i <= n; ++i) f *= i; return f; };
    for (int l = 0; l <= kMaxShDegree; ++l)
      for (int m = 0; m <= l; ++m) {
        double k = std::sqrt((2 * l + 1) / (4 * kPi) * factorial(l - m) / factorial(l + m));
        value[l][m] = m == 0 ? k : std::sqrt(2.0) * k;
      }
  }
};
const ShNormalization kShNorm;

// Real SH basis at the unit direction (x, y, z), degrees 0..Degree, coefficient k = l*l + l + m:
// reduced associated Legendre functions with the Condon-Shortley phase times Re/Im (x + i y)^m,
// the same two recurrences as vist3a_rt/rendering/sh.py (a template: every loop unrolls).
template <int Degree>
VIST3A_INLINE void sh_basis_fixed(double x, double y, double z, double* basis) {
  double q[Degree + 1][Degree + 1];
  double double_factorial = 1;
  for (int m = 0; m <= Degree; ++m) {
    if (m > 0) double_factorial *= 2 * m - 1;
    q[m][m] = (m % 2 ? -1.0 : 1.0) * double_factorial;
    if (m + 1 <= Degree) q[m + 1][m] = (2 * m + 1) * z * q[m][m];
    for (int l = m + 2; l <= Degree; ++l)
      q[l][m] = kShNorm.step_a[l][m] * z * q[l - 1][m] - kShNorm.step_b[l][m] * q[l - 2][m];
  }
  double cos_m[Degree + 1], sin_m[Degree + 1];
  cos_m[0] = 1;
  sin_m[0] = 0;
  for (int m = 1; m <= Degree; ++m) {
    cos_m[m] = x * cos_m[m - 1] - y * sin_m[m - 1];
    sin_m[m] = x * sin_m[m - 1] + y * cos_m[m - 1];
  }
  for (int l = 0; l <= Degree; ++l)
    for (int m = -l; m <= l; ++m) {
      const int a = m < 0 ? -m : m;
      basis[l * l + l + m] = kShNorm.value[l][a] * q[l][a] * (m >= 0 ? cos_m[a] : sin_m[a]);
    }
}

VIST3A_INLINE void sh_basis(int degree, double x, double y, double z, double* basis) {
  switch (degree) {
    case 0: return sh_basis_fixed<0>(x, y, z, basis);
    case 1: return sh_basis_fixed<1>(x, y, z, basis);
    case 2: return sh_basis_fixed<2>(x, y, z, basis);
    case 3: return sh_basis_fixed<3>(x, y, z, basis);
    default: return sh_basis_fixed<4>(x, y, z, basis);
  }
}

// ------------------------------------------------------------------------------ projection

struct Projected {  // per input Gaussian; splat, tiles and depth are set only where drawn
  explicit Projected(int64_t n)
      : splat(new Splat[n]), tiles(new TileRect[n]), depth(new double[n]), drawn(n, 0) {}
  std::unique_ptr<Splat[]> splat;
  std::unique_ptr<TileRect[]> tiles;
  std::unique_ptr<double[]> depth;
  std::vector<uint8_t> drawn;  // visible and opaque enough to ever reach alpha >= 1/255
};

struct Projector {
  Projector(const Scene& scene, const Camera& cam, const Settings& set, int degree, int tiles_x,
            int tiles_y)
      : scene(scene), cam(cam), set(set), degree(degree), tiles_x(tiles_x), tiles_y(tiles_y),
        // x/z, y/z clamp of the Jacobian: 0.3 tan(half-FOV) beyond the image on each side
        u_min(-(cam.cx / cam.fx + 0.3 * (0.5 * cam.width / cam.fx))),
        u_max((cam.width - cam.cx) / cam.fx + 0.3 * (0.5 * cam.width / cam.fx)),
        v_min(-(cam.cy / cam.fy + 0.3 * (0.5 * cam.height / cam.fy))),
        v_max((cam.height - cam.cy) / cam.fy + 0.3 * (0.5 * cam.height / cam.fy)),
        tile_size(set.tile_size), inv_tile(1.0 / set.tile_size),
        inv_tile_exact((set.tile_size & (set.tile_size - 1)) == 0) {}
  const Scene& scene;
  const Camera& cam;
  const Settings& set;
  const int degree;
  const int tiles_x, tiles_y;
  const double u_min, u_max, v_min, v_max;
  const double tile_size, inv_tile;
  const bool inv_tile_exact;

  // Projects Gaussian i; returns its radius (0 = dropped) and fills the outputs when drawn.
  int32_t project(int64_t i, Projected& out) const {
    const double* V = cam.viewmat;
    const float* m = scene.means + 3 * i;
    const double mx = m[0], my = m[1], mz = m[2];
    const double xc = V[0] * mx + V[1] * my + V[2] * mz + V[3];
    const double yc = V[4] * mx + V[5] * my + V[6] * mz + V[7];
    const double zc = V[8] * mx + V[9] * my + V[10] * mz + V[11];
    if (!(zc >= set.near_plane && zc <= set.far_plane)) return 0;

    // R S from the w-first quaternion, column j scaled by s_j. R of the normalised quaternion
    // is R of the raw one with its products scaled by 1/|q|^2: one division, no square root
    // (the dividers are the scarce unit here, and a second hardware thread may share them).
    const float* q = scene.quats + 4 * i;
    const double w = q[0], x = q[1], y = q[2], z = q[3];
    const double two = 2 / std::max(w * w + x * x + y * y + z * z, kNormalizeEps * kNormalizeEps);
    const double R[9] = {1 - two * (y * y + z * z), two * (x * y - w * z), two * (x * z + w * y),
                         two * (x * y + w * z), 1 - two * (x * x + z * z), two * (y * z - w * x),
                         two * (x * z - w * y), two * (y * z + w * x), 1 - two * (x * x + y * y)};
    const float* s = scene.scales + 3 * i;

    // Perspective Jacobian with x/z, y/z clamped a little beyond the image (gsplat's rule).
    const double x_over_z = xc / zc, y_over_z = yc / zc, inv_z = 1 / zc;
    const double u = std::min(std::max(x_over_z, u_min), u_max);
    const double v = std::min(std::max(y_over_z, v_min), v_max);
    const double J[6] = {cam.fx * inv_z, 0, -cam.fx * u * inv_z, 0, cam.fy * inv_z, -cam.fy * v * inv_z};
    double JW[6];  // J @ viewmat[:3, :3]
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < 3; ++c)
        JW[3 * r + c] = J[3 * r] * V[c] + J[3 * r + 1] * V[4 + c] + J[3 * r + 2] * V[8 + c];
    double foot[6];  // J W R S
    for (int r = 0; r < 2; ++r)
      for (int c = 0; c < 3; ++c)
        foot[3 * r + c] =
            (JW[3 * r] * R[c] + JW[3 * r + 1] * R[3 + c] + JW[3 * r + 2] * R[6 + c]) * s[c];
    const double cov_xx = foot[0] * foot[0] + foot[1] * foot[1] + foot[2] * foot[2] + set.eps2d;
    const double cov_xy = foot[0] * foot[3] + foot[1] * foot[4] + foot[2] * foot[5];
    const double cov_yy = foot[3] * foot[3] + foot[4] * foot[4] + foot[5] * foot[5] + set.eps2d;
    const double det = cov_xx * cov_yy - cov_xy * cov_xy;
    if (!(det > 0)) return 0;
    const double b = 0.5 * (cov_xx + cov_yy);
    const double radius = std::ceil(3.0 * std::sqrt(b + std::sqrt(std::max(b * b - det, 0.01))));
    if (!(radius > set.radius_clip)) return 0;
    const double px = x_over_z * cam.fx + cam.cx, py = y_over_z * cam.fy + cam.cy;
    if (!(px + radius > 0 && px - radius < cam.width && py + radius > 0 && py - radius < cam.height))
      return 0;
    const int32_t radius_px =
        radius < double(std::numeric_limits<int32_t>::max()) ? int32_t(radius)
                                                             : std::numeric_limits<int32_t>::max();

    const float opacity = scene.opacities[i];
    out.depth[i] = zc;
    out.drawn[i] = opacity >= kAlphaMin;  // o exp(-sigma) <= o: nothing to draw below 1/255
    if (!out.drawn[i]) return radius_px;

    Splat& sp = out.splat[i];
    sp.mean_x = px;
    sp.mean_y = py;
    const double inv_det = 1 / det;
    sp.conic_xx = cov_yy * inv_det;
    sp.conic_xy = -cov_xy * inv_det;
    sp.conic_yy = cov_xx * inv_det;
    sp.opacity = opacity;
    const double sigma_cut = std::log(255.0 * double(opacity));  // alpha >= 1/255 <=> sigma <= this
    sp.sigma_skip = sigma_cut + kSigmaCutMargin;
    sp.feature[3] = float(zc);  // rgb: colour_range(), in a second pass

    // Pixel box of the ellipse 1/2 d^T cov^-1 d <= s (s = sigma_skip): half-widths
    // sqrt(2 s cov_xx), sqrt(2 s cov_yy), widened by a hair against rounding; every pixel
    // outside has alpha < 1/255, so the reference skips it too.
    const double ext_x = std::sqrt(2 * sp.sigma_skip * cov_xx), ext_y = std::sqrt(2 * sp.sigma_skip * cov_yy);
    const double slack_x = kBoxSlack + 1e-9 * ext_x, slack_y = kBoxSlack + 1e-9 * ext_y;
    auto pixel = [](double value, int size) {  // clamp to [-1, size] before the int conversion
      return int32_t(std::min(std::max(value, -1.0), double(size)));
    };
    sp.box_x0 = pixel(std::ceil(px - ext_x - 0.5 - slack_x), cam.width);
    sp.box_x1 = pixel(std::floor(px + ext_x - 0.5 + slack_x), cam.width);
    sp.box_y0 = pixel(std::ceil(py - ext_y - 0.5 - slack_y), cam.height);
    sp.box_y1 = pixel(std::floor(py + ext_y - 0.5 + slack_y), cam.height);

    // Tiles: the reference's radius box [floor((m - r)/ts), ceil((m + r)/ts)), then only the
    // tiles that also meet the pixel box (the others would composite nothing).
    const double r = radius;
    auto tile = [](double value, int tiles) {
      return int32_t(std::min(std::max(value, 0.0), double(tiles)));
    };
    // (m -+ r) / ts, as a product when 1/ts is exact (a power of two): the same bits, no division
    auto in_tiles = [&](double value) { return inv_tile_exact ? value * inv_tile : value / tile_size; };
    TileRect& t = out.tiles[i];
    const int tile_px = set.tile_size;  // box corners are in [-1, size]
    auto first_tile = [&](int32_t pixel) { return std::max(pixel, 0) / tile_px; };
    auto end_tile = [&](int32_t pixel, int tiles) { return pixel < 0 ? 0 : std::min(pixel / tile_px + 1, tiles); };
    t.x0 = std::max(tile(std::floor(in_tiles(px - r)), tiles_x), first_tile(sp.box_x0));
    t.x1 = std::min(tile(std::ceil(in_tiles(px + r)), tiles_x), end_tile(sp.box_x1, tiles_x));
    t.y0 = std::max(tile(std::floor(in_tiles(py - r)), tiles_y), first_tile(sp.box_y0));
    t.y1 = std::min(tile(std::ceil(in_tiles(py + r)), tiles_y), end_tile(sp.box_y1, tiles_y));
    if (sp.box_x0 > sp.box_x1 || sp.box_y0 > sp.box_y1) t = TileRect{0, 0, 0, 0};  // no pixel centre inside
    return radius_px;
  }

  // Unit view direction normalize(mean - centre) of Gaussian i.
  VIST3A_INLINE void direction(int64_t i, double* unit) const {
    const float* m = scene.means + 3 * i;
    const double d[3] = {m[0] - cam.centre[0], m[1] - cam.centre[1], m[2] - cam.centre[2]};
    const double n = std::max(std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), kNormalizeEps);
    const double inv_n = 1 / n;
    for (int c = 0; c < 3; ++c) unit[c] = d[c] * inv_n;
  }
};

// rgb = max(SH(normalize(mean - centre)) + 0.5, 0) of the drawn Gaussians in [begin, end).
// The coefficients are [K, 3] floats per Gaussian: they are dotted with the basis (repeated per
// channel) twelve at a time, in three vectors whose lanes cycle through the channels.
VIST3A_SIMD_CLONES
void colour_range(const Projector& projector, Projected& proj, int64_t begin, int64_t end) {
  const Scene& scene = projector.scene;
  const int count = 3 * scene.num_coeffs;
  double weights[3 * (kMaxShDegree + 1) * (kMaxShDegree + 1)];
  for (int64_t i = begin; i < end; ++i) {
    if (!proj.drawn[i]) continue;
    double unit[3], basis[(kMaxShDegree + 1) * (kMaxShDegree + 1)];
    projector.direction(i, unit);
    sh_basis(projector.degree, unit[0], unit[1], unit[2], basis);
    for (int k = 0; k < scene.num_coeffs; ++k)
      weights[3 * k] = weights[3 * k + 1] = weights[3 * k + 2] = basis[k];
    const float* coeffs = scene.sh + int64_t(count) * i;
    Doubles acc[3] = {broadcast(0.0), broadcast(0.0), broadcast(0.0)};
    int j = 0;
    for (; j + 12 <= count; j += 12)
      for (int v = 0; v < 3; ++v) acc[v] += load(weights + j + 4 * v) * load_floats(coeffs + j + 4 * v);
    double sum[3] = {0.0, 0.0, 0.0};
    for (; j < count; ++j) sum[j % 3] += weights[j] * coeffs[j];
    for (int v = 0; v < 3; ++v)
      for (int lane = 0; lane < kLanes; ++lane) sum[(4 * v + lane) % 3] += acc[v][lane];
    float* rgb = proj.splat[i].feature;
    for (int c = 0; c < 3; ++c) rgb[c] = float(std::max(sum[c] + 0.5, 0.0));
  }
}

// ------------------------------------------------------------------------------ sort and bin

// Indices of the drawn Gaussians ordered by (depth, index): LSD radix sort on the bits of the
// float64 depth (z >= near_plane >= 0, so the bit patterns order like the values), which is
// stable, so equal depths keep index order.
std::vector<uint32_t> depth_order(const Projected& proj, int64_t count) {
  std::vector<uint32_t> ids;
  std::vector<uint64_t> keys;
  for (int64_t i = 0; i < count; ++i)
    if (proj.drawn[i]) {
      double z = proj.depth[i] + 0.0;  // -0.0 -> +0.0
      uint64_t bits;
      std::memcpy(&bits, &z, sizeof bits);
      ids.push_back(uint32_t(i));
      keys.push_back(bits);
    }
  std::vector<uint32_t> ids_tmp(ids.size());
  std::vector<uint64_t> keys_tmp(keys.size());
  std::vector<size_t> histogram(1 << 16);
  for (int shift = 0; shift < 64; shift += 16) {
    std::fill(histogram.begin(), histogram.end(), 0);
    for (uint64_t key : keys) ++histogram[(key >> shift) & 0xffff];
    if (std::any_of(histogram.begin(), histogram.end(), [&](size_t n) { return n == keys.size(); }))
      continue;  // every key has the same digit here: the pass would not move anything
    size_t offset = 0;
    for (auto& n : histogram) { size_t c = n; n = offset; offset += c; }
    for (size_t j = 0; j < keys.size(); ++j) {
      size_t dst = histogram[(keys[j] >> shift) & 0xffff]++;
      keys_tmp[dst] = keys[j];
      ids_tmp[dst] = ids[j];
    }
    keys.swap(keys_tmp);
    ids.swap(ids_tmp);
  }
  return ids;
}

struct Bins {
  const Splat* splats;           // Projected::splat, indexed by input Gaussian
  std::vector<int64_t> start;    // [tiles + 1] offsets into ids
  std::vector<uint32_t> ids;     // Gaussian indices, grouped by tile, depth order inside
};

// Stable counting sort by tile, in parallel: worker w bins a contiguous range of the depth
// order and writes after workers < w inside every tile, so the order is the serial one.
Bins bin(const Projected& proj, const std::vector<uint32_t>& order, int tiles, int tiles_x,
         int threads) {
  Bins bins;
  const int64_t count = int64_t(order.size());
  bins.splats = proj.splat.get();
  std::vector<std::vector<int64_t>> offsets(threads, std::vector<int64_t>(tiles, 0));
  run_workers(threads, [&](int worker) {
    auto [begin, end] = share(count, worker, threads);
    auto& counts = offsets[worker];
    for (int64_t j = begin; j < end; ++j) {
      const TileRect& t = proj.tiles[order[j]];
      for (int ty = t.y0; ty < t.y1; ++ty)
        for (int tx = t.x0; tx < t.x1; ++tx) ++counts[int64_t(ty) * tiles_x + tx];
    }
  });
  bins.start.assign(tiles + 1, 0);
  int64_t total = 0;
  for (int tile = 0; tile < tiles; ++tile) {
    bins.start[tile] = total;
    for (int worker = 0; worker < threads; ++worker) {
      int64_t n = offsets[worker][tile];
      offsets[worker][tile] = total;
      total += n;
    }
  }
  bins.start[tiles] = total;
  bins.ids.resize(total);
  run_workers(threads, [&](int worker) {
    auto [begin, end] = share(count, worker, threads);
    auto& cursor = offsets[worker];
    for (int64_t j = begin; j < end; ++j) {
      const TileRect& t = proj.tiles[order[j]];
      for (int ty = t.y0; ty < t.y1; ++ty)
        for (int tx = t.x0; tx < t.x1; ++tx) bins.ids[cursor[int64_t(ty) * tiles_x + tx]++] = order[j];
    }
  });
  return bins;
}

// ------------------------------------------------------------------------------ compositing

constexpr int kPrefetch = 4;  // Gaussians ahead in a tile's list

// A worker's scratch doubles, 64-byte aligned.
class AlignedDoubles {
 public:
  AlignedDoubles() = default;
  AlignedDoubles(const AlignedDoubles&) = delete;
  AlignedDoubles& operator=(const AlignedDoubles&) = delete;
  ~AlignedDoubles() { release(); }
  void assign(size_t count, double value) {
    if (count > capacity_) {
      release();
      data_ = static_cast<double*>(::operator new(count * sizeof(double), std::align_val_t{64}));
      capacity_ = count;
    }
    std::fill_n(data_, count, value);
  }
  double& operator[](size_t i) { return data_[i]; }

 private:
  void release() {
    if (data_) ::operator delete(data_, std::align_val_t{64});
    data_ = nullptr;
    capacity_ = 0;
  }
  double* data_ = nullptr;
  size_t capacity_ = 0;
};

struct TileState {  // one worker's scratch for one tile; a Gaussian's groups start at its first column
  int stride = 0;   // doubles per row: the tile's columns, then room for a group's overhang
  AlignedDoubles trans;  // transmittance, negated once the pixel met its terminating Gaussian
  AlignedDoubles red, green, blue, depth;
  void reset(int rows, int cols) {
    stride = cols + kLanes - 1;
    const size_t count = size_t(rows) * stride;
    trans.assign(count, 1.0);
    for (auto* v : {&red, &green, &blue, &depth}) v->assign(count, 0.0);
  }
};

// sigma of the Gaussian at a pixel centre (scalar; the reference's formula)
VIST3A_INLINE double sigma_at(const Splat& sp, int x, int y) {
  const double dx = (x + 0.5) - sp.mean_x, dy = (y + 0.5) - sp.mean_y;
  return 0.5 * (sp.conic_xx * dx * dx + sp.conic_yy * dy * dy) + sp.conic_xy * dx * dy;
}

// One Gaussian over the pixels [x0, x1] x [y0, y1] of the tile at (col0, row0), four at a
// time and branch-free (lanes outside the ellipse simply stay unchanged). Returns how many
// pixels it ended.
//
// exp(-sigma) comes from products instead of an exp per group where that is safe: sigma is a
// quadratic, so its differences between neighbouring groups (4 columns) and rows are linear and
// the exp of those differences changes by constant factors. With E = exp(-sigma), H the factor
// to the next group of a row and W the factor to the next row:
//   E(g+1, y) = E(g, y) H(g, y),    H(g+1, y) = H(g, y) exp(-16 a),
//   E(0, y+1) = E(0, y) W(y),       W(y+1) = W(y) exp(-c),   H(0, y+1) = H(0, y) exp(-4 b)
// ((a, b, c) the conic), i.e. three vector exps per Gaussian and tile instead of one per group.
// Each product adds ~1 ulp; a tile has at most ts/4 groups by ts rows, so E stays within
// ~1e-14 relative (the thresholds need ~1e-12). Valid while every factor stays in range: sigma
// is convex, so its maximum over the groups' rectangle is at a corner, and when that is <= 300
// all E, H, W (and the constants, which are ratios of them) lie in [e^-600, e^600]; otherwise
// (thin, long, tilted ellipses) each group takes its own exp, as it does when the Gaussian has
// fewer than kIncrementalMinGroups groups here (four exps would not pay off).
constexpr double kIncrementalSigmaMax = 300;
constexpr int kIncrementalMinGroups = 6;

VIST3A_INLINE int blend(const Splat& sp, int x0, int x1, int y0, int y1, int col0, int row0,
                        TileState& st) {
  const Doubles lane_centre = Doubles{0.5, 1.5, 2.5, 3.5};  // pixel centres relative to lane 0
  const Masks lane = Masks{0, 1, 2, 3};
  const Doubles opacity = broadcast(sp.opacity), skip = broadcast(sp.sigma_skip);
  const Doubles cxx = broadcast(sp.conic_xx), cxy = broadcast(sp.conic_xy), cyy = broadcast(sp.conic_yy);
  const Doubles fr = broadcast(sp.feature[0]), fg = broadcast(sp.feature[1]);
  const Doubles fb = broadcast(sp.feature[2]), fz = broadcast(sp.feature[3]);
  const Masks last_col = broadcast_mask(x1);
  const int groups = (x1 - x0) / kLanes + 1, x_end = x0 + groups * kLanes - 1;  // last lane's column
  const bool incremental =
      groups * (y1 - y0 + 1) >= kIncrementalMinGroups &&
      std::max(std::max(sigma_at(sp, x0, y0), sigma_at(sp, x_end, y0)),
               std::max(sigma_at(sp, x0, y1), sigma_at(sp, x_end, y1))) <= kIncrementalSigmaMax;

  Doubles e_row = broadcast(0.0), h_row = e_row, w_row = e_row;  // E, H, W at the row's first group
  Doubles step_h = e_row, step_w = e_row, step_h_row = e_row;
  if (incremental) {
    const Doubles dx0 = (broadcast(double(x0)) + lane_centre) - broadcast(sp.mean_x);
    const double dy0 = (y0 + 0.5) - sp.mean_y;
    const double a = sp.conic_xx, b = sp.conic_xy, c = sp.conic_yy;
    e_row = exp_clamped(-(broadcast(0.5) * (cxx * dx0 * dx0 + broadcast(c * dy0 * dy0)) +
                          cxy * dx0 * broadcast(dy0)));
    h_row = exp_clamped(-(broadcast(4 * a) * dx0 + broadcast(8 * a + 4 * b * dy0)));
    w_row = exp_clamped(-(broadcast(b) * dx0 + broadcast(c * dy0 + 0.5 * c)));
    const Doubles constants = exp_clamped(Doubles{-16 * a, -c, -4 * b, 0.0});
    step_h = broadcast(constants[0]);
    step_w = broadcast(constants[1]);
    step_h_row = broadcast(constants[2]);
  }

  Masks ended = broadcast_mask(0);  // per lane: how many pixels ended here
  for (int y = y0; y <= y1; ++y) {
    const Doubles dy = broadcast((y + 0.5) - sp.mean_y);
    const Doubles yy = cyy * dy * dy;
    const int64_t row = int64_t(y - row0) * st.stride - col0;  // + x: the column's index
    Doubles e = e_row, h = h_row;
    for (int x = x0; x <= x1; x += kLanes) {
      const int64_t at = row + x;
      const Doubles dx = (broadcast(double(x)) + lane_centre) - broadcast(sp.mean_x);
      // the reference's 1/2 (a dx^2 + c dy^2) + b dx dy
      const Doubles sigma = broadcast(0.5) * (cxx * dx * dx + yy) + cxy * dx * dy;
      Doubles alpha = opacity * (incremental ? e : exp_clamped(-sigma));
      e = e * h;
      h = h * step_h;
      alpha = alpha < broadcast(kAlphaMax) ? alpha : broadcast(kAlphaMax);
      const Doubles trans = load(&st.trans[at]);  // negative: the pixel has ended
      // sigma <= sigma_skip is the reference's alpha >= 1/255 (to 1e-9 in sigma; the alpha test
      // settles that sliver)
      Masks live = (lane + broadcast_mask(x) <= last_col) & (trans > broadcast(0.0)) &
                   (sigma >= broadcast(0.0)) & (sigma <= skip) & (alpha >= broadcast(kAlphaMin));
      const Doubles next = trans * (broadcast(1.0) - alpha);
      // pixels that end here: this Gaussian is excluded, and T keeps its value with a minus sign
      const Masks ends = live & (next <= broadcast(kTransmittanceMin));
      live &= ~ends;
      ended -= ends;
      const Doubles weight = live ? alpha * trans : broadcast(0.0);
      store(&st.red[at], load(&st.red[at]) + weight * fr);
      store(&st.green[at], load(&st.green[at]) + weight * fg);
      store(&st.blue[at], load(&st.blue[at]) + weight * fb);
      store(&st.depth[at], load(&st.depth[at]) + weight * fz);
      store(&st.trans[at], live ? next : (ends ? -trans : trans));
    }
    e_row = e_row * w_row;
    w_row = w_row * step_w;
    h_row = h_row * step_h_row;
  }
  return int((ended[0] + ended[1]) + (ended[2] + ended[3]));
}

VIST3A_SIMD_CLONES
void composite_tile(const Bins& bins, int tile, int tiles_x, const Camera& cam,
                    const Settings& set, const float* background, TileState& st,
                    const Image& image) {
  const int ts = set.tile_size;
  const int col0 = (tile % tiles_x) * ts, row0 = (tile / tiles_x) * ts;
  const int cols = std::min(ts, cam.width - col0), rows = std::min(ts, cam.height - row0);
  const int pixels = cols * rows;
  st.reset(rows, cols);
  int finished = 0;

  const int64_t end = bins.start[tile + 1];
  for (int64_t k = bins.start[tile]; k < end && finished < pixels; ++k) {
    if (k + kPrefetch < end) {  // the tile's Gaussians are scattered over all of them: fetch ahead
      const char* next = reinterpret_cast<const char*>(&bins.splats[bins.ids[k + kPrefetch]]);
      __builtin_prefetch(next);
      __builtin_prefetch(next + sizeof(Splat) - 1);
    }
    const Splat& sp = bins.splats[bins.ids[k]];
    const int x0 = std::max(sp.box_x0, col0), x1 = std::min(sp.box_x1, col0 + cols - 1);
    const int y0 = std::max(sp.box_y0, row0), y1 = std::min(sp.box_y1, row0 + rows - 1);
    if (x0 > x1 || y0 > y1) continue;
    finished += blend(sp, x0, x1, y0, y1, col0, row0, st);
  }

  const double bg[3] = {background ? background[0] : 0.0, background ? background[1] : 0.0,
                        background ? background[2] : 0.0};
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const size_t at = size_t(r) * st.stride + c;
      const double trans = std::abs(st.trans[at]);  // negative where the pixel ended
      const int64_t out = int64_t(row0 + r) * cam.width + col0 + c;
      const double rgb[3] = {st.red[at] + trans * bg[0], st.green[at] + trans * bg[1],
                             st.blue[at] + trans * bg[2]};
      for (int ch = 0; ch < 3; ++ch)
        image.color[3 * out + ch] = float(set.clamp_color ? std::min(std::max(rgb[ch], 0.0), 1.0) : rgb[ch]);
      image.depth[out] = float(st.depth[at]);
      image.alpha[out] = float(1.0 - trans);
    }
}

}  // namespace

Stats rasterize(const Scene& scene, const Camera& cam, const float* background,
                const Settings& set, const Image& image) {
  Stats stats;
  int threads = set.num_threads > 0 ? set.num_threads : int(std::thread::hardware_concurrency());
  threads = std::max(threads, 1);
  stats.threads = threads;
  const int tiles_x = (cam.width + set.tile_size - 1) / set.tile_size;
  const int tiles_y = (cam.height + set.tile_size - 1) / set.tile_size;
  const int tiles = tiles_x * tiles_y;
  const int degree = int(std::lround(std::sqrt(double(scene.num_coeffs)))) - 1;

  // 1. project every Gaussian and colour the drawn ones
  auto start = Clock::now();
  const int64_t n = scene.count;
  Projected proj(n);
  const Projector projector(scene, cam, set, degree, tiles_x, tiles_y);
  run_workers(threads, [&](int worker) {
    auto [begin, end] = share(n, worker, threads);
    for (int64_t i = begin; i < end; ++i) image.radii[i] = projector.project(i, proj);
    colour_range(projector, proj, begin, end);  // apart: two short loops overlap better than one long
  });
  for (int64_t i = 0; i < n; ++i) stats.visible += image.radii[i] > 0;
  stats.project_ms = ms_since(start);

  // 2. order by (depth, index), then bin into tiles in that order
  start = Clock::now();
  const std::vector<uint32_t> order = depth_order(proj, n);
  stats.sort_ms = ms_since(start);
  start = Clock::now();
  const Bins bins = bin(proj, order, tiles, tiles_x, threads);
  stats.intersections = bins.start[tiles];
  stats.bin_ms = ms_since(start);

  // 3. composite, one tile per task
  start = Clock::now();
  std::atomic<int> next_tile{0};
  run_workers(std::min(threads, tiles), [&](int) {
    TileState state;
    for (int tile = next_tile++; tile < tiles; tile = next_tile++)
      composite_tile(bins, tile, tiles_x, cam, set, background, state, image);
  });
  stats.composite_ms = ms_since(start);
  return stats;
}

}  // namespace vist3a::cpu_raster
