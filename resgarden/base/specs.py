"""What each engine function reads, as small frozen dataclasses built once from the settings by
``config.py`` (see its ``*_job`` builders). A leaf module: it imports nothing of the project, so the
models' weights table and the engine share :class:`EvalTransform`."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """How evaluation images are prepared: resize the short side to ``image_size / crop_pct``,
    centre-crop ``image_size``, normalise with ``mean`` / ``std`` (0-1 scale). Travels with the
    released weights (``models.pretrained``), with each run checkpoint and with a created model
    (``model.pretrained_cfg.eval_transform``)."""

    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def resize(self) -> int:
        """The short side images are resized to before the centre crop: ``image_size / crop_pct``
        rounded down, as mindcv's and timm's evaluation transforms round it."""
        return int(math.floor(self.image_size / self.crop_pct + 1e-9))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in checkpoint metadata."""
        return dict(image_size=self.image_size, crop_pct=self.crop_pct, interpolation=self.interpolation,
                    mean=list(self.mean), std=list(self.std))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvalTransform:
        """From checkpoint metadata; keys it lacks keep their defaults, unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
        return cls(**kept)

    def overridden_by(self, other: EvalTransform, names: Iterable[str]) -> EvalTransform:
        """This transform with the fields ``names`` taken from ``other`` (what the user set)."""
        return dataclasses.replace(self, **{n: getattr(other, n) for n in names if n in EVAL_FIELDS})


EVAL_FIELDS = tuple(f.name for f in dataclasses.fields(EvalTransform))


@dataclass(frozen=True)
class Augmentation:
    """Training-only image augmentation (RandomResizedCrop to ``size``, or to the evaluation's size
    when None; flip, policy, jitter, erasing)."""

    size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = 0.5
    auto_augment: str | None = None
    color_jitter: float = 0.0
    re_prob: float = 0.0


@dataclass(frozen=True)
class Mixing:
    """Batch mixup / cutmix and the label smoothing of the soft targets they produce."""

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    off_epoch: int = 0
    label_smoothing: float = 0.0

    @property
    def enabled(self) -> bool:
        """Targets are soft (N, classes) for the whole run."""
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class DataSpec:
    """Where the images are: the data set, its root and split names."""

    dataset: str = "auto"  # imagenet, cifar10, digits, or auto
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    download: bool = False

    @property
    def kind(self) -> str:
        """The data set, ``auto`` resolved: imagenet when a folder is given, else the embedded digits."""
        if self.dataset != "auto":
            return self.dataset
        return "imagenet" if self.data_dir else "digits"


@dataclass(frozen=True)
class LoaderSpec:
    """How batches are made: size, workers, seed and the transforms."""

    batch_size: int = 32
    workers: int | None = None  # None: resgarden.runtime.context.with_data_workers decides per rank
    worker_cpus: tuple[int, ...] | None = None  # the workers' CPU affinity (None: the rank's)
    seed: int = 42
    aug_repeats: int = 0  # repeated augmentation: each image this many times per epoch, over the ranks (0, 1: off)
    eval_transform: EvalTransform = field(default_factory=EvalTransform)
    augmentation: Augmentation = field(default_factory=Augmentation)
    mixing: Mixing = field(default_factory=Mixing)


@dataclass(frozen=True)
class ModelSpec:
    """Which architecture, built how."""

    name: str = "resnet50"
    num_classes: int | None = None  # None: from the data or the weights
    in_channels: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    frozen_stages: int = -1  # -1 none, 0 the stem, k the stem and stages 1..k (models.features)


@dataclass(frozen=True)
class WeightsSpec:
    """Which weights: the released ones, or a checkpoint file or run folder."""

    pretrained: bool | str = False  # True: the released MindSpore weights; "timm:<model>.<tag>": timm's
    ckpt_path: str | None = None
    fold_bn: bool = True  # inference: fold BatchNorm into the convolutions


@dataclass(frozen=True)
class ScheduleSpec:
    """The learning rate of every optimizer step."""

    lr: float = 0.1
    scheduler: str = "cosine"  # cosine, step, multistep, constant
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    decay_epochs: int = 30
    decay_rate: float = 0.1
    milestones: tuple[int, ...] = (30, 60, 90)
    epochs: int = 90


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer and its parameter groups."""

    opt: str = "momentum"  # momentum, nesterov, sgd, adamw, lamb
    momentum: float = 0.9
    weight_decay: float = 1e-4
    filter_bias_and_bn: bool = True
    backbone_lr_scale: float = 1.0
    freeze_backbone: bool = False


