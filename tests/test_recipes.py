"""Every recipe in configs/ parses, names a registered model, and (slow) trains on tiny data."""
from __future__ import annotations

import glob
import os

import pytest

import models
from config import load_yaml, parse_config, train_job
from resgarden.training.trainer import train
from tests.helpers import write_imagenet_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))


def test_there_are_recipes_for_every_family():
    families = {os.path.basename(os.path.dirname(p)) for p in RECIPES}
    assert {"resnet", "res2net", "resnest", "cifar10", "digits"} <= families


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, REPO) for p in RECIPES])
def test_recipe_parses_and_names_a_model(path):
    values = load_yaml(path)
    models.check_model_name(values["model"])
    assert values["model"] in os.path.basename(path)
    if os.path.basename(os.path.dirname(path)) not in ("cifar10", "digits"):
        assert values["dataset"] == "imagenet" and values.get("num_classes") == 1000


# One recipe per block construct trains with its own model; the others train their settings on
# ResNet-18 (a deeper or wider variant of a construct compiles the same cells, only more of them, and
# its forward pass is compiled in tests/test_models.py): 5 graph compiles of a large model, not 14.
OWN_MODEL = {"resnet/resnet50_gpu.yaml", "resnet/resnext50_32x4d_ascend.yaml", "res2net/res2net50_gpu.yaml",
             "res2net/res2net50_v1b_ascend.yaml", "resnest/resnest50_ascend.yaml"}


def test_every_block_construct_of_the_recipes_trains_with_its_own_model():
    def construct(name: str) -> str:  # the model name less its depth and width
        return name.split("_")[0].rstrip("0123456789") + ("_v1b" if name.endswith("_v1b") else "")

    named = {construct(load_yaml(p)["model"]) for p in RECIPES}
    own = {construct(load_yaml(os.path.join(REPO, "configs", p))["model"]) for p in OWN_MODEL}
    assert named <= own == {"resnet", "resnext", "res2net", "res2net_v1b", "resnest"}


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, REPO) for p in RECIPES])
def test_recipe_trains_one_tiny_epoch(tmp_path, path):
    write_imagenet_layout(str(tmp_path / "data"), per_class=4, size=40)
    own = os.path.relpath(path, os.path.join(REPO, "configs")) in OWN_MODEL
    smaller = ["--train_image_size=24"] if load_yaml(path).get("train_image_size") else []  # trains below eval
    cfg = parse_config(["-c", path, "--dataset=imagenet", f"--data_dir={tmp_path / 'data'}", "--num_classes=4",
                        "--pretrained=False", "--image_size=32", "--batch_size=8", "--epoch_size=1",
                        "--amp_level=O0", f"--ckpt_save_dir={tmp_path / 'runs'}", "--num_parallel_workers=1",
                        *smaller, *([] if own else ["--model=resnet18"])])
    result = train(train_job(cfg))
    assert result["epoch"] == 1 and result["train_loss"] > 0


# What the source files say (PaddleClas ppcls/configs/ImageNet/..., mindcv configs/...), as our settings
SOURCE_VALUES = {
    "resnet/resnet50_paddleclas_gpu.yaml": dict(  # PaddleClas ResNet/ResNet50.yaml
        epoch_size=120, batch_size=64, lr=0.1, scheduler="multistep", milestones=[30, 60, 90], decay_rate=0.1,
        momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False, label_smoothing=0.0, mixup=0.0,
        auto_augment=None, crop_pct=0.875, amp_level="O0", warmup_epochs=0.0),
    "resnest/resnest50_paddleclas_gpu.yaml": dict(  # PaddleClas ResNeSt/ResNeSt50.yaml
        epoch_size=300, batch_size=64, lr=0.1, scheduler="cosine", min_lr=0.0, momentum=0.9, weight_decay=7e-5,
        filter_bias_and_bn=True, label_smoothing=0.1, mixup=0.2, mixup_prob=1.0, cutmix=0.0,
        auto_augment="autoaug", crop_pct=0.875, amp_level="O0", warmup_epochs=0.0),
    "res2net/res2net50_14w_8s_gpu.yaml": dict(  # PaddleClas Res2Net/Res2Net50_14w_8s.yaml
        epoch_size=200, batch_size=64, lr=0.1, scheduler="cosine", momentum=0.9, weight_decay=1e-4,
        filter_bias_and_bn=False, label_smoothing=0.1, mixup=0.2, val_interval=1, num_parallel_workers=4),
}
MINDCV_RECIPES = [p for p in RECIPES if "Source: mindcv" in open(p).read()]

# ResNet strikes back (arXiv:2110.00476), Table 1, columns A1 / A2 / A3, as our settings; the BCE target
# threshold is timm's --bce-target-thresh of those runs, the eval crop timm's pretrained_cfg for them
_RSB = dict(model="resnet50", batch_size=256, image_size=224, crop_pct=0.95, interpolation="bicubic", opt="lamb",
            scheduler="cosine", warmup_epochs=5.0, cutmix=1.0, bce_loss=True, bce_target_thresh=0.2, re_prob=0.0,
            drop_rate=0.0, ema=False, clip_grad=False, filter_bias_and_bn=True, amp_level="O2")
RSB_VALUES = {
    "resnet/resnet50_rsb_a1.yaml": dict(_RSB, epoch_size=600, lr=5e-3, weight_decay=0.01, label_smoothing=0.1,
                                        drop_path_rate=0.05, aug_repeats=3, mixup=0.2, train_image_size=None,
                                        auto_augment="randaug-m7-mstd0.5-inc1"),
    "resnet/resnet50_rsb_a2.yaml": dict(_RSB, epoch_size=300, lr=5e-3, weight_decay=0.02, label_smoothing=0.0,
                                        drop_path_rate=0.05, aug_repeats=3, mixup=0.1, train_image_size=None,
                                        auto_augment="randaug-m7-mstd0.5-inc1"),
    "resnet/resnet50_rsb_a3.yaml": dict(_RSB, epoch_size=100, lr=8e-3, weight_decay=0.02, label_smoothing=0.0,
                                        drop_path_rate=0.0, aug_repeats=0, mixup=0.1, train_image_size=160,
                                        auto_augment="randaug-m6-mstd0.5-inc1"),
}


@pytest.mark.parametrize("recipe", sorted(RSB_VALUES))
def test_resnet_strikes_back_recipes_hold_the_papers_values(recipe):
    assert not _off_source(recipe, RSB_VALUES[recipe])


def _off_source(recipe: str, values: dict) -> dict:
    """The settings of ``recipe`` that differ from ``values``: name -> (ours, the source's)."""
    cfg = parse_config(["-c", os.path.join(REPO, "configs", recipe)])
    return {name: (getattr(cfg, name), value) for name, value in values.items()
            if not (getattr(cfg, name) == pytest.approx(value) if isinstance(value, float) else
                    getattr(cfg, name) == value)}


@pytest.mark.parametrize("recipe", sorted(SOURCE_VALUES))
def test_paddleclas_recipes_hold_their_sources_values(recipe):
    assert not _off_source(recipe, SOURCE_VALUES[recipe])


def test_mindcv_recipes_decay_every_parameter_and_jitter_colours():
    assert len(MINDCV_RECIPES) == 9
    for path in MINDCV_RECIPES:
        cfg = parse_config(["-c", path])
        assert cfg.filter_bias_and_bn is False, path  # mindcv's weight_decay_filter defaults to "disable"
        if not cfg.auto_augment:  # mindcv's colour jitter (default 0.4) applies where no policy does
            assert cfg.color_jitter == pytest.approx(0.4), path
