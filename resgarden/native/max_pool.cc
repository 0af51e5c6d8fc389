// The 3x3 max pool for models/pooling.py, NCHW or blocked.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>

#include "runtime.h"

namespace {

using resgarden::IsFloat32;

// 3x3 max pooling of float32 planes at stride s, NCHW or blocked (models/blocked.py: (N, C / W, H, W, W),
// channel c lane c % W of block c / W), padded as models/layers.py: pool3x3 pads: "pad" (a pixel of
// zeros on every side, which can be the max) or "same" (MindSpore's: out = ceil(in / s), the odd
// extra row / column at the bottom / right, never the max). The forward also returns per output
// (and lane) the plane offset (h * W + w) of its max, the first in window order, or -1 for a
// padding zero; the backward scatters dy there. One (image, channel or block) plane per task; the
// planes are written for W lanes per pixel, W = 1 for NCHW.
struct PoolShape {
  int64_t h, w, oh, ow, stride, top, left;
  bool zeros;
};

// The window at (h0, w0), clipped to the plane (padding zeros as candidates in window order).
template <int W>
void MaxPoolBorder(const PoolShape &g, const float *x, int64_t h0, int64_t w0, float *y, int32_t *index) {
  for (int l = 0; l < W; ++l) {
    float best = -INFINITY;
    int32_t at = -1;
    bool first = true;
    for (int64_t h = h0; h < h0 + 3; ++h) {
      for (int64_t w = w0; w < w0 + 3; ++w) {
        const bool inside = h >= 0 && h < g.h && w >= 0 && w < g.w;
        if (!inside && !g.zeros) continue;
        const float value = inside ? x[(h * g.w + w) * W + l] : 0.f;
        if (first || value > best) {
          best = value;
          at = inside ? static_cast<int32_t>(h * g.w + w) : -1;
          first = false;
        }
      }
    }
    y[l] = best;
    index[l] = at;
  }
}

template <int W>
inline __attribute__((always_inline)) void MaxPoolPlaneOf(const PoolShape &g, const float *x, float *y,
                                                           int32_t *index) {
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    const int64_t h0 = oh * g.stride - g.top;
    const bool rows_inside = h0 >= 0 && h0 + 3 <= g.h;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t w0 = ow * g.stride - g.left;
      float *out = y + (oh * g.ow + ow) * W;
      int32_t *out_index = index + (oh * g.ow + ow) * W;
      if (!rows_inside || w0 < 0 || w0 + 3 > g.w) {
        MaxPoolBorder<W>(g, x, h0, w0, out, out_index);
        continue;
      }
      const int64_t origin = h0 * g.w + w0;
      const float *window = x + origin * W;
      float best[W];
      int32_t at[W];
      for (int l = 0; l < W; ++l) best[l] = window[l], at[l] = 0;
      for (int64_t kh = 0; kh < 3; ++kh) {
        for (int64_t kw = 0; kw < 3; ++kw) {
          const int32_t offset = static_cast<int32_t>(kh * g.w + kw);
#pragma omp simd
          for (int l = 0; l < W; ++l) {
            const float value = window[offset * W + l];
            at[l] = value > best[l] ? offset : at[l];
            best[l] = value > best[l] ? value : best[l];
          }
        }
      }
      for (int l = 0; l < W; ++l) out[l] = best[l], out_index[l] = static_cast<int32_t>(origin) + at[l];
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void MaxPoolPlane(const PoolShape &g, int width, const float *x, float *y, int32_t *index) {
  if (width == 16)
    MaxPoolPlaneOf<16>(g, x, y, index);
  else if (width == 8)
    MaxPoolPlaneOf<8>(g, x, y, index);
  else
    MaxPoolPlaneOf<1>(g, x, y, index);
}

void MaxPoolBackwardPlane(const PoolShape &g, int width, const float *dy, const int32_t *index, float *dx) {
  std::fill(dx, dx + g.h * g.w * width, 0.f);
  for (int64_t p = 0; p < g.oh * g.ow; ++p) {
    for (int l = 0; l < width; ++l) {
      const int64_t i = p * width + l;
      if (index[i] >= 0) dx[index[i] * width + l] += dy[i];
    }
  }
}

// Forward: x, cfg = [stride, same] (int64), y, index (int32). Backward: dy, index, x (its shape), cfg, dx.
// x, y, index and dx are all 4-D (NCHW) or all 5-D (blocked).
int RunMaxPool(bool backward, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int x_at = backward ? 2 : 0, y_at = backward ? 0 : 2, index_at = backward ? 1 : 3, cfg_at = backward ? 3 : 1;
  const int rank = nparam > x_at ? ndims[x_at] : 0;
  bool ok = nparam == (backward ? 5 : 4) && (rank == 4 || rank == 5) && ndims[cfg_at] == 1 &&
            shapes[cfg_at][0] == 2 && std::strcmp(dtypes[cfg_at], "int64") == 0 && ndims[index_at] == rank &&
            std::strcmp(dtypes[index_at], "int32") == 0;
  for (int i : {x_at, y_at, backward ? 4 : x_at}) ok = ok && IsFloat32(ndims[i], rank, dtypes[i]);
  const int64_t *xs = ok ? shapes[x_at] : nullptr, *ys = ok ? shapes[y_at] : nullptr;
  const int64_t width = ok && rank == 5 ? xs[4] : 1;
  ok = ok && (width == 1 || width == 8 || width == 16) &&
       std::memcmp(ys, shapes[index_at], rank * sizeof(int64_t)) == 0 && xs[0] == ys[0] && xs[1] == ys[1] &&
       (rank == 4 || ys[4] == width) && (!backward || std::memcmp(shapes[4], xs, rank * sizeof(int64_t)) == 0);
  if (!ok) {
    std::fprintf(stderr, "resgarden native max pool: unexpected parameters (%d)\n", nparam);
    return 1;
  }
  const int64_t *cfg = static_cast<int64_t *>(params[cfg_at]);
  PoolShape g{xs[2], xs[3], ys[2], ys[3], cfg[0], 1, 1, cfg[1] == 0};
  if (!g.zeros) {
    g.top = resgarden::SamePaddingBefore(g.h, g.oh, 3, g.stride);
    g.left = resgarden::SamePaddingBefore(g.w, g.ow, 3, g.stride);
  }
  const int w = static_cast<int>(width);
  const int64_t in_plane = g.h * g.w * w, out_plane = g.oh * g.ow * w;
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  auto index = static_cast<int32_t *>(params[index_at]);
  std::function<void(int, int)> task;
  if (backward)
    task = [&](int p, int) {
      MaxPoolBackwardPlane(g, w, f(0) + p * out_plane, index + p * out_plane, f(4) + p * in_plane);
    };
  else
    task = [&](int p, int) { MaxPoolPlane(g, w, f(0) + p * in_plane, f(2) + p * out_plane, index + p * out_plane); };
  resgarden::ParallelFor(static_cast<int>(xs[0] * xs[1]), task);
  return 0;
}

}  // namespace

extern "C" {
int MaxPool(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunMaxPool(false, nparam, params, ndims, shapes, dtypes);
}
int MaxPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunMaxPool(true, nparam, params, ndims, shapes, dtypes);
}
}