@dataclass(frozen=True)
class StepSpec:
    """One training step: loss, mixed precision, loss scale, clipping, accumulation, EMA."""

    label_smoothing: float = 0.0
    bce_loss: bool = False  # binary cross-entropy over the classes (resgarden.training.losses)
    bce_target_thresh: float | None = None
    amp_level: str = "O0"
    loss_scale: float = 1.0
    dynamic_loss_scale: bool = False
    clip_norm: float = 0.0  # 0: no clipping
    accumulation: int = 1
    ema_decay: float = 0.0  # 0: no EMA


@dataclass(frozen=True)
class DistillSpec:
    """Knowledge distillation from a frozen teacher (resgarden.training.distill); off without one."""

    teacher_model: str | None = None
    teacher_pretrained: bool | str = False  # the released weights, or "timm:<model>.<tag>"
    teacher_ckpt: str | None = None
    alpha: float = 0.5  # weight of the teacher's soft targets
    temperature: float = 1.0


@dataclass(frozen=True)
class ContextSpec:
    """MindSpore's process context."""

    device_target: str = "CPU"  # resolved: CPU, GPU or Ascend
    mode: int = 0  # 0 graph, 1 PyNative
    jit_level: str = "auto"
    device_id: int | None = None
    seed: int = 42
    distribute: bool = False
    weights_cache: str | None = None


@dataclass(frozen=True)
class ClusterSpec:
    """How a data-parallel job is joined (read by resgarden.runtime.distributed.init_cluster)."""

    distribute: bool = False
    device_target: str = "CPU"
    device_id: int | None = None
    dist_init: str = "auto"
    dist_host: str | None = None
    dist_port: int = 8118
    dist_timeout: int = 60


@dataclass(frozen=True)
class RunSpec:
    """A training run's epochs, outputs, checkpoints, validation and logging."""

    epochs: int = 90
    output_dir: str = "./runs"
    resume: str | None = None
    save_interval: int = 1
    keep_checkpoints: int = 5
    save_policy: str = "latest_k"
    val_while_train: bool = True
    val_interval: int = 1
    log_interval: int = 10
    tensorboard: bool = True  # event files in <run>/tensorboard/ (resgarden.training.board)
    sink_mode: bool = False
    config_yaml: str = ""  # the settings as YAML, written to the run folder


@dataclass(frozen=True)
class TrainJob:
    """Everything ``resgarden.training.trainer.train`` reads."""

    context: ContextSpec
    cluster: ClusterSpec
    data: DataSpec
    loader: LoaderSpec
    model: ModelSpec
    weights: WeightsSpec
    schedule: ScheduleSpec
    optim: OptimSpec
    step: StepSpec
    run: RunSpec
    distill: DistillSpec = field(default_factory=DistillSpec)


@dataclass(frozen=True)
class InferenceJob:
    """What validate, infer and export read. Settings the user gave (``given``: model name and eval
    transform fields) win over what the weights bring; the others follow the weights."""

    context: ContextSpec
    model: ModelSpec
    weights: WeightsSpec
    loader: LoaderSpec
    given: frozenset[str] = frozenset()
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    data: DataSpec = field(default_factory=DataSpec)
    json_path: str | None = None  # validate: also write the metrics here
    real_labels: str | None = None  # validate: ImageNet-ReaL labels file (real.json)
    results_csv: str | None = None  # validate: append a row to this results table
    images: tuple[str, ...] = ()  # infer: files, folders or list files to classify
    top_k: int = 5  # infer: classes per image
    predictions: str | None = None  # infer: write the predictions here (.json, else CSV)
    file_format: str = "MINDIR"  # export
    file_name: str | None = None
    dynamic_batch: bool = True  # export: the batch dimension left open (MINDIR, ONNX)
    verify: bool = False  # export: run the written file and compare its outputs


@dataclass(frozen=True)
class AverageSpec:
    """What average.py reads: the run, which of its checkpoints, where to write the average."""

    run_path: str
    last: int = 0  # the newest k epoch checkpoints
    best: int = 0  # or the k best by validation top-1
    file_name: str | None = None  # default: <run>/ckpt_0/<model>-avg-{last,best}<k>.ckpt
