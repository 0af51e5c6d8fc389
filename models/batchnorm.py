"""``BatchNorm2d``: MindSpore's ``nn.BatchNorm2d`` (same parameters and checkpoints) whose
training-mode float32 CPU computation, optionally with the ReLU after it, runs on resgarden's
native kernels; the running statistics are updated as MindSpore's BatchNorm updates them."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .conv import native_conv_available

_norm_op: list[ops.Custom] = []


def _native_norm() -> ops.Custom:
    """(x, gamma, beta, cfg=[eps, relu]) -> (y, batch mean, biased batch variance); its gradient is native too."""
    if not _norm_op:
        from resgarden.native import conv_library

        library = str(conv_library()[0])
        backward = ops.Custom(f"{library}:NormBackward", out_shape=lambda dy, x, y, g, m, v, cfg: (x, g, g),
                              out_dtype=lambda dy, x, y, g, m, v, cfg: (x, g, g), func_type="aot")

        def bprop(x, gamma, beta, cfg, out, dout):
            dx, dgamma, dbeta = backward(dout[0], x, out[0], gamma, out[1], out[2], cfg)
            return dx, dgamma, dbeta, ops.zeros_like(cfg)

        _norm_op.append(ops.Custom(f"{library}:NormForward", out_shape=lambda x, g, b, cfg: (x, g, g),
                                   out_dtype=lambda x, g, b, cfg: (x, g, g), func_type="aot", bprop=bprop))
    return _norm_op[0]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``; ``bn(x, True)`` adds the ReLU after it. Batch statistics in training,
    on the native kernels for float32 on CPU; MindSpore's own BatchNorm otherwise (eval mode,
    ``use_batch_statistics`` set, other dtypes, GPU / Ascend)."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.native = None
        if native_conv_available():
            self.native = _native_norm()
            self.native_config = Tensor(np.array([self.eps, 0.0], np.float32))
            self.native_relu_config = Tensor(np.array([self.eps, 1.0], np.float32))

    def construct(self, x: Tensor, relu: bool = False) -> Tensor:
        if self.native is None or not self.training or self.use_batch_statistics is not None or x.dtype != ms.float32:
            out = self.mindspore_batchnorm(x)
            return ops.relu(out) if relu else out
        out, mean, variance = self.native(x, self.gamma, self.beta,
                                          self.native_relu_config if relu else self.native_config)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        update = self.momentum  # MindSpore's: the weight of the batch statistics
        ops.assign(self.moving_mean, self.moving_mean * (1.0 - update) + mean * update)
        unbiased = variance * (count / max(count - 1, 1))
        ops.assign(self.moving_variance, self.moving_variance * (1.0 - update) + unbiased * update)
        return out

    def mindspore_batchnorm(self, x: Tensor) -> Tensor:
        """MindSpore's BatchNorm computation (4-D input)."""
        if self.use_batch_statistics or (self.use_batch_statistics is None and self.training):
            return self.bn_train(x, self.gamma, self.beta, self.moving_mean, self.moving_variance)[0]
        return self.bn_infer(x, self.gamma, self.beta, self.moving_mean, self.moving_variance)[0]
