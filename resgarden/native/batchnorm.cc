// Training-mode BatchNorm (with the following ReLU) for models/batchnorm.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "runtime.h"

namespace {

using resgarden::IsFloat32;

// Training-mode batch normalization over (N, H, W) per channel of an NCHW float32 tensor, with
// the residual addition and ReLU fused: forward y = [relu]((x - mean) * invstd * gamma + beta
// [+ residual]) returning the batch mean and (biased) variance; backward from dy, x and those
// statistics (and y, whose sign is the ReLU's mask after a residual). One channel per task.
struct Channel {
  int64_t n, c, hw;
  const float *at(const float *base, int64_t image, int64_t channel) const { return base + (image * c + channel) * hw; }
  float *at(float *base, int64_t image, int64_t channel) const { return base + (image * c + channel) * hw; }
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void NormForwardChannel(const Channel &g, int64_t ch, const float *x, const float *residual, float gamma, float beta,
                        float eps, bool relu, float *y, float *mean_out, float *var_out) {
  double total = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *row = g.at(x, i, ch);
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) sum += row[j];
    total += sum;
  }
  const float mean = static_cast<float>(total / (g.n * g.hw));
  double squares = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *row = g.at(x, i, ch);
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) sum += (row[j] - mean) * (row[j] - mean);
    squares += sum;
  }
  const float var = static_cast<float>(squares / (g.n * g.hw));
  const float scale = gamma / std::sqrt(var + eps), shift = beta - mean * scale;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *row = g.at(x, i, ch);
    float *out = g.at(y, i, ch);
    if (residual != nullptr) {
      const float *add = g.at(residual, i, ch);
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) out[j] = std::max(row[j] * scale + shift + add[j], 0.f);
    } else if (relu) {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) out[j] = std::max(row[j] * scale + shift, 0.f);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) out[j] = row[j] * scale + shift;
    }
  }
  mean_out[ch] = mean;
  var_out[ch] = var;
}

// Without a residual the ReLU's mask is recomputed from x with the forward's own scale and shift
// (no need to keep y); after one it is y > 0, and the masked dy is also the residual's gradient.
__attribute__((target_clones("avx512f", "avx2", "default")))
void NormBackwardChannel(const Channel &g, int64_t ch, const float *dy, const float *x, const float *y, float gamma,
                         float beta, float mean, float var, float eps, bool relu, float *dx, float *dgamma,
                         float *dbeta, float *dresidual) {
  const float invstd = 1.f / std::sqrt(var + eps);
  const float scale = gamma / std::sqrt(var + eps), shift = beta - mean * scale;
  double grad_total = 0, grad_x_total = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *d = g.at(dy, i, ch), *xr = g.at(x, i, ch);
    float sum = 0, sum_x = 0;
    if (y != nullptr) {
      const float *yr = g.at(y, i, ch);
#pragma omp simd reduction(+ : sum, sum_x)
      for (int64_t j = 0; j < g.hw; ++j) {
        const float grad = yr[j] > 0.f ? d[j] : 0.f;
        sum += grad;
        sum_x += grad * (xr[j] - mean);
      }
    } else {
#pragma omp simd reduction(+ : sum, sum_x)
      for (int64_t j = 0; j < g.hw; ++j) {
        const float grad = relu && xr[j] * scale + shift <= 0.f ? 0.f : d[j];
        sum += grad;
        sum_x += grad * (xr[j] - mean);
      }
    }
    grad_total += sum;
    grad_x_total += sum_x;
  }
  const double count = static_cast<double>(g.n * g.hw);
  const float mean_grad = static_cast<float>(grad_total / count),
              x_coef = static_cast<float>(grad_x_total / count) * invstd * invstd;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *d = g.at(dy, i, ch), *xr = g.at(x, i, ch);
    float *out = g.at(dx, i, ch);
    if (y != nullptr) {
      const float *yr = g.at(y, i, ch);
      float *dres = g.at(dresidual, i, ch);
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) {
        const float grad = yr[j] > 0.f ? d[j] : 0.f;
        dres[j] = grad;
        out[j] = scale * (grad - mean_grad - (xr[j] - mean) * x_coef);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) {
        const float grad = relu && xr[j] * scale + shift <= 0.f ? 0.f : d[j];
        out[j] = scale * (grad - mean_grad - (xr[j] - mean) * x_coef);
      }
    }
  }
  dgamma[ch] = static_cast<float>(grad_x_total) * invstd;
  dbeta[ch] = static_cast<float>(grad_total);
}

