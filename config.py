"""The one configuration of every command: defaults < YAML < command line, then the specs.

Every setting is declared once in SETTINGS with its type, default, help and the other names
users bring from mindcv (``--data_dir --ckpt_save_dir --distribute --epoch_size``) and from
mindspore/models (``--data_path --output_path --run_distribute --config_path``). Booleans read
the same from the command line and YAML (``--pretrained``, ``--pretrained=False``,
``--run_distribute=1``); lists take several values (``--scale 0.08 1.0``); ``key=value``
without dashes is accepted as an override. An unknown key is an error naming the closest one.

The engine never sees these settings: ``train_job`` / ``inference_job`` turn them into the small
frozen specs of :mod:`resgarden.base.specs`, each engine function taking the ones it reads.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from resgarden.base.errors import ConfigError
from resgarden.base.specs import (
    EVAL_FIELDS,
    Augmentation,
    AverageSpec,
    ClusterSpec,
    ContextSpec,
    DataSpec,
    DistillSpec,
    EvalTransform,
    InferenceJob,
    LoaderSpec,
    Mixing,
    ModelSpec,
    OptimSpec,
    RunSpec,
    ScheduleSpec,
    StepSpec,
    TrainJob,
    WeightsSpec,
)
from resgarden.platform import select_device_target

__all__ = ["ConfigError", "average_job", "configure", "inference_job", "load_yaml", "parse_config", "train_job"]


def parse_bool(value: Any) -> bool:
    """True/False from bools, 0/1 and the usual words, as in YAML and on the command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


