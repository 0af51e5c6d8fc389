// Average pooling of the blocked layout (models/blocked.py) for models/pooling.py: ResNeSt's avd pool
// and the avg-pool shortcuts (ResNet-D), which MindSpore would pool in NCHW only.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>

#include "runtime.h"

namespace {

using resgarden::IsFloat32;

// k x k windows at stride s over (N, C / W, H, W, W) float32, padded as models/layers.py: pool3x3 pads:
// "same" (MindSpore's: out = ceil(in / s), the odd extra row / column at the bottom / right, averages
// over the window's pixels inside the map) or "pad" ((k - 1) / 2 pixels of zeros on every side,
// counted: every average is over k * k). One (image, block) plane per task, vectorised across its W lanes.
struct PoolShape {
  int64_t h, w, oh, ow, kernel, stride, top, left;
  bool same;
  // The window of output (oh, ow), clipped to the map, and the count its sum is divided by.
  void Window(int64_t y, int64_t x, int64_t *h0, int64_t *h1, int64_t *w0, int64_t *w1, float *count) const {
    const int64_t top_row = y * stride - top, left_col = x * stride - left;
    *h0 = top_row < 0 ? 0 : top_row;
    *w0 = left_col < 0 ? 0 : left_col;
    *h1 = top_row + kernel > h ? h : top_row + kernel;
    *w1 = left_col + kernel > w ? w : left_col + kernel;
    *count = static_cast<float>(same ? (*h1 - *h0) * (*w1 - *w0) : kernel * kernel);
  }
};

template <int W>
inline __attribute__((always_inline)) void AvgPoolPlaneOf(const PoolShape &g, const float *x, float *y) {
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      int64_t h0, h1, w0, w1;
      float count;
      g.Window(oy, ox, &h0, &h1, &w0, &w1, &count);
      float sum[W] = {};
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const float *pixel = x + (h * g.w + w) * W;
#pragma omp simd
          for (int l = 0; l < W; ++l) sum[l] += pixel[l];
        }
      }
      float *out = y + (oy * g.ow + ox) * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) out[l] = sum[l] / count;
    }
  }
}

template <int W>
inline __attribute__((always_inline)) void AvgPoolBackwardPlaneOf(const PoolShape &g, const float *dy, float *dx) {
  std::memset(dx, 0, sizeof(float) * g.h * g.w * W);
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    for (int64_t ox = 0; ox < g.ow; ++ox) {
      int64_t h0, h1, w0, w1;
      float count, grad[W];
      g.Window(oy, ox, &h0, &h1, &w0, &w1, &count);
      const float *from = dy + (oy * g.ow + ox) * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) grad[l] = from[l] / count;
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          float *pixel = dx + (h * g.w + w) * W;
#pragma omp simd
          for (int l = 0; l < W; ++l) pixel[l] += grad[l];
        }
      }
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void AvgPoolPlane(const PoolShape &g, int width, const float *x, float *y) {
  if (width == 16)
    AvgPoolPlaneOf<16>(g, x, y);
  else
    AvgPoolPlaneOf<8>(g, x, y);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void AvgPoolBackwardPlane(const PoolShape &g, int width, const float *dy, float *dx) {
  if (width == 16)
    AvgPoolBackwardPlaneOf<16>(g, dy, dx);
  else
    AvgPoolBackwardPlaneOf<8>(g, dy, dx);
}

// Forward: x, cfg = [kernel, stride, same] (int64), y. Backward: dy, x (its shape), cfg, dx.
int RunAvgPool(bool backward, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int x_at = backward ? 1 : 0, y_at = backward ? 0 : 2, cfg_at = backward ? 2 : 1;
  bool ok = nparam == (backward ? 4 : 3) && ndims[cfg_at] == 1 && shapes[cfg_at][0] == 3 &&
            std::strcmp(dtypes[cfg_at], "int64") == 0;
  for (int i : {x_at, y_at, backward ? 3 : x_at}) ok = ok && IsFloat32(ndims[i], 5, dtypes[i]);
  const int64_t *xs = ok ? shapes[x_at] : nullptr, *ys = ok ? shapes[y_at] : nullptr;
  ok = ok && (xs[4] == 8 || xs[4] == 16) && xs[0] == ys[0] && xs[1] == ys[1] && xs[4] == ys[4] &&
       (!backward || std::memcmp(shapes[3], xs, 5 * sizeof(int64_t)) == 0);
  const int64_t *cfg = ok ? static_cast<int64_t *>(params[cfg_at]) : nullptr;
  ok = ok && cfg[0] > 0 && cfg[1] > 0;
  if (!ok) {
    std::fprintf(stderr, "resgarden native average pool: unexpected parameters (%d, float32 blocked)\n", nparam);
    return 1;
  }
  PoolShape g{xs[2], xs[3], ys[2], ys[3], cfg[0], cfg[1], (cfg[0] - 1) / 2, (cfg[0] - 1) / 2, cfg[2] != 0};
  if (g.same) {
    g.top = resgarden::SamePaddingBefore(g.h, g.oh, g.kernel, g.stride);
    g.left = resgarden::SamePaddingBefore(g.w, g.ow, g.kernel, g.stride);
  }
  const int width = static_cast<int>(xs[4]);
  const int64_t in_plane = g.h * g.w * width, out_plane = g.oh * g.ow * width;
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  std::function<void(int, int)> task;
  if (backward)
    task = [&](int p, int) { AvgPoolBackwardPlane(g, width, f(0) + p * out_plane, f(3) + p * in_plane); };
  else
    task = [&](int p, int) { AvgPoolPlane(g, width, f(0) + p * in_plane, f(2) + p * out_plane); };
  resgarden::ParallelFor(static_cast<int>(xs[0] * xs[1]), task);
  return 0;
}

}  // namespace

extern "C" {
int AvgPool(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunAvgPool(false, nparam, params, ndims, shapes, dtypes);
}
int AvgPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunAvgPool(true, nparam, params, ndims, shapes, dtypes);
}
}
