"""Each model's forward pass and one training step on the device, at float32 and at its recipes'
AMP levels, against the same model, weights and batch in float32 on CPU.

The CPU side runs in a child process (``python -m resgarden.check --reference DIR``): MindSpore
places a process on one device, once. It computes with MindSpore's own CPU kernels (this project's
native CPU kernels off), so on a CPU host the check compares those native kernels with MindSpore's.
Compared, each as a relative L2 error: the eval-mode logits; a training step's loss and
BatchNorm statistics update; the weight update (SGD: the gradient) of a step that normalises by the
running statistics (see :func:`model_step`).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import yaml

from .report import Result, relative_error

SEED_MODELS = ("resnet50", "res2net50", "res2net50_14w_8s", "resnest50", "resnext50_32x4d")
# relative L2 error allowed against float32 on CPU: float32 leaves room for other convolution
# algorithms and TF32 tensor cores; float16 levels for float16 rounding through ~50 layers
TOLERANCES = {"O0": 1e-2, "O1": 5e-2, "O2": 5e-2, "O3": 1e-1}
# the relative rounding of float16 and of TF32 (which MindSpore allows GPU convolutions by default);
# the weight update may differ by SENSITIVITY_FACTOR x what this perturbation of the input causes
ROUNDING = 2.0 ** -11
SENSITIVITY_FACTOR = 10.0
NUM_CLASSES = 10
LR = 0.1
LOSS_SCALE = 1024.0  # the seed recipes' fixed loss scale for float16 levels
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MS_", "MPI_", "RANK_", "DEVICE_ID")


@dataclass(frozen=True)
class NumericsSpec:
    """What to compare: which models at which AMP levels, on what batch."""
    levels: dict[str, tuple[str, ...]]  # model -> AMP levels to run on the device ("O0" first)
    image_size: int = 64
    batch_size: int = 4


def recipe_levels(model: str, configs_dir: str) -> tuple[str, ...]:
    """"O0" and the AMP levels of the recipes in ``configs_dir`` that train ``model``."""
    levels = {"O0"}
    for path in glob.glob(os.path.join(configs_dir, "**", "*.yaml"), recursive=True):
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
        if isinstance(recipe, dict) and recipe.get("model") == model:
            levels.add(str(recipe.get("amp_level", "O0")))
    return tuple(sorted(levels))


def fixed_batch(spec: NumericsSpec) -> tuple[np.ndarray, np.ndarray]:
    """The batch every side computes on."""
    rs = np.random.RandomState(0)
    images = rs.normal(0, 1, (spec.batch_size, 3, spec.image_size, spec.image_size)).astype(np.float32)
    return images, rs.randint(0, NUM_CLASSES, spec.batch_size).astype(np.int32)


def write_initial_weights(spec: NumericsSpec, work_dir: str, cluster) -> None:
    """Each model's initial weights (rank 0's on every rank) and the batch, for both sides."""
    import models
    from resgarden.runtime.distributed import broadcast_parameters

    for name in spec.levels:
        model = models.create_model(name, num_classes=NUM_CLASSES)
        broadcast_parameters(model, cluster)
        np.savez(os.path.join(work_dir, f"init_{name}.npz"), **{p.name: p.asnumpy() for p in model.get_parameters()})
    images, labels = fixed_batch(spec)
    np.savez(os.path.join(work_dir, "batch.npz"), images=images, labels=labels)


def model_step(name: str, level: str, work_dir: str, sensitivity: bool = False) -> dict[str, np.ndarray]:
    """``name`` at AMP ``level`` from its initial weights: eval-mode logits; one training step's
    loss and BatchNorm statistics update; and the weight update of one SGD step with BatchNorm
    normalising by its running statistics (whether either step was skipped, too).

    The weight update is taken with running statistics because with batch statistics it is
    chaotic at random initialisation: on CPU alone, changing the input by 1e-7 (relative) moves a
    resnet50's update by 6 %, so no tolerance could tell a wrong kernel from rounding."""
    import mindspore as ms
    from mindspore import nn

    import models
    from resgarden.training.amp import Float32Loss, apply_amp
    from resgarden.training.train_step import TrainStep

    init = dict(np.load(os.path.join(work_dir, f"init_{name}.npz")))
    batch = np.load(os.path.join(work_dir, "batch.npz"))
    model = apply_amp(models.create_model(name, num_classes=NUM_CLASSES), level)
    images, labels = ms.Tensor(batch["images"]), ms.Tensor(batch["labels"])
    trainable = sorted(p.name for p in model.trainable_params())
    statistics = sorted(n for n in init if n not in trainable)

    def reset() -> None:
        ms.load_param_into_net(model, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in init.items()},
                               strict_load=True)

    def step(batch_statistics: bool, inputs=images) -> tuple[float, int, dict[str, np.ndarray]]:
        reset()
        cell = TrainStep(nn.WithLossCell(model, Float32Loss(nn.CrossEntropyLoss())),
                         nn.SGD(model.trainable_params(), LR), loss_scale=1.0 if level == "O0" else LOSS_SCALE)
        cell.set_train(True)
        model.set_train(batch_statistics)
        loss = float(cell(inputs, labels).asnumpy())
        return loss, int(cell.skipped_steps.asnumpy()), {p.name: p.asnumpy().astype(np.float32)
                                                          for p in model.get_parameters()}

    reset()
    model.set_train(False)
    logits = model(images).asnumpy().astype(np.float32)
    loss, skipped_train, trained = step(batch_statistics=True)
    _, skipped_update, updated = step(batch_statistics=False)
    result = dict(logits=logits, loss=np.float32(loss), skipped=np.int32(skipped_train + skipped_update),
                  update=np.concatenate([(updated[n] - init[n]).ravel() for n in trainable]),
                  statistics=np.concatenate([(trained[n] - init[n]).ravel() for n in statistics] or [np.zeros(0)]))
    if sensitivity:
        noise = np.random.RandomState(1).normal(0, ROUNDING, batch["images"].shape)
        _, _, perturbed = step(False, ms.Tensor((batch["images"] * (1 + noise)).astype(np.float32)))
        result["update_perturbed"] = np.concatenate([(perturbed[n] - init[n]).ravel() for n in trainable])
    return result