def parse_weights(value: Any) -> bool | str:
    """--pretrained: a boolean (the released MindSpore weights), or timm's by name ``timm:<model>.<tag>``
    / a file ``timm:<path>.safetensors``."""
    if isinstance(value, str) and value.strip().startswith("timm:") and len(value.strip()) > len("timm:"):
        return value.strip()
    try:
        return parse_bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true/false or timm:<model>.<tag>, got {value!r}") from None


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    type: Callable[[Any], Any] = str
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    nargs: str | None = None  # "+" for lists


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # run
    S("config", None, "YAML recipe; command-line flags override it", aliases=("config_path", "c")),
    S("mode", 0, "0: graph mode, 1: PyNative mode", int, choices=(0, 1)),
    S("device_target", "auto", "auto (what the installed MindSpore can run on: Ascend, else GPU, else CPU), "
      "CPU, GPU or Ascend", choices=("auto", "CPU", "GPU", "Ascend")),
    S("device_id", None, "single process: the accelerator to use (default 0); data-parallel jobs give each rank "
      "the device of its local rank", int),
    S("jit_level", "auto", "graph mode's compile level: auto (MindSpore's default for the target), O0 (kernel by "
      "kernel), O1 (with operator fusion), O2 (whole graph on Ascend; deprecated since MindSpore 2.9)",
      choices=("auto", "O0", "O1", "O2")),
    S("dataset_sink_mode", False, "GPU / Ascend: feed batches through the device queue and run several steps per "
      "call (MindSpore's data_sink); on CPU, which MindSpore does not support it on, training runs without",
      parse_bool),
    S("seed", 42, "random seed of weights, data order and augmentation", int),
    S("distribute", False, "data-parallel training over several processes", parse_bool,
      aliases=("run_distribute",)),
    S("dist_init", "auto", "how --distribute joins the job: auto (dynamic_cluster on CPU or under msrun, native "
      "otherwise), dynamic_cluster (MPI ranks -> MindSpore's scheduler), native (MindSpore's init() as is)",
      choices=("auto", "dynamic_cluster", "native")),
    S("dist_host", None, "scheduler address under mpirun (default: $MS_SCHED_HOST or 127.0.0.1; "
      "several nodes: rank 0's address)"),
    S("dist_port", 8118, "scheduler port under mpirun", int),
    S("dist_timeout", 60, "seconds without a heartbeat before a rank is declared dead and the job ends", int),
    # data
    S("dataset", "auto", "imagenet (class folders or list files), cifar10, digits (embedded), or auto: "
      "imagenet when --data_dir is given, else digits", choices=("auto", "imagenet", "cifar10", "digits")),
    S("data_dir", None, "data set root (or its train/ split folder)", aliases=("data_path",)),
    S("train_split", "train", "training split folder / list-file name"),
    S("val_split", "val", "validation split folder / list-file name"),
    S("dataset_download", False, "download CIFAR-10 if it is missing", parse_bool),
    S("num_parallel_workers", None, "data loading worker processes (default: the CPUs this rank may use, i.e. its "
      "CPU affinity divided by the ranks on its node, at most 16)", int),
    S("batch_size", 32, "images per step (per process)", int),
    S("image_size", 224, "training / evaluation crop size", int, aliases=("image_resize",)),
    S("train_image_size", None, "training crop size when it differs from the evaluation's --image_size (the "
      "ResNet-strikes-back A3 recipe trains at 160 and evaluates at 224)", int),
    S("scale", [0.08, 1.0], "RandomResizedCrop area range", float, nargs="+"),
    S("ratio", [0.75, 1.333], "RandomResizedCrop aspect ratio range", float, nargs="+"),
    S("hflip", 0.5, "horizontal flip probability", float),
    S("interpolation", "bilinear", "resize interpolation", choices=("bilinear", "bicubic", "nearest")),
    S("auto_augment", None, "policy: randaug-m9-mstd0.5[-inc1], autoaug[r], 3a or trivialaugwide "
      "(mindcv/timm strings)"),
    S("color_jitter", None, "brightness/contrast/saturation jitter when no auto_augment (e.g. 0.4)", float),
    S("re_prob", 0.0, "random erasing probability", float),
    S("mixup", 0.0, "mixup alpha (0: off)", float),
    S("cutmix", 0.0, "cutmix alpha (0: off)", float),
    S("mixup_prob", 1.0, "probability of mixing a batch", float),
    S("mixup_switch_prob", 0.5, "probability of cutmix instead of mixup when both are on", float),
    S("mixup_off_epoch", 0, "stop mixing from this epoch on (0: never)", int),
    S("crop_pct", 0.875, "evaluation: resize to image_size / crop_pct, then center crop", float),
    S("mean", [0.485, 0.456, 0.406], "normalisation mean (0-1 scale)", float, nargs="+"),
    S("std", [0.229, 0.224, 0.225], "normalisation std (0-1 scale)", float, nargs="+"),
    S("label_smoothing", 0.0, "label smoothing of the cross-entropy loss", float),
    # model
    S("model", "resnet50", "registered model name (python -m models --list)"),
    S("num_classes", None, "classifier outputs (default: the number of classes in the data)", int),
    S("in_channels", 3, "input image channels", int),
    S("pretrained", False, "start from the released ImageNet weights (true), or timm's by name: "
      "timm:<model>.<tag> from the Hugging Face cache or hub, timm:<file>.safetensors", parse_weights),
    S("weights_cache", None, "folder for downloaded weights (default: $RESGARDEN_CACHE or ~/.cache/resgarden)"),
    S("ckpt_path", None, "weights to start from / evaluate (file, or a run directory)",
      aliases=("checkpoint_file_path", "checkpoint_path")),
    S("fold_bn", True, "validate/eval/infer/export: fold BatchNorm into the convolutions (same outputs, faster)",
      parse_bool),
    S("drop_rate", 0.0, "dropout before the classifier", float),
    S("drop_path_rate", 0.0, "stochastic depth rate", float),
    S("frozen_stages", -1, "fine-tuning: fix the stem (0) or the stem and stages 1..k (their BN in eval mode); "
      "-1 fixes nothing", int),
    # optimisation
    S("opt", "momentum", "optimizer", choices=("momentum", "nesterov", "sgd", "adamw", "lamb")),
    S("lr", 0.1, "peak learning rate", float),
    S("momentum", 0.9, "momentum (momentum/nesterov) or beta1 (adamw, lamb)", float),
    S("weight_decay", 1e-4, "weight decay", float),
    S("filter_bias_and_bn", True, "no weight decay on biases and BN parameters", parse_bool),
    S("freeze_backbone", False, "fine-tuning: train the classifier only", parse_bool),
    S("backbone_lr_scale", 1.0, "fine-tuning: LR multiplier for everything but the classifier", float),
    S("scheduler", "cosine", "per-step LR schedule after warm-up",
      choices=("cosine", "step", "multistep", "constant")),
    S("warmup_epochs", 0.0, "linear warm-up from 0 to lr", float),
    S("min_lr", 0.0, "cosine: final learning rate", float),
    S("decay_epochs", 30, "step: epochs between decays", int),
    S("decay_rate", 0.1, "step/multistep: decay factor", float),
    S("milestones", [30, 60, 90], "multistep: epochs where the LR decays", int, nargs="+"),
    S("epoch_size", 90, "training epochs", int, aliases=("epochs",)),
    S("amp_level", "O0", "mixed precision: O0 fp32, O1 convs/dense in fp16, O2 all but BN in fp16, O3 all fp16",
      choices=("O0", "O1", "O2", "O3")),
    S("loss_scale_type", "fixed", "fixed or dynamic loss scale", choices=("fixed", "dynamic")),
    S("loss_scale", 1.0, "(initial) loss scale", float),
    S("clip_grad", False, "clip the global gradient norm", parse_bool),
    S("clip_value", 15.0, "global gradient norm limit", float),
    S("gradient_accumulation_steps", 1, "apply the optimizer every N steps on the mean gradient", int),
    S("aug_repeats", 0, "repeated augmentation: each training image this many times per epoch, its copies on "
      "different ranks, the epoch about as long (the RSB recipes use 3; timm's --aug-repeats); 0 or 1: off", int),
    S("bce_loss", False, "binary cross-entropy over the classes instead of softmax cross-entropy (the ResNet-strikes-"
      "back recipes, timm's --bce-loss); --label_smoothing smooths its one-hot targets", parse_bool),
    S("bce_target_thresh", None, "with --bce_loss: targets above this become 1, the others 0 (timm's "
      "--bce-target-thresh)", float),
    S("teacher_model", None, "knowledge distillation: the teacher, a registered model (off when not given)"),
    S("teacher_pretrained", False, "distillation: the teacher's released weights (true) or timm's "
      "(timm:<model>.<tag>)", parse_weights),
    S("teacher_ckpt", None, "distillation: the teacher's checkpoint (a file or a run folder)"),
    S("kd_alpha", 0.5, "distillation: weight of the teacher's soft targets (1 - it: the labels')", float),
    S("kd_temperature", 1.0, "distillation: softmax temperature of teacher and student", float),
    S("ema", False, "keep an exponential moving average of the weights; validate and export it", parse_bool),
    S("ema_decay", 0.9999, "EMA decay", float),
    # checkpoints and logging
    S("ckpt_save_dir", "./runs", "runs go to <dir>/<YYYY-MM-DD_time_HH_MM_SS>/ckpt_<rank>/",
      aliases=("output_path",)),
    S("ckpt_save_interval", 1, "save a checkpoint every N epochs", int),
    S("keep_checkpoint_max", 5, "epoch checkpoints kept (the best one is kept apart as <model>-best.ckpt)", int),
    S("ckpt_save_policy", "latest_k", "keep the latest k epoch checkpoints, or the top k by val top-1 (plus the "
      "newest, for --resume)",
      choices=("latest_k", "top_k")),
    S("resume", None, "continue a run: its checkpoint file, or its run/ckpt directory"),
    S("val_while_train", True, "evaluate on the validation split during training", parse_bool),
    S("val_interval", 1, "evaluate every N epochs", int),
    S("log_interval", 10, "log every N steps", int),
    S("tensorboard", True, "write TensorBoard event files to <run>/tensorboard/ (loss, LR, loss scale, img/s per "
      "log point; validation per epoch; the settings)", parse_bool),
    S("json", None, "validate/eval: also write the metrics to this JSON file"),
    S("real_labels", None, "validate/eval: ImageNet-ReaL labels (real.json, one label list per val image in "
      "sorted file-name order): also report ReaL top-1/top-5"),
    S("results_csv", None, "validate/eval: append one row (model, weights, transform, top-1/5, ReaL, params, "
      "img/s) to this CSV table"),
    S("images", [], "infer: image files, folders of them (recursive) or .txt lists of paths to classify", str,
      nargs="+"),
    S("top_k", 5, "infer: classes reported per image", int),
    S("predictions", None, "infer: write each image's top-k classes and probabilities to this file (.json, "
      "else CSV) instead of printing them"),
    # export
    S("file_format", "MINDIR", "export format", choices=("MINDIR", "ONNX", "AIR")),
    S("file_name", None, "export: output file (default: <model>.<format>)"),
    S("dynamic_batch", True, "export: leave the batch dimension open (MINDIR, ONNX); False fixes it to "
      "--batch_size", parse_bool),
    # average
    S("last", 0, "average.py: average the K newest epoch checkpoints of the run (--ckpt_path)", int),
    S("best", 0, "average.py: average the K best epoch checkpoints by val top-1", int),
    S("verify", False, "export: run the exported file (ONNX in onnxruntime, MINDIR in MindSpore) on a batch "
      "(the val split's with a data set, else random) and fail above 1e-4 relative difference", parse_bool),
)
BY_NAME = {s.name: s for s in SETTINGS}

