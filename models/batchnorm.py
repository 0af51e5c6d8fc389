"""``BatchNorm2d``: MindSpore's ``nn.BatchNorm2d`` (same parameters and checkpoints) whose
training-mode float32 CPU computation, optionally with a residual addition and the ReLU after it,
runs on resgarden's native kernels; the running statistics are updated as MindSpore's BatchNorm
updates them."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .blocked import layout_ops
from .conv import native_conv_available

_norm_ops: list[tuple[ops.Custom, ops.Custom, ops.Custom]] = []


def _native_norm() -> tuple[ops.Custom, ops.Custom, ops.Custom]:
    """(forward, forward_add_relu, statistics): forward (x, gamma, beta, cfg=[eps, relu]) -> (y,
    batch mean, biased batch variance); forward_add_relu (x, gamma, beta, residual, cfg) the same
    for relu(bn(x) + residual); their gradients native too; statistics (x, mean, variance, moving
    mean, moving variance, cfg=[momentum]) -> the new moving mean and variance."""
    if not _norm_ops:
        from resgarden.native import conv_library

        library = str(conv_library()[0])
        backward = ops.Custom(f"{library}:NormBackward", out_shape=lambda dy, x, g, b, m, v, cfg: (x, g, g),
                              out_dtype=lambda dy, x, g, b, m, v, cfg: (x, g, g), func_type="aot")

        def bprop(x, gamma, beta, cfg, out, dout):
            dx, dgamma, dbeta = backward(dout[0], x, gamma, beta, out[1], out[2], cfg)
            return dx, dgamma, dbeta, ops.zeros_like(cfg)

        forward = ops.Custom(f"{library}:NormForward", out_shape=lambda x, g, b, cfg: (x, g, g),
                             out_dtype=lambda x, g, b, cfg: (x, g, g), func_type="aot", bprop=bprop)
        backward_add_relu = ops.Custom(
            f"{library}:NormAddReluBackward", out_shape=lambda dy, x, g, b, m, v, y, cfg: (x, g, g, x),
            out_dtype=lambda dy, x, g, b, m, v, y, cfg: (x, g, g, x), func_type="aot")

        def bprop_add_relu(x, gamma, beta, residual, cfg, out, dout):
            dx, dgamma, dbeta, dresidual = backward_add_relu(dout[0], x, gamma, beta, out[1], out[2], out[0], cfg)
            return dx, dgamma, dbeta, dresidual, ops.zeros_like(cfg)

        forward_add_relu = ops.Custom(f"{library}:NormAddReluForward", out_shape=lambda x, g, b, r, cfg: (x, g, g),
                                      out_dtype=lambda x, g, b, r, cfg: (x, g, g), func_type="aot",
                                      bprop=bprop_add_relu)
        statistics = ops.Custom(f"{library}:NormStatistics", out_shape=lambda x, m, v, mm, mv, cfg: (mm, mv),
                                out_dtype=lambda x, m, v, mm, mv, cfg: (mm, mv), func_type="aot")
        _norm_ops.append((forward, forward_add_relu, statistics))
    return _norm_ops[0]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``; ``bn(x, True)`` adds the ReLU after it, ``bn(x, True, residual)`` computes
    ``relu(bn(x) + residual)``. Batch statistics in training, on the native kernels for float32 on
    CPU, which also take blocked activations (models.blocked); MindSpore's own BatchNorm otherwise
    (eval mode, ``use_batch_statistics`` set, other dtypes, GPU / Ascend)."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.native = None
        if native_conv_available():
            self.native, self.native_add_relu, self.native_statistics = _native_norm()
            self.to_blocked, self.to_plain = layout_ops()
            self.native_config = Tensor(np.array([self.eps, 0.0], np.float32))
            self.native_relu_config = Tensor(np.array([self.eps, 1.0], np.float32))
            # nn.BatchNorm2d keeps 1 - its momentum argument: the weight of the batch statistics
            self.statistics_config = Tensor(np.array([self.momentum], np.float32))

    def construct(self, x: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
        native = (self.native is not None and self.training and self.use_batch_statistics is None
                  and x.dtype == ms.float32
                  and (residual is None or (relu and residual.dtype == ms.float32 and residual.shape == x.shape)))
        if not native and x.ndim == 5:  # blocked, e.g. a frozen BN inside a native training trunk
            plain_residual = None if residual is None else self.to_plain(residual)
            return self.to_blocked(self.unfused(self.to_plain(x), relu, plain_residual))
        if not native:
            return self.unfused(x, relu, residual)
        if residual is None:
            out, mean, variance = self.native(x, self.gamma, self.beta,
                                              self.native_relu_config if relu else self.native_config)
        else:
            out, mean, variance = self.native_add_relu(x, self.gamma, self.beta, residual, self.native_config)
        moving_mean, moving_variance = self.native_statistics(
            ops.stop_gradient(x), ops.stop_gradient(mean), ops.stop_gradient(variance), self.moving_mean,
            self.moving_variance, self.statistics_config)
        ops.assign(self.moving_mean, moving_mean)
        ops.assign(self.moving_variance, moving_variance)
        return out

    def unfused(self, x: Tensor, relu: bool, residual: Tensor | None) -> Tensor:
        """MindSpore's BatchNorm, then the sum and ReLU as their own ops."""
        out = self.mindspore_batchnorm(x)
        if residual is not None:
            out = out + residual
        return ops.relu(out) if relu else out

    def mindspore_batchnorm(self, x: Tensor) -> Tensor:
        """MindSpore's BatchNorm computation (4-D input)."""
        if self.use_batch_statistics or (self.use_batch_statistics is None and self.training):
            return self.bn_train(x, self.gamma, self.beta, self.moving_mean, self.moving_variance)[0]
        return self.bn_infer(x, self.gamma, self.beta, self.moving_mean, self.moving_variance)[0]
