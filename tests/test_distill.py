"""Knowledge distillation: the loss against a hand computation, and a run whose checkpoints hold the
student only, resumed."""
from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import models
from models.checkpoint import find_checkpoint
from resgarden.base.errors import ConfigError
from resgarden.base.specs import DistillSpec
from resgarden.training.distill import DistillationLoss, build_teacher
from resgarden.training.trainer import train
from tests.helpers import train_job_of, write_imagenet_layout


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_the_loss_is_the_kl_term_by_hand(tmp_path, pynative_mode):
    """alpha 1, the teacher a copy of the student's initial weights: the student (training mode, batch
    statistics) and the frozen teacher (running statistics) differ, and the loss is T^2 KL by hand."""
    student = models.create_model("resnet18", num_classes=4)
    path = str(tmp_path / "teacher.ckpt")
    ms.save_checkpoint(student, path)
    teacher = build_teacher(DistillSpec(teacher_model="resnet18", teacher_ckpt=path), 4, "O0")
    assert all(p.name.startswith("teacher.") and not p.requires_grad for p in teacher.get_parameters())
    images = ms.Tensor(np.random.RandomState(0).randn(4, 3, 32, 32).astype(np.float32))
    labels = ms.Tensor(np.array([0, 1, 2, 3], np.int32))
    temperature = 2.0
    loss = DistillationLoss(student, teacher, nn.CrossEntropyLoss(), alpha=1.0, temperature=temperature)
    loss.set_train(True)
    got = float(loss(images, labels).asnumpy())
    s = student(images).asnumpy().astype(np.float64) / temperature
    t = teacher(images).asnumpy().astype(np.float64) / temperature
    assert np.abs(s - t).max() > 1e-3  # batch statistics against running ones
    kl = (np.exp(_log_softmax(t)) * (_log_softmax(t) - _log_softmax(s))).sum(axis=1).mean()
    assert got == pytest.approx(temperature ** 2 * kl, rel=1e-4)
    half = DistillationLoss(student, teacher, nn.CrossEntropyLoss(), alpha=0.5, temperature=temperature)
    ce = float(nn.CrossEntropyLoss()(student(images), labels).asnumpy())
    assert float(half(images, labels).asnumpy()) == pytest.approx(0.5 * ce + 0.5 * temperature ** 2 * kl, rel=1e-4)


def test_a_teacher_needs_its_weights_and_the_students_classes(tmp_path):
    with pytest.raises(ConfigError, match="needs its weights"):
        build_teacher(DistillSpec(teacher_model="resnet18"), 4, "O0")
    path = str(tmp_path / "ten.ckpt")
    ms.save_checkpoint(models.create_model("resnet18", num_classes=10), path)
    with pytest.raises(models.weights.WeightsError, match="classifier"):
        build_teacher(DistillSpec(teacher_model="resnet18", teacher_ckpt=path), 4, "O0")


@pytest.mark.slow
def test_a_distilled_run_saves_the_student_only_and_resumes(tmp_path):
    data = tmp_path / "data"
    write_imagenet_layout(str(data), per_class=4, size=36)
    teacher = str(tmp_path / "teacher.ckpt")
    ms.save_checkpoint(models.create_model("resnet18", num_classes=4), teacher)
    args = ["--model=resnet18", f"--data_dir={data}", f"--ckpt_save_dir={tmp_path / 'runs'}", "--image_size=32",
            "--crop_pct=1.0", "--batch_size=8", "--num_parallel_workers=1", "--teacher_model=resnet18",
            f"--teacher_ckpt={teacher}", "--kd_alpha=0.7", "--kd_temperature=2", "--ema", "--epoch_size=1"]
    first = train(train_job_of(args))
    saved = ms.load_checkpoint(find_checkpoint(first["run_dir"]))
    assert not [k for k in saved if "teacher." in k]
    assert "conv1.weight" in saved and "ema.conv1.weight" in saved and "moments.conv1.weight" in saved
    resumed = train(train_job_of(args[:-1] + ["--epoch_size=2", f"--resume={first['run_dir']}"]))
    assert resumed["epoch"] == 2 and np.isfinite(resumed["train_loss"])
    assert os.path.isfile(os.path.join(first["run_dir"], "ckpt_0", "resnet18-e002.ckpt"))
