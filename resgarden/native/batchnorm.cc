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
  bool ok = nparam == expected;
  for (int i = 0; ok && i < nparam; ++i) {
    const bool image = std::find(images.begin(), images.end(), i) != images.end();
    const int64_t *shape = shapes[i];
    ok = IsFloat32(ndims[i], image ? 4 : 1, dtypes[i]) &&
         (image ? std::memcmp(shape, shapes[0], 4 * sizeof(int64_t)) == 0
                : shape[0] == (i == cfg_index ? 2 : shapes[0][1]));
  }
  if (!ok) {
    std::fprintf(stderr, "resgarden native batch norm: unexpected parameters (%d, want %d float32)\n", nparam, expected);
    return 1;
  }
  const Channel g{shapes[0][0], shapes[0][1], shapes[0][2] * shapes[0][3]};
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  const float eps = f(cfg_index)[0];
  const bool relu = residual || f(cfg_index)[1] != 0.f;
  std::function<void(int, int)> task;
  if (backward) {
    const float *y = residual ? f(6) : nullptr;
    float *dx = f(cfg_index + 1), *dgamma = f(cfg_index + 2), *dbeta = f(cfg_index + 3),
          *dresidual = residual ? f(11) : nullptr;
    task = [&, y, dx, dgamma, dbeta, dresidual](int ch, int) {
      NormBackwardChannel(g, ch, f(0), f(1), y, f(2)[ch], f(3)[ch], f(4)[ch], f(5)[ch], eps, relu, dx, dgamma, dbeta,
                          dresidual);
    };
  } else {
    const float *add = residual ? f(3) : nullptr;
    float *y = f(cfg_index + 1), *mean = f(cfg_index + 2), *var = f(cfg_index + 3);
    task = [&, add, y, mean, var](int ch, int) {
      NormForwardChannel(g, ch, f(0), add, f(1)[ch], f(2)[ch], eps, relu, y, mean, var);
    };
  }
  resgarden::ParallelFor(static_cast<int>(g.c), task);
  return 0;
}

// The running statistics after one training step, as MindSpore's BatchNorm keeps them:
// moving = moving * (1 - momentum) + batch * momentum, the variance's batch term unbiased.
// Inputs x (its shape gives the count), batch mean, biased batch variance, moving mean, moving
// variance, cfg = [momentum]; outputs the new moving mean and variance.
int RunNormStatistics(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  bool ok = nparam == 8 && IsFloat32(ndims[0], 4, dtypes[0]);
  for (int i = 1; ok && i < nparam; ++i)
    ok = IsFloat32(ndims[i], 1, dtypes[i]) && shapes[i][0] == (i == 5 ? 1 : shapes[0][1]);
  if (!ok) {
    std::fprintf(stderr, "resgarden native batch norm statistics: unexpected parameters (%d, want 8)\n", nparam);
    return 1;
  }
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  const int64_t count = shapes[0][0] * shapes[0][2] * shapes[0][3];
  const float momentum = f(5)[0], unbias = static_cast<float>(count) / static_cast<float>(std::max<int64_t>(count - 1, 1));
  for (int64_t ch = 0; ch < shapes[0][1]; ++ch) {
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