// The same over the blocked layout of the native convolutions: the 5-D tensor (N, C / W, H, W, W),
// channel c being lane c % W of block c / W. One block of W channels per task, vectorised across
// its lanes. The forward pass takes the statistics in one read (sums about a pivot, the block's
// first pixel, against cancellation), so a block is read twice, not three times: at 56 px a
// block of 16 channels outgrows the L2 cache.
struct Blocked {
  int64_t n, blocks, hw;
  const float *at(const float *base, int64_t image, int64_t block, int width) const {
    return base + (image * blocks + block) * hw * width;
  }
  float *at(float *base, int64_t image, int64_t block, int width) const {
    return base + (image * blocks + block) * hw * width;
  }
};

template <int W>
inline __attribute__((always_inline)) void NormForwardBlockOf(const Blocked &g, int64_t b, const float *x,
                                                               const float *residual, const float *gamma,
                                                               const float *beta, float eps, bool relu, float *y,
                                                               float *mean_out, float *var_out) {
  float pivot[W], scale[W], shift[W];
  double sums[W] = {}, squares[W] = {};
  std::memcpy(pivot, g.at(x, 0, b, W), sizeof(pivot));
  for (int64_t i = 0; i < g.n; ++i) {
    const float *block = g.at(x, i, b, W);
    float sum[W] = {}, square[W] = {};
    for (int64_t p = 0; p < g.hw; ++p) {
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const float d = block[p * W + l] - pivot[l];
        sum[l] += d;
        square[l] += d * d;
      }
    }
    for (int l = 0; l < W; ++l) sums[l] += sum[l], squares[l] += square[l];
  }
  const double count = static_cast<double>(g.n * g.hw);
  for (int l = 0; l < W; ++l) {
    const double shifted_mean = sums[l] / count;
    const float mean = static_cast<float>(pivot[l] + shifted_mean),
                var = static_cast<float>(std::max(squares[l] / count - shifted_mean * shifted_mean, 0.0));
    const int64_t c = b * W + l;
    scale[l] = gamma[c] / std::sqrt(var + eps);
    shift[l] = beta[c] - mean * scale[l];
    mean_out[c] = mean;
    var_out[c] = var;
  }
  for (int64_t i = 0; i < g.n; ++i) {
    const float *in = g.at(x, i, b, W);
    float *out = g.at(y, i, b, W);
    const float *add = residual != nullptr ? g.at(residual, i, b, W) : nullptr;
    for (int64_t p = 0; p < g.hw; ++p) {
      const int64_t at = p * W;
      if (add != nullptr) {
#pragma omp simd
        for (int l = 0; l < W; ++l) out[at + l] = std::max(in[at + l] * scale[l] + shift[l] + add[at + l], 0.f);
      } else if (relu) {
#pragma omp simd
        for (int l = 0; l < W; ++l) out[at + l] = std::max(in[at + l] * scale[l] + shift[l], 0.f);
      } else {
#pragma omp simd
        for (int l = 0; l < W; ++l) out[at + l] = in[at + l] * scale[l] + shift[l];
      }
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void NormForwardBlock(const Blocked &g, int width, int64_t b, const float *x, const float *residual,
                      const float *gamma, const float *beta, float eps, bool relu, float *y, float *mean_out,
                      float *var_out) {
  if (width == 16)
    NormForwardBlockOf<16>(g, b, x, residual, gamma, beta, eps, relu, y, mean_out, var_out);
  else
    NormForwardBlockOf<8>(g, b, x, residual, gamma, beta, eps, relu, y, mean_out, var_out);
}

// The gradient through the ReLU: Mask 0 none, 1 recomputed from x (x * scale + shift > 0), 2 from y
// (y > 0, after a residual); see NormBackwardChannel.
template <int W, int Mask>
inline __attribute__((always_inline)) float Masked(const float *d, const float *xr, const float *yr, const float *scale,
                                                   const float *shift, int64_t at, int l) {
  if (Mask == 2) return yr[at + l] > 0.f ? d[at + l] : 0.f;
  if (Mask == 1) return xr[at + l] * scale[l] + shift[l] > 0.f ? d[at + l] : 0.f;
  return d[at + l];
}

template <int W, int Mask>
inline __attribute__((always_inline)) void NormBackwardBlockOf(const Blocked &g, int64_t b, const float *dy,
                                                                const float *x, const float *y, const float *gamma,
                                                                const float *beta, const float *mean_in,
                                                                const float *var_in, float eps, float *dx,
                                                                float *dgamma, float *dbeta, float *dresidual) {
  float mean[W], scale[W], shift[W], invstd[W], mean_grad[W], x_coef[W];
  double grad_totals[W] = {}, grad_x_totals[W] = {};
  for (int l = 0; l < W; ++l) {
    const int64_t c = b * W + l;
    mean[l] = mean_in[c];
    invstd[l] = 1.f / std::sqrt(var_in[c] + eps);
    scale[l] = gamma[c] / std::sqrt(var_in[c] + eps);
    shift[l] = beta[c] - mean[l] * scale[l];
  }
  for (int64_t i = 0; i < g.n; ++i) {
    const float *d = g.at(dy, i, b, W), *xr = g.at(x, i, b, W), *yr = Mask == 2 ? g.at(y, i, b, W) : nullptr;
    float grad_sum[W] = {}, grad_x_sum[W] = {};
    for (int64_t p = 0; p < g.hw; ++p) {
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const float grad = Masked<W, Mask>(d, xr, yr, scale, shift, p * W, l);
        grad_sum[l] += grad;
        grad_x_sum[l] += grad * (xr[p * W + l] - mean[l]);
      }
    }
    for (int l = 0; l < W; ++l) grad_totals[l] += grad_sum[l], grad_x_totals[l] += grad_x_sum[l];
  }
  const double count = static_cast<double>(g.n * g.hw);
  for (int l = 0; l < W; ++l) {
    mean_grad[l] = static_cast<float>(grad_totals[l] / count);
    x_coef[l] = static_cast<float>(grad_x_totals[l] / count) * invstd[l] * invstd[l];
    dgamma[b * W + l] = static_cast<float>(grad_x_totals[l]) * invstd[l];
    dbeta[b * W + l] = static_cast<float>(grad_totals[l]);
  }
  for (int64_t i = 0; i < g.n; ++i) {
    const float *d = g.at(dy, i, b, W), *xr = g.at(x, i, b, W), *yr = Mask == 2 ? g.at(y, i, b, W) : nullptr;
    float *out = g.at(dx, i, b, W), *dres = Mask == 2 ? g.at(dresidual, i, b, W) : nullptr;
    for (int64_t p = 0; p < g.hw; ++p) {
      const int64_t at = p * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const float grad = Masked<W, Mask>(d, xr, yr, scale, shift, at, l);
        if (Mask == 2) dres[at + l] = grad;
        out[at + l] = scale[l] * (grad - mean_grad[l] - (xr[at + l] - mean[l]) * x_coef[l]);
      }
    }
  }
}