# ---------------------------------------------------------------- ranges (checked after merging)

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if _finite(v) and v >= low else f"must be a number >= {low:g}"


def _above(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if _finite(v) and v > low else f"must be a number > {low:g}"


def _between(low: float, high: float, high_open: bool = False) -> Callable[[Any], str | None]:
    bracket = ")" if high_open else "]"
    return lambda v: None if _finite(v) and low <= v and (v < high if high_open else v <= high) \
        else f"must be in [{low:g}, {high:g}{bracket}"


def _pair(low_open: float, high: float | None) -> Callable[[Any], str | None]:
    """Two numbers ``low_open < a <= b (<= high)``."""
    limit = f" <= {high:g}" if high is not None else ""

    def check(v: Any) -> str | None:
        ok = len(v) == 2 and all(_finite(x) for x in v) and low_open < v[0] <= v[1] and (high is None or v[1] <= high)
        return None if ok else f"must be two numbers min max with {low_open:g} < min <= max{limit}"
    return check


def _three_positive(v: Any) -> str | None:
    return None if len(v) == 3 and all(_finite(x) and x > 0 for x in v) else "must be three positive numbers (R G B)"


def _three_unit(v: Any) -> str | None:
    return None if len(v) == 3 and all(_finite(x) and 0 <= x <= 1 for x in v) else \
        "must be three numbers in [0, 1] (R G B, 0-1 scale)"


def _increasing_epochs(v: Any) -> str | None:
    return None if v and all(x >= 1 for x in v) and list(v) == sorted(set(v)) else \
        "must be increasing epoch numbers >= 1"


PROBABILITY = _between(0.0, 1.0)
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "device_id": _at_least(0), "seed": _at_least(0), "dist_port": _between(1, 65535), "dist_timeout": _at_least(1),
    "num_parallel_workers": _at_least(1), "batch_size": _at_least(1), "image_size": _at_least(8), "train_image_size": _at_least(8),
    "scale": _pair(0.0, 1.0), "ratio": _pair(0.0, None), "hflip": PROBABILITY, "color_jitter": _at_least(0),
    "re_prob": PROBABILITY, "mixup": _at_least(0), "cutmix": _at_least(0), "mixup_prob": PROBABILITY,
    "mixup_switch_prob": PROBABILITY, "mixup_off_epoch": _at_least(0), "crop_pct": _between(0.01, 1.0),
    "mean": _three_unit, "std": _three_positive, "label_smoothing": _between(0.0, 1.0, high_open=True),
    "num_classes": _at_least(1), "in_channels": _at_least(1), "drop_rate": _between(0.0, 1.0, high_open=True),
    "drop_path_rate": _between(0.0, 1.0, high_open=True), "frozen_stages": _between(-1, 4), "lr": _above(0.0), "momentum": _between(0.0, 1.0, True),
    "weight_decay": _at_least(0), "backbone_lr_scale": _at_least(0), "warmup_epochs": _at_least(0),
    "min_lr": _at_least(0), "decay_epochs": _at_least(1), "decay_rate": _between(0.0, 1.0),
    "milestones": _increasing_epochs, "epoch_size": _at_least(1), "loss_scale": _above(0.0),
    "clip_value": _above(0.0), "gradient_accumulation_steps": _at_least(1), "ema_decay": _between(0.0, 1.0, True),
    "ckpt_save_interval": _at_least(1), "keep_checkpoint_max": _at_least(1), "val_interval": _at_least(1),
    "log_interval": _at_least(1), "last": _at_least(0), "best": _at_least(0), "top_k": _at_least(1),
    "kd_alpha": _between(0.0, 1.0), "kd_temperature": _above(0.0), "bce_target_thresh": _between(0.0, 1.0), "aug_repeats": _at_least(0),
}


