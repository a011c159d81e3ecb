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
//   * a Gaussian only visits, row by row, the pixels inside the ellipse sigma <= ln(255 o) (row
//     spans widened by a hair, inside a box grown by a margin and one pixel): outside it
//     alpha < 1/255 for certain, so the reference skips those pixels too; tiles the box misses
//     are left out of the binning for the same reason;
//   * pixels go four at a time through vector code (SSE baseline, an AVX2 clone where the CPU
//     has it), and a tile's next Gaussians are prefetched;
//   * projection, binning and compositing run on std::threads (compositing: dynamic schedule,
//     one tile = one task), and no result depends on the thread count;
//   * a tile stops at the first Gaussian after which all its pixels have terminated.
#include "raster.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <thread>
#include <vector>

namespace vist3a::cpu_raster {
namespace {

constexpr double kAlphaMax = 0.999;              // gsplat caps alpha so 1 - alpha never reaches 0
constexpr double kAlphaMin = 1.0 / 255.0;        // contributions below one 8-bit step are skipped
constexpr double kTransmittanceMin = 1e-4;       // the pixel ends before T would reach this
constexpr double kNormalizeEps = 1e-12;          // torch.nn.functional.normalize's floor
constexpr double kSigmaCutMargin = 1e-9;         // per-pixel early skip: far above the error of exp
constexpr double kBoxSigmaSlack = 0.05;          // pixel box (and tile binning): generous room ...
constexpr double kBoxSigmaScale = 1.01;          // ... around sigma_cut, absolute and relative
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

// Runs fn(worker) on ``threads`` workers (the caller is worker 0) and joins them.
template <class Fn>
void run_workers(int threads, Fn&& fn) {
  std::vector<std::thread> pool;
  pool.reserve(threads > 1 ? threads - 1 : 0);
  for (int worker = 1; worker < threads; ++worker) pool.emplace_back(fn, worker);
  fn(0);
  for (auto& thread : pool) thread.join();
}

// [begin, end) of ``count`` items for ``worker`` of ``threads`` (contiguous, balanced).
inline std::pair<int64_t, int64_t> share(int64_t count, int worker, int threads) {
  return {count * worker / threads, count * (worker + 1) / threads};
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

// Real SH basis at the unit direction (x, y, z), degrees 0..degree, coefficient k = l*l + l + m:
// reduced associated Legendre functions with the Condon-Shortley phase times Re/Im (x + i y)^m,
// the same two recurrences as vist3a_rt/rendering/sh.py.
void sh_basis(int degree, double x, double y, double z, double* basis) {
  double q[kMaxShDegree + 1][kMaxShDegree + 1];
  double double_factorial = 1;
  for (int m = 0; m <= degree; ++m) {
    if (m > 0) double_factorial *= 2 * m - 1;
    q[m][m] = (m % 2 ? -1.0 : 1.0) * double_factorial;
    if (m + 1 <= degree) q[m + 1][m] = (2 * m + 1) * z * q[m][m];
    for (int l = m + 2; l <= degree; ++l)
      q[l][m] = kShNorm.step_a[l][m] * z * q[l - 1][m] - kShNorm.step_b[l][m] * q[l - 2][m];
  }
  double cos_m[kMaxShDegree + 1], sin_m[kMaxShDegree + 1];
  cos_m[0] = 1;
  sin_m[0] = 0;
  for (int m = 1; m <= degree; ++m) {
    cos_m[m] = x * cos_m[m - 1] - y * sin_m[m - 1];
    sin_m[m] = x * sin_m[m - 1] + y * cos_m[m - 1];
  }
  for (int l = 0; l <= degree; ++l)
    for (int m = -l; m <= l; ++m) {
      int a = m < 0 ? -m : m;
      basis[l * l + l + m] = kShNorm.value[l][a] * q[l][a] * (m >= 0 ? cos_m[a] : sin_m[a]);
    }
}

// ------------------------------------------------------------------------------ projection

struct Projected {  // per input Gaussian
  std::unique_ptr<Splat[]> splat;  // uninitialised: only drawn entries are written and read
  std::vector<TileRect> tiles;
  std::vector<double> depth;
  std::vector<uint8_t> drawn;  // visible and opaque enough to ever reach alpha >= 1/255
};

struct Projector {
  const Scene& scene;
  const Camera& cam;
  const Settings& set;
  int degree;
  int tiles_x, tiles_y;

  // Projects Gaussian i; returns its radius (0 = dropped) and fills the outputs when drawn.
  int32_t project(int64_t i, Projected& out) const {
    const double* V = cam.viewmat;
    const float* m = scene.means + 3 * i;
    const double mx = m[0], my = m[1], mz = m[2];
    const double xc = V[0] * mx + V[1] * my + V[2] * mz + V[3];
    const double yc = V[4] * mx + V[5] * my + V[6] * mz + V[7];
    const double zc = V[8] * mx + V[9] * my + V[10] * mz + V[11];
    if (!(zc >= set.near_plane && zc <= set.far_plane)) return 0;

    // R S from the normalised w-first quaternion, column j scaled by s_j.
    const float* q = scene.quats + 4 * i;
    const double qn = std::max(std::sqrt(double(q[0]) * q[0] + double(q[1]) * q[1] +
                                         double(q[2]) * q[2] + double(q[3]) * q[3]), kNormalizeEps);
    const double w = q[0] / qn, x = q[1] / qn, y = q[2] / qn, z = q[3] / qn;
    const double R[9] = {1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                         2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                         2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)};
    const float* s = scene.scales + 3 * i;

    // Perspective Jacobian with x/z, y/z clamped a little beyond the image (gsplat's rule).
    const double tan_x = 0.5 * cam.width / cam.fx, tan_y = 0.5 * cam.height / cam.fy;
    const double u = std::min(std::max(xc / zc, -(cam.cx / cam.fx + 0.3 * tan_x)),
                              (cam.width - cam.cx) / cam.fx + 0.3 * tan_x);
    const double v = std::min(std::max(yc / zc, -(cam.cy / cam.fy + 0.3 * tan_y)),
                              (cam.height - cam.cy) / cam.fy + 0.3 * tan_y);
    const double J[6] = {cam.fx / zc, 0, -cam.fx * u / zc, 0, cam.fy / zc, -cam.fy * v / zc};
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
    const double px = xc / zc * cam.fx + cam.cx, py = yc / zc * cam.fy + cam.cy;
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
    sp.conic_xx = cov_yy / det;
    sp.conic_xy = -cov_xy / det;
    sp.conic_yy = cov_xx / det;
    sp.opacity = opacity;
    const double sigma_cut = std::log(255.0 * double(opacity));  // alpha >= 1/255 <=> sigma <= this
    sp.sigma_skip = sigma_cut + kSigmaCutMargin;
    colour(i, sp.feature);
    sp.feature[3] = float(zc);

    // Pixel box of the ellipse 1/2 d^T cov^-1 d <= s: half-widths sqrt(2 s cov_xx), sqrt(2 s cov_yy).
    const double s_box = std::max(sigma_cut, 0.0) * kBoxSigmaScale + kBoxSigmaSlack;
    const double ext_x = std::sqrt(2 * s_box * cov_xx), ext_y = std::sqrt(2 * s_box * cov_yy);
    auto pixel = [](double value, int size) {  // clamp to [-1, size] before the int conversion
      return int32_t(std::min(std::max(value, -1.0), double(size)));
    };
    sp.box_x0 = pixel(std::floor(px - ext_x - 0.5) - 1, cam.width);
    sp.box_x1 = pixel(std::ceil(px + ext_x - 0.5) + 1, cam.width);
    sp.box_y0 = pixel(std::floor(py - ext_y - 0.5) - 1, cam.height);
    sp.box_y1 = pixel(std::ceil(py + ext_y - 0.5) + 1, cam.height);

    // Tiles: the reference's radius box [floor((m - r)/ts), ceil((m + r)/ts)), then only the
    // tiles that also meet the pixel box (the others would composite nothing).
    const double ts = set.tile_size, r = radius;
    auto tile = [](double value, int tiles) {
      return int32_t(std::min(std::max(value, 0.0), double(tiles)));
    };
    TileRect& t = out.tiles[i];
    t.x0 = std::max(tile(std::floor((px - r) / ts), tiles_x), tile(std::floor(sp.box_x0 / ts), tiles_x));
    t.x1 = std::min(tile(std::ceil((px + r) / ts), tiles_x), tile(std::floor(sp.box_x1 / ts) + 1, tiles_x));
    t.y0 = std::max(tile(std::floor((py - r) / ts), tiles_y), tile(std::floor(sp.box_y0 / ts), tiles_y));
    t.y1 = std::min(tile(std::ceil((py + r) / ts), tiles_y), tile(std::floor(sp.box_y1 / ts) + 1, tiles_y));
    return radius_px;
  }

  // rgb = max(SH(normalize(mean - centre)) + 0.5, 0)
  void colour(int64_t i, float* rgb) const {
    const float* m = scene.means + 3 * i;
    double d[3] = {m[0] - cam.centre[0], m[1] - cam.centre[1], m[2] - cam.centre[2]};
    const double n = std::max(std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), kNormalizeEps);
    double basis[(kMaxShDegree + 1) * (kMaxShDegree + 1)];
    sh_basis(degree, d[0] / n, d[1] / n, d[2] / n, basis);
    const float* coeffs = scene.sh + int64_t(scene.num_coeffs) * 3 * i;
    double sum[3] = {0.0, 0.0, 0.0};  // three independent chains, coefficients read in order
    for (int k = 0; k < scene.num_coeffs; ++k)
      for (int c = 0; c < 3; ++c) sum[c] += basis[k] * coeffs[3 * k + c];
    for (int c = 0; c < 3; ++c) rgb[c] = float(std::max(sum[c] + 0.5, 0.0));
  }
};

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

// Four pixels of a tile row at a time, in float64: the rules compare against thresholds
// (alpha >= 1/255, T(1 - alpha) <= 1e-4), and float32 maths would put a pixel on the other
// side of one now and then (a visible error of up to ~alpha T). GCC/Clang vector extensions
// compile to SSE2 (two instructions per vector) on x86-64, to NEON on ARM. Each lane is one
// pixel and sees the tile's Gaussians in order, so lanes follow the scalar rules exactly.
constexpr int kLanes = 4;
constexpr int kPrefetch = 4;  // Gaussians ahead in a tile's list
typedef double Doubles __attribute__((vector_size(32)));
typedef int64_t Masks __attribute__((vector_size(32)));  // lane masks: -1 true, 0 false
// Helpers taking or returning vectors are always inlined: a 32-byte vector crosses a call
// differently with and without AVX, and the AVX2 clone below must never call an SSE copy.
#define VIST3A_INLINE __attribute__((always_inline)) inline

VIST3A_INLINE Doubles broadcast(double v) { return Doubles{v, v, v, v}; }
VIST3A_INLINE Masks broadcast_mask(int64_t v) { return Masks{v, v, v, v}; }
VIST3A_INLINE bool any(Masks mask) { return ((mask[0] | mask[1]) | (mask[2] | mask[3])) != 0; }
VIST3A_INLINE Doubles select(Masks mask, Doubles yes, Doubles no) {
  return (Doubles)(((Masks)yes & mask) | ((Masks)no & ~mask));
}

// exp(x) for x <= 0 (x = -sigma), Cephes' rational approximation (~1 ulp, like libm's exp);
// lanes below -700 give ~1e-304 instead of underflowing further (alpha is then skipped anyway).
VIST3A_INLINE Doubles exp_negative(Doubles x) {
  const Doubles floor_x = broadcast(-700.0);
  x = select(x < floor_x, floor_x, x);
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

// Storage for vectors, 32-byte aligned whatever the target: without AVX the compiler gives a
// 32-byte vector type only 16-byte alignment, while the AVX2 clone loads it with aligned moves.
template <class Vector>
class AlignedArray {
 public:
  AlignedArray() = default;
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
  ~AlignedArray() { release(); }
  void fill(size_t count, Vector value) {
    if (count > capacity_) {
      release();
      data_ = static_cast<Vector*>(::operator new(count * sizeof(Vector), std::align_val_t{32}));
      capacity_ = count;
    }
    std::fill_n(data_, count, value);
  }
  Vector& operator[](size_t i) { return data_[i]; }

 private:
  void release() {
    if (data_) ::operator delete(data_, std::align_val_t{32});
    data_ = nullptr;
    capacity_ = 0;
  }
  Vector* data_ = nullptr;
  size_t capacity_ = 0;
};

struct TileState {  // one worker's scratch for one tile; rows padded to whole lane groups
  int stride = 0;
  AlignedArray<Doubles> trans, red, green, blue, depth;
  AlignedArray<Masks> done;  // the pixel met its terminating Gaussian
  void reset(int rows, int cols) {
    stride = (cols + kLanes - 1) / kLanes;
    const size_t groups = size_t(rows) * stride;
    trans.fill(groups, broadcast(1.0));
    for (auto* v : {&red, &green, &blue, &depth}) v->fill(groups, broadcast(0.0));
    done.fill(groups, broadcast_mask(0));
  }
};

// The baseline build is x86-64-v2 (SSE4.2); on Linux x86-64 the compositing loop is also
// compiled for AVX2 and picked at load time when the CPU has it (same maths, no FMA: the same
// bits either way, see -ffp-contract=off in CMakeLists.txt).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define VIST3A_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VIST3A_SIMD_CLONES
#endif

VIST3A_SIMD_CLONES
void composite_tile(const Bins& bins, int tile, int tiles_x, const Camera& cam,
                    const Settings& set, const float* background, TileState& st,
                    const Image& image) {
  const int ts = set.tile_size;
  const int col0 = (tile % tiles_x) * ts, row0 = (tile / tiles_x) * ts;
  const int cols = std::min(ts, cam.width - col0), rows = std::min(ts, cam.height - row0);
  const int pixels = cols * rows;
  st.reset(rows, cols);
  const Masks lane = Masks{0, 1, 2, 3};
  const Doubles lane_centre = Doubles{0.5, 1.5, 2.5, 3.5};  // pixel centres relative to the group
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
    const Doubles opacity = broadcast(sp.opacity), skip = broadcast(sp.sigma_skip);
    const Doubles cxx = broadcast(sp.conic_xx), cxy = broadcast(sp.conic_xy), cyy = broadcast(sp.conic_yy);
    const Doubles fr = broadcast(sp.feature[0]), fg = broadcast(sp.feature[1]);
    const Doubles fb = broadcast(sp.feature[2]), fz = broadcast(sp.feature[3]);
    const double conic_det = sp.conic_xx * sp.conic_yy - sp.conic_xy * sp.conic_xy;
    for (int y = y0; y <= y1; ++y) {
      // This row's columns where sigma <= sigma_skip: 1/2 a dx^2 + b dy dx + 1/2 c dy^2 <= s
      // gives dx in (-b dy -+ sqrt(2 a s - (a c - b^2) dy^2)) / a; widened by a hair so that
      // rounding here never drops a pixel (each lane is tested exactly below).
      const double row_dy = (y + 0.5) - sp.mean_y;
      const double disc = 2 * sp.conic_xx * sp.sigma_skip - conic_det * row_dy * row_dy;
      if (disc < 0) continue;
      const double root = std::sqrt(disc), centre = -sp.conic_xy * row_dy;
      const double lo = (centre - root) / sp.conic_xx, hi = (centre + root) / sp.conic_xx;
      const double slack = 1e-6 + 1e-9 * (std::abs(lo) + std::abs(hi));
      const double span_x0 = std::ceil(sp.mean_x + lo - 0.5 - slack);
      const double span_x1 = std::floor(sp.mean_x + hi - 0.5 + slack);
      const int row_x0 = span_x0 > x0 ? int(std::min(span_x0, double(x1 + 1))) : x0;
      const int row_x1 = span_x1 < x1 ? int(std::max(span_x1, double(x0 - 1))) : x1;
      if (row_x0 > row_x1) continue;
      const int g0 = (row_x0 - col0) / kLanes, g1 = (row_x1 - col0) / kLanes;
      const Masks first_col = broadcast_mask(row_x0), last_col = broadcast_mask(row_x1);
      const Doubles dy = broadcast(row_dy);
      const Doubles yy = cyy * dy * dy, xy = cxy * dy;
      const size_t row = size_t(y - row0) * st.stride;
      for (int g = g0; g <= g1; ++g) {
        const int first = col0 + g * kLanes;
        const Masks col = lane + broadcast_mask(first);
        const Doubles dx = (broadcast(double(first)) + lane_centre) - broadcast(sp.mean_x);
        // the reference's 1/2 (a dx^2 + c dy^2) + b dx dy
        const Doubles sigma = broadcast(0.5) * (cxx * dx * dx + yy) + xy * dx;
        Masks live = (col >= first_col) & (col <= last_col) & ~st.done[row + g] &
                     (sigma >= broadcast(0.0)) & (sigma <= skip);
        if (!any(live)) continue;
        Doubles alpha = opacity * exp_negative(-sigma);
        alpha = select(alpha > broadcast(kAlphaMax), broadcast(kAlphaMax), alpha);
        live &= alpha >= broadcast(kAlphaMin);
        if (!any(live)) continue;
        const Doubles trans = st.trans[row + g];
        const Doubles next = trans * (broadcast(1.0) - alpha);
        const Masks ends = live & (next <= broadcast(kTransmittanceMin));
        if (any(ends)) {  // these pixels end here; this Gaussian is excluded from them
          st.done[row + g] |= ends;
          for (int j = 0; j < kLanes; ++j) finished += ends[j] != 0;
          live &= ~ends;
        }
        const Doubles weight = select(live, alpha * trans, broadcast(0.0));
        st.red[row + g] += weight * fr;
        st.green[row + g] += weight * fg;
        st.blue[row + g] += weight * fb;
        st.depth[row + g] += weight * fz;
        st.trans[row + g] = select(live, next, trans);
      }
    }
  }

  const double bg[3] = {background ? background[0] : 0.0, background ? background[1] : 0.0,
                        background ? background[2] : 0.0};
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const size_t g = size_t(r) * st.stride + c / kLanes;
      const int j = c % kLanes;
      const double trans = st.trans[g][j];
      const int64_t out = int64_t(row0 + r) * cam.width + col0 + c;
      const double rgb[3] = {st.red[g][j] + trans * bg[0], st.green[g][j] + trans * bg[1],
                             st.blue[g][j] + trans * bg[2]};
      for (int ch = 0; ch < 3; ++ch)
        image.color[3 * out + ch] = float(set.clamp_color ? std::min(std::max(rgb[ch], 0.0), 1.0) : rgb[ch]);
      image.depth[out] = float(st.depth[g][j]);
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
  Projected proj;
  proj.splat.reset(new Splat[n]);
  proj.tiles.resize(n);
  proj.depth.assign(n, 0.0);
  proj.drawn.assign(n, 0);
  const Projector projector{scene, cam, set, degree, tiles_x, tiles_y};
  run_workers(threads, [&](int worker) {
    auto [begin, end] = share(n, worker, threads);
    for (int64_t i = begin; i < end; ++i) image.radii[i] = projector.project(i, proj);
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
