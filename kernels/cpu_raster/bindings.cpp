// pybind11 module ``vist3a_rt.kernels.cpu_raster._cpu_raster``: numpy in, numpy out.
//
// Arrays must already be C-contiguous with the stated dtype (the Python wrapper makes them so);
// nothing is converted here, so a wrong array is an error rather than a silent copy.
// The GIL is released while rendering.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "raster.hpp"

namespace py = pybind11;
namespace cr = vist3a::cpu_raster;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style>;

std::string shape_of(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? "," : "") + std::to_string(a.shape(d));
  return s + "]";
}

// Raises ValueError unless ``a`` has ``shape`` (-1 matches any size).
void expect_shape(const char* name, const py::array& a, std::vector<py::ssize_t> shape) {
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || a.shape(d) == shape[d];
  if (!ok) {
    std::string want = "[";
    for (size_t d = 0; d < shape.size(); ++d)
      want += (d ? "," : "") + (shape[d] < 0 ? std::string("*") : std::to_string(shape[d]));
    throw py::value_error(std::string(name) + " must have shape " + want + "], got " + shape_of(a));
  }
}

py::tuple rasterize(Array<float> means, Array<float> quats, Array<float> scales,
                    Array<float> opacities, Array<float> sh, Array<double> viewmat,
                    Array<double> intrinsics, Array<double> centre, int width, int height,
                    std::optional<Array<float>> background, double near_plane, double far_plane,
                    double eps2d, double radius_clip, int tile_size, bool clamp_color,
                    int num_threads) {
  expect_shape("means", means, {-1, 3});
  const py::ssize_t n = means.shape(0);
  expect_shape("quats", quats, {n, 4});
  expect_shape("scales", scales, {n, 3});
  expect_shape("opacities", opacities, {n});
  expect_shape("sh", sh, {n, -1, 3});
  expect_shape("viewmat", viewmat, {4, 4});
  expect_shape("K", intrinsics, {3, 3});
  expect_shape("centre", centre, {3});
  if (background) expect_shape("background", *background, {3});
  const int k = int(sh.shape(1));
  const int degree = int(std::lround(std::sqrt(double(k)))) - 1;
  if (k < 1 || (degree + 1) * (degree + 1) != k || degree > cr::kMaxShDegree)
    throw py::value_error("sh must have K = (degree+1)^2 <= 25 coefficients, got K=" + std::to_string(k));
  if (width < 1 || height < 1 || tile_size < 1)
    throw py::value_error("width, height and tile_size must be >= 1");
  if (n >= (py::ssize_t(1) << 32)) throw py::value_error("at most 2^32 - 1 Gaussians");

  const double* V = viewmat.data();
  const double* K = intrinsics.data();
  cr::Camera camera{};
  for (int j = 0; j < 16; ++j) camera.viewmat[j] = V[j];
  camera.fx = K[0];
  camera.fy = K[4];
  camera.cx = K[2];
  camera.cy = K[5];
  for (int j = 0; j < 3; ++j) camera.centre[j] = centre.data()[j];
  camera.width = width;
  camera.height = height;
  cr::Settings settings;
  settings.near_plane = near_plane;
  settings.far_plane = far_plane;
  settings.eps2d = eps2d;
  settings.radius_clip = radius_clip;
  settings.tile_size = tile_size;
  settings.clamp_color = clamp_color;
  settings.num_threads = num_threads;
  const cr::Scene scene{means.data(), quats.data(), scales.data(), opacities.data(), sh.data(),
                        int64_t(n), k};

  Array<float> color({py::ssize_t(height), py::ssize_t(width), py::ssize_t(3)});
  Array<float> depth({py::ssize_t(height), py::ssize_t(width), py::ssize_t(1)});
  Array<float> alpha({py::ssize_t(height), py::ssize_t(width), py::ssize_t(1)});
  Array<int32_t> radii({n});
  const cr::Image image{color.mutable_data(), depth.mutable_data(), alpha.mutable_data(),
                        radii.mutable_data()};
  const float* bg = background ? background->data() : nullptr;
  cr::Stats stats;
  {
    py::gil_scoped_release release;
    stats = cr::rasterize(scene, camera, bg, settings, image);
  }
  py::dict info;
  info["project_ms"] = stats.project_ms;
  info["sort_ms"] = stats.sort_ms;
  info["bin_ms"] = stats.bin_ms;
  info["composite_ms"] = stats.composite_ms;
  info["visible"] = stats.visible;
  info["intersections"] = stats.intersections;
  info["threads"] = stats.threads;
  return py::make_tuple(color, depth, alpha, radii, info);
}

}  // namespace

PYBIND11_MODULE(_cpu_raster, m) {
  m.doc() = "C++ CPU Gaussian-splat rasterizer (forward); see vist3a_rt.kernels.cpu_raster";
  m.def("rasterize", &rasterize, py::arg("means").noconvert(), py::arg("quats").noconvert(),
        py::arg("scales").noconvert(), py::arg("opacities").noconvert(), py::arg("sh").noconvert(),
        py::arg("viewmat").noconvert(), py::arg("K").noconvert(), py::arg("centre").noconvert(),
        py::arg("width"), py::arg("height"), py::arg("background").noconvert().none(true),
        py::arg("near_plane"), py::arg("far_plane"), py::arg("eps2d"), py::arg("radius_clip"),
        py::arg("tile_size"), py::arg("clamp_color"), py::arg("num_threads") = 0,
        "Render one view; returns (color [H,W,3], depth [H,W,1], alpha [H,W,1], radii [N] int32, "
        "stats dict). Arrays: float32 scene, float64 camera, all C-contiguous.");
  m.attr("max_sh_degree") = cr::kMaxShDegree;
}
