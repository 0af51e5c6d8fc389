"""Knowledge distillation (Hinton et al. 2015; timm's ``--kd-model-name``, PaddleClas' SSLD): the
student learns from the labels and from a frozen teacher's softened outputs on the same batch,

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

The teacher is any registered model with weights (released, timm's, or a checkpoint) for the
student's classes, run at the student's AMP level with its parameters fixed and its BatchNorms on
their running statistics; its parameters are named ``teacher.*``, which checkpoints leave out
(:data:`models.checkpoint.NOT_SAVED`). In a data-parallel job every rank holds the same teacher.
"""
from __future__ import annotations

import logging

import mindspore as ms
from mindspore import Tensor, nn, ops

import models
from models.checkpoint import NOT_SAVED, find_checkpoint
from models.features import freeze
from resgarden.base.errors import ConfigError
from resgarden.base.specs import DistillSpec
from resgarden.training.amp import apply_amp

logger = logging.getLogger("resgarden")
TEACHER = NOT_SAVED[0]


def build_teacher(spec: DistillSpec, num_classes: int, amp_level: str) -> nn.Cell:
    """The frozen teacher with its weights, for ``num_classes`` classes (its head must fit)."""
    if bool(spec.teacher_pretrained) == bool(spec.teacher_ckpt):
        raise ConfigError(f"--teacher_model={spec.teacher_model} needs its weights: give --teacher_pretrained "
                          "(or =timm:<model>.<tag>) or --teacher_ckpt, one of them")
    try:
        models.check_model_name(spec.teacher_model)
    except ValueError as exc:
        raise ConfigError(f"--teacher_model: {exc}") from None
    checkpoint = find_checkpoint(spec.teacher_ckpt, prefer_best=True) if spec.teacher_ckpt else None
    teacher = models.create_model(spec.teacher_model, pretrained=spec.teacher_pretrained,
                                  checkpoint_path=checkpoint, num_classes=num_classes, head="refuse")
    freeze([teacher])
    teacher.update_parameters_name(TEACHER)
    logger.info("distillation: teacher %s (%s), alpha %g, temperature %g", spec.teacher_model,
                teacher.pretrained_cfg.source, spec.alpha, spec.temperature)
    return apply_amp(teacher, amp_level)


class DistillationLoss(nn.Cell):
    """The loss of ``student`` on ``(images, labels)`` blended with the teacher's soft targets;
    ``labels`` may be class indices or soft targets (mixup / cutmix), as ``loss_fn`` takes them."""

    def __init__(self, student: nn.Cell, teacher: nn.Cell, loss_fn: nn.Cell, alpha: float, temperature: float) -> None:
        super().__init__(auto_prefix=False)
        self.student = student
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.alpha = alpha
        self.temperature = temperature
        self.log_softmax = nn.LogSoftmax(axis=1)

    def construct(self, images: Tensor, labels: Tensor) -> Tensor:
        logits = ops.cast(self.student(images), ms.float32)
        soft = ops.stop_gradient(ops.cast(self.teacher(images), ms.float32)) / self.temperature
        log_student = self.log_softmax(logits / self.temperature)
        log_teacher = self.log_softmax(soft)
        kl = (ops.exp(log_teacher) * (log_teacher - log_student)).sum(axis=1).mean()
        hard = self.loss_fn(logits, labels)
        return (1.0 - self.alpha) * hard + self.alpha * self.temperature * self.temperature * kl
