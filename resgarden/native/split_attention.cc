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

enum class RadixOp { kPool, kPoolBackward, kCombine, kCombineBackward };

// Parameters (inputs then outputs; x is [B, radix * C, H, W], the per-split vectors [B, radix * C, 1, 1],
// the per-channel ones [B, C, 1, 1] or [B, C, H, W]):
// pool: x, gap | pool backward: dgap, x, dx | combine: x, attn, out | combine backward: dout, x, attn, dx, dattn.
int RunRadix(RadixOp op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // Each parameter's role: x (split, full), a (split, 1x1), m (merged, full), g (merged, 1x1).
  static const char *kRoles[] = {"xg", "gxx", "xam", "mxaxa"};
  const std::string roles = kRoles[static_cast<int>(op)];
  bool ok = nparam == static_cast<int>(roles.size());
  for (int i = 0; ok && i < nparam; ++i) ok = IsFloat32(ndims[i], 4, dtypes[i]);
  const int64_t *xs = ok ? shapes[roles.find('x')] : nullptr;
  const int64_t merged = ok ? shapes[roles.find_first_of("mg")][1] : 0;
  ok = ok && merged > 0 && xs[1] % merged == 0;
  for (int i = 0; ok && i < nparam; ++i) {
    const bool split = roles[i] == 'x' || roles[i] == 'a', full = roles[i] == 'x' || roles[i] == 'm';
    const int64_t *shape = shapes[i];
    ok = shape[0] == xs[0] && shape[1] == (split ? xs[1] : merged) && shape[2] == (full ? xs[2] : 1) &&
         shape[3] == (full ? xs[3] : 1);
  }
  if (!ok) {
    std::fprintf(stderr, "resgarden native split attention: unexpected parameters (%d float32 NCHW)\n", nparam);
    return 1;
  }
  const Splits g{xs[0], xs[1] / merged, merged, xs[2] * xs[3]};
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  std::function<void(int64_t, int64_t)> work;
  switch (op) {
    case RadixOp::kPool: work = [&](int64_t b, int64_t c) { RadixPoolTask(g, b, c, f(0), f(1)); }; break;
    case RadixOp::kPoolBackward: work = [&](int64_t b, int64_t c) { RadixPoolBackwardTask(g, b, c, f(0), f(2)); }; break;
    case RadixOp::kCombine: work = [&](int64_t b, int64_t c) { RadixCombineTask(g, b, c, f(0), f(1), f(2)); }; break;
    case RadixOp::kCombineBackward:
      work = [&](int64_t b, int64_t c) { RadixCombineBackwardTask(g, b, c, f(0), f(1), f(2), f(3), f(4)); };
      break;
  }
  std::function<void(int, int)> task = [&](int i, int) { work(i / g.c, i % g.c); };
  resgarden::ParallelFor(static_cast<int>(g.batch * g.c), task);
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