def reference(models_: list[str], work_dir: str) -> None:
    """The child process's work: every model at float32 on CPU, written next to its weights."""
    for name in models_:
        np.savez(os.path.join(work_dir, f"reference_{name}.npz"), **model_step(name, "O0", work_dir, sensitivity=True))


def start_reference(spec: NumericsSpec, work_dir: str, threads: int) -> subprocess.Popen:
    """The CPU side as a child process: a single process (none of the launcher's variables),
    MindSpore's own CPU kernels, ``threads`` threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(RESGARDEN_NATIVE_CONV="0", OMP_NUM_THREADS=str(threads))
    log = open(os.path.join(work_dir, "reference.log"), "w", encoding="utf-8")  # noqa: SIM115 - the child owns it
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.Popen([sys.executable, "-m", "resgarden.check", "--reference", work_dir, "--models",
                             *spec.levels], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def compare(name: str, level: str, device: dict[str, np.ndarray], cpu: dict[str, np.ndarray]) -> Result:
    """One model at one level against float32 on CPU, within TOLERANCES[level]; the weight update
    also within SENSITIVITY_FACTOR x what ROUNDING of the input moves it on CPU, if that is more."""
    rounding = relative_error(cpu["update_perturbed"], cpu["update"])
    tolerances = {f"{key} err": TOLERANCES[level] for key in ("logits", "loss", "update", "statistics")}
    tolerances["update err"] = max(TOLERANCES[level], SENSITIVITY_FACTOR * rounding)
    errors = {f"{key} err": relative_error(device[key], cpu[key]) for key in ("logits", "loss", "update", "statistics")
              if cpu[key].size}
    numbers = dict(errors, tolerance=TOLERANCES[level], **{"update tolerance": tolerances["update err"]},
                   loss=float(device["loss"]))
    title = f"{name} {level} vs float32 on CPU"
    if int(device["skipped"]):
        return Result(title, "fail", f"the step was skipped: its float16 gradients overflowed at loss scale "
                                     f"{LOSS_SCALE:g}", numbers)
    worst = max(errors, key=lambda key: errors[key] / tolerances[key])
    if errors[worst] > tolerances[worst]:
        return Result(title, "fail", f"{worst.split()[0]} differs by {errors[worst]:.3g} > {tolerances[worst]:.3g}: "
                                     "this device computes the model wrongly at this precision", numbers)
    return Result(title, "pass", "forward and training step agree", numbers)


def check_models(spec: NumericsSpec, work_dir: str, cluster, reference_process: subprocess.Popen,
                 timeout: float = 1800.0) -> list[Result]:
    """Every model at every level on the device, compared with the child's float32 CPU results."""
    import logging

    logger = logging.getLogger("resgarden")
    device = {}
    for name, levels in spec.levels.items():
        for level in levels:
            logger.info("check: %s at %s on the device", name, level)
            device[name, level] = model_step(name, level, work_dir)
    try:
        code = reference_process.wait(timeout)
    except subprocess.TimeoutExpired:
        reference_process.kill()
        code = None
    if code != 0:
        with open(os.path.join(work_dir, "reference.log"), encoding="utf-8", errors="replace") as handle:
            tail = [line.strip() for line in handle.read().splitlines() if line.strip()][-1:]
        why = f"the CPU reference process {'timed out' if code is None else f'failed ({code})'}: {' '.join(tail)}"
        return [Result(f"{name} vs float32 on CPU", "fail", why) for name in spec.levels]
    results = []
    for (name, level), values in device.items():
        cpu = dict(np.load(os.path.join(work_dir, f"reference_{name}.npz")))
        results.append(compare(name, level, values, cpu))
    return results
