// The 3x3 max pool for models/pooling.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>

#include "runtime.h"

namespace {

using resgarden::IsFloat32;

// 3x3 max pooling of NCHW float32 planes at stride s, padded as models/layers.py: pool3x3 pads:
// "pad" (a pixel of zeros on every side, which can be the max) or "same" (MindSpore's: out =
// ceil(in / s), the odd extra row / column at the bottom / right, never the max). The forward also
// returns per output the plane offset (h * W + w) of its max, the first in window order, or -1
// for a padding zero; the backward scatters dy there. One plane per task.
struct PoolShape {
  int64_t h, w, oh, ow, stride, top, left;
  bool zeros;
};

// The window at (h0, w0), clipped to the plane (padding zeros as candidates in window order).
void MaxPoolBorder(const PoolShape &g, const float *x, int64_t h0, int64_t w0, float *y, int32_t *index) {
  float best = -INFINITY;
  int32_t at = -1;
  bool first = true;
  for (int64_t h = h0; h < h0 + 3; ++h) {
    for (int64_t w = w0; w < w0 + 3; ++w) {
      const bool inside = h >= 0 && h < g.h && w >= 0 && w < g.w;
      if (!inside && !g.zeros) continue;
      const float value = inside ? x[h * g.w + w] : 0.f;
      if (first || value > best) {
        best = value;
        at = inside ? static_cast<int32_t>(h * g.w + w) : -1;
        first = false;
      }
    }
  }
  *y = best;
  *index = at;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void MaxPoolPlane(const PoolShape &g, const float *x, float *y, int32_t *index) {
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    const int64_t h0 = oh * g.stride - g.top;
    const bool rows_inside = h0 >= 0 && h0 + 3 <= g.h;
    float *out = y + oh * g.ow;
    int32_t *out_index = index + oh * g.ow;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t w0 = ow * g.stride - g.left;
      if (!rows_inside || w0 < 0 || w0 + 3 > g.w) {
        MaxPoolBorder(g, x, h0, w0, out + ow, out_index + ow);
        continue;
      }
      const int64_t origin = h0 * g.w + w0;
      const float *window = x + origin;
      float best = window[0];
      int64_t at = 0;
      for (int64_t kh = 0; kh < 3; ++kh) {
        for (int64_t kw = 0; kw < 3; ++kw) {
          const int64_t offset = kh * g.w + kw;
          const float value = window[offset];
          at = value > best ? offset : at;
          best = value > best ? value : best;
        }
      }
      out[ow] = best;
      out_index[ow] = static_cast<int32_t>(origin + at);
    }
  }
}

void MaxPoolBackwardPlane(const PoolShape &g, const float *dy, const int32_t *index, float *dx) {
  std::fill(dx, dx + g.h * g.w, 0.f);
  for (int64_t i = 0; i < g.oh * g.ow; ++i)
    if (index[i] >= 0) dx[index[i]] += dy[i];
}

// Forward: x, cfg = [stride, same] (int64), y, index (int32). Backward: dy, index, x (its shape), cfg, dx.
int RunMaxPool(bool backward, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int x_at = backward ? 2 : 0, y_at = backward ? 0 : 2, index_at = backward ? 1 : 3, cfg_at = backward ? 3 : 1;
  bool ok = nparam == (backward ? 5 : 4) && ndims[cfg_at] == 1 && shapes[cfg_at][0] == 2 &&
            std::strcmp(dtypes[cfg_at], "int64") == 0 && ndims[index_at] == 4 &&
            std::strcmp(dtypes[index_at], "int32") == 0;
  for (int i : {x_at, y_at, backward ? 4 : x_at}) ok = ok && IsFloat32(ndims[i], 4, dtypes[i]);
  ok = ok && std::memcmp(shapes[y_at], shapes[index_at], 4 * sizeof(int64_t)) == 0 &&
       shapes[x_at][0] == shapes[y_at][0] && shapes[x_at][1] == shapes[y_at][1] &&
       (!backward || std::memcmp(shapes[4], shapes[x_at], 4 * sizeof(int64_t)) == 0);
  if (!ok) {
    std::fprintf(stderr, "resgarden native max pool: unexpected parameters (%d)\n", nparam);
    return 1;
  }
  const int64_t *xs = shapes[x_at], *ys = shapes[y_at], *cfg = static_cast<int64_t *>(params[cfg_at]);
  PoolShape g{xs[2], xs[3], ys[2], ys[3], cfg[0], 1, 1, cfg[1] == 0};
  if (!g.zeros) {
    g.top = std::max<int64_t>((g.oh - 1) * g.stride + 3 - g.h, 0) / 2;
    g.left = std::max<int64_t>((g.ow - 1) * g.stride + 3 - g.w, 0) / 2;
  }
  const int64_t in_plane = g.h * g.w, out_plane = g.oh * g.ow;
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  auto index = static_cast<int32_t *>(params[index_at]);
  std::function<void(int, int)> task;
  if (backward)
    task = [&](int p, int) { MaxPoolBackwardPlane(g, f(0) + p * out_plane, index + p * out_plane, f(4) + p * in_plane); };
  else
    task = [&](int p, int) { MaxPoolPlane(g, f(0) + p * in_plane, f(2) + p * out_plane, index + p * out_plane); };
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