template <int W>
inline __attribute__((always_inline)) void NormBackwardBlockIn(const Blocked &g, int64_t b, const float *dy,
                                                                const float *x, const float *y, const float *gamma,
                                                                const float *beta, const float *mean,
                                                                const float *var, float eps, bool relu, float *dx,
                                                                float *dgamma, float *dbeta, float *dresidual) {
  if (y != nullptr)
    NormBackwardBlockOf<W, 2>(g, b, dy, x, y, gamma, beta, mean, var, eps, dx, dgamma, dbeta, dresidual);
  else if (relu)
    NormBackwardBlockOf<W, 1>(g, b, dy, x, y, gamma, beta, mean, var, eps, dx, dgamma, dbeta, dresidual);
  else
    NormBackwardBlockOf<W, 0>(g, b, dy, x, y, gamma, beta, mean, var, eps, dx, dgamma, dbeta, dresidual);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void NormBackwardBlock(const Blocked &g, int width, int64_t b, const float *dy, const float *x, const float *y,
                       const float *gamma, const float *beta, const float *mean, const float *var, float eps,
                       bool relu, float *dx, float *dgamma, float *dbeta, float *dresidual) {
  if (width == 16)
    NormBackwardBlockIn<16>(g, b, dy, x, y, gamma, beta, mean, var, eps, relu, dx, dgamma, dbeta, dresidual);
  else
    NormBackwardBlockIn<8>(g, b, dy, x, y, gamma, beta, mean, var, eps, relu, dx, dgamma, dbeta, dresidual);
}


// Forward: x, gamma, beta, cfg = [eps, relu] (float32), y, mean, var.
// Backward: dy, x, gamma, beta, mean, var, cfg, dx, dgamma, dbeta.
// With the residual (then always with the ReLU):
// forward x, gamma, beta, residual, cfg, y, mean, var;
// backward dy, x, gamma, beta, mean, var, y, cfg, dx, dgamma, dbeta, dresidual.
int RunNorm(bool backward, bool residual, int nparam, void **params, int *ndims, int64_t **shapes,
            const char **dtypes) {
  // The positions of the NCHW tensors (all of x's shape) and of cfg; the rest are per-channel vectors.
  std::vector<int> images;
  int cfg_index, expected;
  if (backward) {
    images = residual ? std::vector<int>{0, 1, 6, 8, 11} : std::vector<int>{0, 1, 7};
    cfg_index = residual ? 7 : 6;
    expected = residual ? 12 : 10;
  } else {
    images = residual ? std::vector<int>{0, 3, 5} : std::vector<int>{0, 4};
    cfg_index = residual ? 4 : 3;
    expected = residual ? 8 : 7;
  }
  // x is NCHW (4-D) or blocked (5-D: N, C / width, H, W, width); the images all have its shape.
  const int rank = ndims[0];
  const bool blocked = rank == 5 && (shapes[0][4] == 8 || shapes[0][4] == 16);
  bool ok = nparam == expected && (rank == 4 || blocked);
  const int64_t channels = ok ? shapes[0][1] * (blocked ? shapes[0][4] : 1) : 0;
  for (int i = 0; ok && i < nparam; ++i) {
    const bool image = std::find(images.begin(), images.end(), i) != images.end();
    const int64_t *shape = shapes[i];
    ok = IsFloat32(ndims[i], image ? rank : 1, dtypes[i]) &&
         (image ? std::memcmp(shape, shapes[0], rank * sizeof(int64_t)) == 0
                : shape[0] == (i == cfg_index ? 2 : channels));
  }
  if (!ok) {
    std::fprintf(stderr, "resgarden native batch norm: unexpected parameters (%d, want %d float32)\n", nparam, expected);
    return 1;
  }
  const Channel g{shapes[0][0], channels, shapes[0][2] * shapes[0][3]};
  const Blocked block{shapes[0][0], shapes[0][1], shapes[0][2] * shapes[0][3]};
  const int width = blocked ? static_cast<int>(shapes[0][4]) : 1;
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  const float eps = f(cfg_index)[0];
  const bool relu = residual || f(cfg_index)[1] != 0.f;
  std::function<void(int, int)> task;
  if (backward) {
    const float *y = residual ? f(6) : nullptr;
    float *dx = f(cfg_index + 1), *dgamma = f(cfg_index + 2), *dbeta = f(cfg_index + 3),
          *dresidual = residual ? f(11) : nullptr;
    if (blocked) {
      task = [&, y, dx, dgamma, dbeta, dresidual](int b, int) {
        NormBackwardBlock(block, width, b, f(0), f(1), y, f(2), f(3), f(4), f(5), eps, relu, dx, dgamma, dbeta,
                          dresidual);
      };
    } else {
      task = [&, y, dx, dgamma, dbeta, dresidual](int ch, int) {
        NormBackwardChannel(g, ch, f(0), f(1), y, f(2)[ch], f(3)[ch], f(4)[ch], f(5)[ch], eps, relu, dx, dgamma,
                            dbeta, dresidual);
      };
    }
  } else {
    const float *add = residual ? f(3) : nullptr;
    float *y = f(cfg_index + 1), *mean = f(cfg_index + 2), *var = f(cfg_index + 3);
    if (blocked) {
      task = [&, add, y, mean, var](int b, int) {
        NormForwardBlock(block, width, b, f(0), add, f(1), f(2), eps, relu, y, mean, var);
      };
    } else {
      task = [&, add, y, mean, var](int ch, int) {
        NormForwardChannel(g, ch, f(0), add, f(1)[ch], f(2)[ch], eps, relu, y, mean, var);
      };
    }
  }
  resgarden::ParallelFor(static_cast<int>(blocked ? block.blocks : g.c), task);
  return 0;
}

// The running statistics after one training step, as MindSpore's BatchNorm keeps them:
// moving = moving * (1 - momentum) + batch * momentum, the variance's batch term unbiased.
// Inputs x (its shape gives the count; NCHW or blocked), batch mean, biased batch variance, moving
// mean, moving variance, cfg = [momentum]; outputs the new moving mean and variance.
int RunNormStatistics(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  bool ok = nparam == 8 && (IsFloat32(ndims[0], 4, dtypes[0]) || IsFloat32(ndims[0], 5, dtypes[0]));
  const int64_t channels = ok ? shapes[0][1] * (ndims[0] == 5 ? shapes[0][4] : 1) : 0;
  for (int i = 1; ok && i < nparam; ++i)
    ok = IsFloat32(ndims[i], 1, dtypes[i]) && shapes[i][0] == (i == 5 ? 1 : channels);
  if (!ok) {
    std::fprintf(stderr, "resgarden native batch norm statistics: unexpected parameters (%d, want 8)\n", nparam);
    return 1;
  }
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  const int64_t count = shapes[0][0] * shapes[0][2] * shapes[0][3];
  const float momentum = f(5)[0], unbias = static_cast<float>(count) / static_cast<float>(std::max<int64_t>(count - 1, 1));
  for (int64_t ch = 0; ch < channels; ++ch) {
    f(6)[ch] = f(3)[ch] * (1.f - momentum) + f(1)[ch] * momentum;
    f(7)[ch] = f(4)[ch] * (1.f - momentum) + f(2)[ch] * unbias * momentum;
  }
  return 0;
}

}  // namespace

extern "C" {
int NormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNorm(false, false, nparam, params, ndims, shapes, dtypes);
}
int NormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNorm(true, false, nparam, params, ndims, shapes, dtypes);
}
int NormAddReluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNorm(false, true, nparam, params, ndims, shapes, dtypes);
}
int NormAddReluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNorm(true, true, nparam, params, ndims, shapes, dtypes);
}
int NormStatistics(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNormStatistics(nparam, params, ndims, shapes, dtypes);
}
}
