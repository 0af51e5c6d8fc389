// ResNeSt's radix reductions for models/radix.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>

#include "runtime.h"

namespace {

using resgarden::IsFloat32;

// ResNeSt's split attention over an NCHW float32 tensor x of radix * C channels, radix-major
// (channel r * C + c is split r of channel c), per (image, channel c) task:
// pool:    gap[b, c] = mean over (h, w) of sum over r of x[b, r * C + c]   (dx = dgap / (h * w))
// combine: out[b, c] = sum over r of x[b, r * C + c] * attn[b, r * C + c]
//          dx[b, r * C + c] = dout[b, c] * attn[b, r * C + c],
//          dattn[b, r * C + c] = sum over (h, w) of dout[b, c] * x[b, r * C + c]
struct Splits {
  int64_t batch, radix, c, hw;
  int64_t Plane(int64_t image, int64_t r, int64_t ch) const { return (image * radix + r) * c + ch; }
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixPoolTask(const Splits &g, int64_t image, int64_t ch, const float *x, float *gap) {
  float total = 0;
  for (int64_t r = 0; r < g.radix; ++r) {
    const float *row = x + g.Plane(image, r, ch) * g.hw;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) sum += row[j];
    total += sum;
  }
  gap[image * g.c + ch] = total / static_cast<float>(g.hw);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixPoolBackwardTask(const Splits &g, int64_t image, int64_t ch, const float *dgap, float *dx) {
  const float value = dgap[image * g.c + ch] / static_cast<float>(g.hw);
  for (int64_t r = 0; r < g.radix; ++r) {
    float *row = dx + g.Plane(image, r, ch) * g.hw;
#pragma omp simd
    for (int64_t j = 0; j < g.hw; ++j) row[j] = value;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixCombineTask(const Splits &g, int64_t image, int64_t ch, const float *x, const float *attn, float *out) {
  float *dst = out + (image * g.c + ch) * g.hw;
  for (int64_t r = 0; r < g.radix; ++r) {
    const int64_t plane = g.Plane(image, r, ch);
    const float *row = x + plane * g.hw, weight = attn[plane];
    if (r == 0) {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) dst[j] = row[j] * weight;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) dst[j] += row[j] * weight;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixCombineBackwardTask(const Splits &g, int64_t image, int64_t ch, const float *dout, const float *x,
                              const float *attn, float *dx, float *dattn) {
  const float *grad = dout + (image * g.c + ch) * g.hw;
  for (int64_t r = 0; r < g.radix; ++r) {
    const int64_t plane = g.Plane(image, r, ch);
    const float *row = x + plane * g.hw, weight = attn[plane];
    float *out = dx + plane * g.hw, sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) {
      out[j] = grad[j] * weight;
      sum += grad[j] * row[j];
    }
    dattn[plane] = sum;
  }
}

// The same over the blocked layout of the native convolutions (models/blocked.py): x is the 5-D
// tensor (B, radix * C / W, H, W, W), channel c lane c % W of block c / W; C is whole blocks, so
// block cb of merged channels gathers block r * C / W + cb of every split r. One (image, merged
// block) per task, vectorised across its W lanes; the per-split and per-channel vectors stay
// [B, radix * C, 1, 1] and [B, C, 1, 1].
struct BlockedSplits {
  int64_t batch, radix, c, hw;  // c: channels per split
  int64_t Block(int64_t image, int64_t r, int64_t cb, int width) const {
    return ((image * radix + r) * (c / width) + cb) * hw * width;
  }
  int64_t Lane(int64_t image, int64_t r, int64_t cb, int width) const { return (image * radix + r) * c + cb * width; }
};

template <int W>
inline __attribute__((always_inline)) void RadixPoolBlockOf(const BlockedSplits &g, int64_t image, int64_t cb,
                                                             const float *x, float *gap) {
  float total[W] = {};
  for (int64_t r = 0; r < g.radix; ++r) {
    const float *block = x + g.Block(image, r, cb, W);
    float sum[W] = {};
    for (int64_t p = 0; p < g.hw; ++p) {
#pragma omp simd
      for (int l = 0; l < W; ++l) sum[l] += block[p * W + l];
    }
    for (int l = 0; l < W; ++l) total[l] += sum[l];
  }
  for (int l = 0; l < W; ++l) gap[image * g.c + cb * W + l] = total[l] / static_cast<float>(g.hw);
}

template <int W>
inline __attribute__((always_inline)) void RadixPoolBackwardBlockOf(const BlockedSplits &g, int64_t image,
                                                                     int64_t cb, const float *dgap, float *dx) {
  float value[W];
  for (int l = 0; l < W; ++l) value[l] = dgap[image * g.c + cb * W + l] / static_cast<float>(g.hw);
  for (int64_t r = 0; r < g.radix; ++r) {
    float *block = dx + g.Block(image, r, cb, W);
    for (int64_t p = 0; p < g.hw; ++p) {
#pragma omp simd
      for (int l = 0; l < W; ++l) block[p * W + l] = value[l];
    }
  }
}

template <int W>
inline __attribute__((always_inline)) void RadixCombineBlockOf(const BlockedSplits &g, int64_t image, int64_t cb,
                                                                const float *x, const float *attn, float *out) {
  float *dst = out + (image * (g.c / W) + cb) * g.hw * W;
  for (int64_t r = 0; r < g.radix; ++r) {
    const float *block = x + g.Block(image, r, cb, W), *weight = attn + g.Lane(image, r, cb, W);
    for (int64_t p = 0; p < g.hw; ++p) {
      if (r == 0) {
#pragma omp simd
        for (int l = 0; l < W; ++l) dst[p * W + l] = block[p * W + l] * weight[l];
      } else {
#pragma omp simd
        for (int l = 0; l < W; ++l) dst[p * W + l] += block[p * W + l] * weight[l];
      }
    }
  }
}

template <int W>
inline __attribute__((always_inline)) void RadixCombineBackwardBlockOf(const BlockedSplits &g, int64_t image,
                                                                        int64_t cb, const float *dout,
                                                                        const float *x, const float *attn, float *dx,
                                                                        float *dattn) {
  const float *grad = dout + (image * (g.c / W) + cb) * g.hw * W;
  for (int64_t r = 0; r < g.radix; ++r) {
    const int64_t at = g.Block(image, r, cb, W), lane = g.Lane(image, r, cb, W);
    const float *block = x + at, *weight = attn + lane;
    float *out = dx + at, sum[W] = {};
    for (int64_t p = 0; p < g.hw; ++p) {
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        out[p * W + l] = grad[p * W + l] * weight[l];
        sum[l] += grad[p * W + l] * block[p * W + l];
      }
    }
    for (int l = 0; l < W; ++l) dattn[lane + l] = sum[l];
  }
}

enum class RadixOp { kPool, kPoolBackward, kCombine, kCombineBackward };

// One blocked task of `op` for a block width of 16 (AVX-512) or 8; f: the parameters as RunRadix has them.
template <int W>
inline __attribute__((always_inline)) void RadixBlockOf(RadixOp op, const BlockedSplits &g, int64_t image,
                                                         int64_t cb, float *const *f) {
  switch (op) {
    case RadixOp::kPool: RadixPoolBlockOf<W>(g, image, cb, f[0], f[1]); break;
    case RadixOp::kPoolBackward: RadixPoolBackwardBlockOf<W>(g, image, cb, f[0], f[2]); break;
    case RadixOp::kCombine: RadixCombineBlockOf<W>(g, image, cb, f[0], f[1], f[2]); break;
    case RadixOp::kCombineBackward: RadixCombineBackwardBlockOf<W>(g, image, cb, f[0], f[1], f[2], f[3], f[4]); break;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixBlock(RadixOp op, const BlockedSplits &g, int width, int64_t image, int64_t cb, float *const *f) {
  if (width == 16)
    RadixBlockOf<16>(op, g, image, cb, f);
  else
    RadixBlockOf<8>(op, g, image, cb, f);
}

// Parameters (inputs then outputs; x is [B, radix * C, H, W] or blocked (B, radix * C / W, H, W, W), the
// merged full tensors [B, C, H, W] in x's layout, the per-split vectors [B, radix * C, 1, 1], the
// per-channel ones [B, C, 1, 1]):
// pool: x, gap | pool backward: dgap, x, dx | combine: x, attn, out | combine backward: dout, x, attn, dx, dattn.
int RunRadix(RadixOp op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // Each parameter's role: x (split, full), a (split, 1x1), m (merged, full), g (merged, 1x1).
  static const char *kRoles[] = {"xg", "gxx", "xam", "mxaxa"};
  const std::string roles = kRoles[static_cast<int>(op)];
  auto full = [&](int i) { return roles[i] == 'x' || roles[i] == 'm'; };
  bool ok = nparam == static_cast<int>(roles.size());
  const int x_index = static_cast<int>(roles.find('x'));
  const bool blocked = ok && ndims[x_index] == 5;
  const int64_t width = blocked ? shapes[x_index][4] : 1;
  ok = ok && (width == 1 || width == 8 || width == 16);
  for (int i = 0; ok && i < nparam; ++i) ok = IsFloat32(ndims[i], full(i) && blocked ? 5 : 4, dtypes[i]);
  auto channels = [&](int i) { return shapes[i][1] * (ndims[i] == 5 ? shapes[i][4] : 1); };
  const int64_t *xs = ok ? shapes[x_index] : nullptr;
  const int64_t split_channels = ok ? channels(x_index) : 0;
  const int64_t merged = ok ? channels(static_cast<int>(roles.find_first_of("mg"))) : 0;
  ok = ok && merged > 0 && split_channels % merged == 0 && merged % width == 0;
  for (int i = 0; ok && i < nparam; ++i) {
    const bool split = roles[i] == 'x' || roles[i] == 'a';
    const int64_t *shape = shapes[i];
    ok = shape[0] == xs[0] && channels(i) == (split ? split_channels : merged) &&
         shape[2] == (full(i) ? xs[2] : 1) && shape[3] == (full(i) ? xs[3] : 1) &&
         (ndims[i] == 4 || shape[4] == width);
  }
  if (!ok) {
    std::fprintf(stderr, "resgarden native split attention: unexpected parameters (%d float32, NCHW or blocked)\n",
                 nparam);
    return 1;
  }
  const int64_t radix = split_channels / merged, hw = xs[2] * xs[3];
  const int w = static_cast<int>(width);
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  float *buffers[5] = {};
  for (int i = 0; i < nparam; ++i) buffers[i] = f(i);
  const Splits g{xs[0], radix, merged, hw};
  const BlockedSplits bg{xs[0], radix, merged, hw};
  std::function<void(int64_t, int64_t)> work;  // (image, channel or block of merged channels)
  if (blocked) {
    work = [&](int64_t b, int64_t cb) { RadixBlock(op, bg, w, b, cb, buffers); };
  } else {
    switch (op) {
      case RadixOp::kPool: work = [&](int64_t b, int64_t c) { RadixPoolTask(g, b, c, f(0), f(1)); }; break;
      case RadixOp::kPoolBackward:
        work = [&](int64_t b, int64_t c) { RadixPoolBackwardTask(g, b, c, f(0), f(2)); };
        break;
      case RadixOp::kCombine: work = [&](int64_t b, int64_t c) { RadixCombineTask(g, b, c, f(0), f(1), f(2)); }; break;
      case RadixOp::kCombineBackward:
        work = [&](int64_t b, int64_t c) { RadixCombineBackwardTask(g, b, c, f(0), f(1), f(2), f(3), f(4)); };
        break;
    }
  }
  const int64_t units = merged / width;
  std::function<void(int, int)> task = [&](int i, int) { work(i / units, i % units); };
  resgarden::ParallelFor(static_cast<int>(xs[0] * units), task);
  return 0;
}

}  // namespace

extern "C" {
int RadixPool(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kPool, nparam, params, ndims, shapes, dtypes);
}
int RadixPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kPoolBackward, nparam, params, ndims, shapes, dtypes);
}
int RadixCombine(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kCombine, nparam, params, ndims, shapes, dtypes);
}
int RadixCombineBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kCombineBackward, nparam, params, ndims, shapes, dtypes);
}
}