def check_values(values: dict[str, Any]) -> None:
    """Every set value within its range (CHECKS); else a ConfigError naming the setting."""
    for name, check in CHECKS.items():
        value = values.get(name)
        problem = None if value is None else check(value)
        if problem:
            shown = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value) \
                if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"--{name}={shown}: {problem}")
    if values.get("min_lr") and values.get("lr") and values["min_lr"] > values["lr"]:
        raise ConfigError(f"--min_lr={values['min_lr']:g} is above --lr={values['lr']:g}")

ALIASES = {alias: s.name for s in SETTINGS for alias in (s.name, *s.aliases)}


def _canonical(key: str) -> str:
    """Map a flag or YAML key (any dialect, dashes or underscores) to its setting name."""
    name = key.lstrip("-").replace("-", "_")
    if name in ALIASES:
        return ALIASES[name]
    close = difflib.get_close_matches(name, list(ALIASES), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown setting {key!r}{hint}")


def _coerce(setting: Setting, value: Any, origin: str) -> Any:
    """Convert a YAML value to the setting's type, with the same rules as the command line."""
    try:
        if value is None:
            return None
        if setting.nargs:
            items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            converted = [setting.type(v) for v in items]
        else:
            converted = setting.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(f"{origin}: bad value {value!r} for {setting.name!r}: {exc}") from None
    if setting.choices and converted not in setting.choices:
        raise ConfigError(f"{origin}: {setting.name}={converted!r} is not one of {list(setting.choices)}")
    return converted


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    for s in SETTINGS:
        flags = []
        for name in (s.name, *s.aliases):
            flags.append(f"-{name}" if len(name) == 1 else f"--{name}")
            if "_" in name:
                flags.append(f"--{name.replace('_', '-')}")
        kwargs: dict[str, Any] = dict(dest=s.name, help=f"{s.help} (default: {s.default})")
        if s.type in (parse_bool, parse_weights):  # a bare flag means true
            kwargs.update(type=s.type, nargs="?", const=True, metavar="BOOL" if s.type is parse_bool else "WEIGHTS")
        else:
            kwargs.update(type=s.type)
            if s.nargs:
                kwargs["nargs"] = s.nargs
            if s.choices:
                kwargs["choices"] = s.choices
        parser.add_argument(*flags, **kwargs)
    return parser


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """Turn documented ``key=value`` overrides (no dashes) into ``--key=value``."""
    out = []
    for token in argv:
        if not token.startswith("-") and "=" in token and token.split("=", 1)[0].isidentifier():
            key, value = token.split("=", 1)
            token = f"--{key}={value}"
        out.append(token)
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML recipe into {setting name: value}, rejecting unknown keys and bad values."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        try:
            name = _canonical(str(key))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        values[name] = _coerce(BY_NAME[name], value, path)
    return values


def parse_config(argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> argparse.Namespace:
    """Merge defaults, a resumed run's saved settings (``--resume``), the YAML named by --config
    and the command line (highest precedence).

    ``explicit`` on the result lists the settings the user gave (YAML or command line), so that
    defaults taken from elsewhere (e.g. a weights' eval transform) never override them.
    """
    parser = build_parser(prog, description)
    args = _normalise_argv(sys.argv[1:] if argv is None else argv)
    try:
        cli, unknown = parser.parse_known_args(args)
    except SystemExit as exc:  # argparse already printed its message (or --help)
        raise SystemExit(exc.code) from None
    for token in unknown:
        if token.startswith("-"):
            _canonical(token.split("=", 1)[0])  # raises with a suggestion
        raise ConfigError(f"unexpected argument {token!r}")
    merged = {s.name: s.default for s in SETTINGS}
    resumed = run_config_path(cli.resume) if getattr(cli, "resume", None) else None
    if resumed:  # the run's own settings, then what is given now
        merged.update({k: v for k, v in load_yaml(resumed).items() if k not in NOT_RESUMED})
    config_path = getattr(cli, "config", None)
    if config_path:
        merged.update(load_yaml(config_path))
    merged.update(vars(cli))
    check_values(merged)
    config = argparse.Namespace(**merged)
    config.explicit = sorted(set(vars(cli)) | (set(load_yaml(config_path)) if config_path else set()))
    return config


RUN_CONFIG = "config.yaml"
# settings of a resumed run that describe the machine it ran on or how it was started, not the run
NOT_RESUMED = frozenset({"config", "resume", "device_target", "device_id", "num_parallel_workers"})


def run_config_path(resume: str) -> str | None:
    """The settings a run saved (``<run>/config.yaml``), from what ``--resume`` names: the run
    folder, its ``ckpt_0/`` folder or a checkpoint file in it; None if there are none."""
    folder = os.path.dirname(os.path.abspath(resume)) if os.path.isfile(resume) else os.path.abspath(resume)
    for candidate in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(candidate, RUN_CONFIG)):
            return os.path.join(candidate, RUN_CONFIG)
    return None


def config_yaml(config: argparse.Namespace) -> str:
    """The merged settings as the YAML a run folder keeps (``-c`` reads it back)."""
    return yaml.safe_dump({k: v for k, v in vars(config).items() if k in BY_NAME}, sort_keys=False)


def configure(argv: Sequence[str] | None, prog: str, description: str | None) -> argparse.Namespace:
    """The merged settings with ``device_target`` resolved (``auto`` -> what this MindSpore can run
    on, from the platform layer): call before importing the engine or the models, whose CPU kernels
    depend on it."""
    config = parse_config(argv, prog=prog, description=description)
    config.device_target = select_device_target(config.device_target)
    return config


# ---------------------------------------------------------------- specs

def _context(c: argparse.Namespace) -> ContextSpec:
    return ContextSpec(device_target=select_device_target(c.device_target), mode=c.mode, jit_level=c.jit_level,
                       device_id=c.device_id, seed=c.seed, distribute=c.distribute, weights_cache=c.weights_cache)


def _cluster(c: argparse.Namespace) -> ClusterSpec:
    return ClusterSpec(distribute=c.distribute, device_target=select_device_target(c.device_target),
                       device_id=c.device_id, dist_init=c.dist_init, dist_host=c.dist_host, dist_port=c.dist_port,
                       dist_timeout=c.dist_timeout)


def _loader(c: argparse.Namespace) -> LoaderSpec:
    return LoaderSpec(
        batch_size=c.batch_size, workers=c.num_parallel_workers, seed=c.seed, aug_repeats=c.aug_repeats,
        eval_transform=EvalTransform(image_size=c.image_size, crop_pct=c.crop_pct, interpolation=c.interpolation,
                                     mean=tuple(c.mean), std=tuple(c.std)),
        augmentation=Augmentation(size=c.train_image_size, scale=tuple(c.scale), ratio=tuple(c.ratio), hflip=c.hflip,
                                  auto_augment=c.auto_augment, color_jitter=c.color_jitter or 0.0,
                                  re_prob=c.re_prob),
        mixing=Mixing(mixup=c.mixup, cutmix=c.cutmix, prob=c.mixup_prob, switch_prob=c.mixup_switch_prob,
                      off_epoch=c.mixup_off_epoch, label_smoothing=c.label_smoothing))


def _data(c: argparse.Namespace) -> DataSpec:
    return DataSpec(dataset=c.dataset, data_dir=c.data_dir, train_split=c.train_split, val_split=c.val_split,
                    download=c.dataset_download)


def _model(c: argparse.Namespace) -> ModelSpec:
    return ModelSpec(name=c.model, num_classes=c.num_classes, in_channels=c.in_channels, drop_rate=c.drop_rate,
                     drop_path_rate=c.drop_path_rate, frozen_stages=c.frozen_stages)


def _weights(c: argparse.Namespace) -> WeightsSpec:
    return WeightsSpec(pretrained=c.pretrained, ckpt_path=c.ckpt_path, fold_bn=c.fold_bn)


def train_job(c: argparse.Namespace) -> TrainJob:
    """The specs of a training run."""
    return TrainJob(
        context=_context(c), cluster=_cluster(c), data=_data(c), loader=_loader(c), model=_model(c),
        weights=_weights(c),
        schedule=ScheduleSpec(lr=c.lr, scheduler=c.scheduler, warmup_epochs=c.warmup_epochs, min_lr=c.min_lr,
                              decay_epochs=c.decay_epochs, decay_rate=c.decay_rate,
                              milestones=tuple(c.milestones), epochs=c.epoch_size),
        optim=OptimSpec(opt=c.opt, momentum=c.momentum, weight_decay=c.weight_decay,
                        filter_bias_and_bn=c.filter_bias_and_bn, backbone_lr_scale=c.backbone_lr_scale,
                        freeze_backbone=c.freeze_backbone),
        step=StepSpec(label_smoothing=c.label_smoothing, bce_loss=c.bce_loss, bce_target_thresh=c.bce_target_thresh,
                      amp_level=c.amp_level, loss_scale=c.loss_scale,
                      dynamic_loss_scale=c.loss_scale_type == "dynamic",
                      clip_norm=c.clip_value if c.clip_grad else 0.0,
                      accumulation=max(1, c.gradient_accumulation_steps), ema_decay=c.ema_decay if c.ema else 0.0),
        run=RunSpec(epochs=c.epoch_size, output_dir=c.ckpt_save_dir, resume=c.resume,
                    save_interval=c.ckpt_save_interval, keep_checkpoints=c.keep_checkpoint_max,
                    save_policy=c.ckpt_save_policy, val_while_train=c.val_while_train, val_interval=c.val_interval,
                    log_interval=c.log_interval, tensorboard=c.tensorboard, sink_mode=c.dataset_sink_mode,
                    config_yaml=config_yaml(c)),
        distill=DistillSpec(teacher_model=c.teacher_model, teacher_pretrained=c.teacher_pretrained,
                            teacher_ckpt=c.teacher_ckpt, alpha=c.kd_alpha, temperature=c.kd_temperature))


def inference_job(c: argparse.Namespace) -> InferenceJob:
    """The specs of validate, eval, infer and export; ``given`` names the model / eval-transform
    settings the user set, which win over what the weights bring."""
    given = frozenset(n for n in getattr(c, "explicit", ()) if n == "model" or n in EVAL_FIELDS)
    return InferenceJob(context=_context(c), model=_model(c), weights=_weights(c), loader=_loader(c), given=given,
                        cluster=_cluster(c), data=_data(c), json_path=c.json, real_labels=c.real_labels,
                        results_csv=c.results_csv, images=tuple(c.images), top_k=c.top_k, predictions=c.predictions,
                        file_format=c.file_format, file_name=c.file_name, dynamic_batch=c.dynamic_batch,
                        verify=c.verify)


def average_job(c: argparse.Namespace) -> AverageSpec:
    """The spec of average.py."""
    if not c.ckpt_path:
        raise ConfigError("give the run to average: --ckpt_path=runs/<run> (or its ckpt_0/ folder)")
    return AverageSpec(run_path=c.ckpt_path, last=c.last, best=c.best, file_name=c.file_name)
