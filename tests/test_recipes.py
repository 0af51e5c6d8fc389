"""Every recipe in configs/ parses, names a registered model, and (slow) trains on tiny data."""
from __future__ import annotations

import glob
import os

import pytest

import models
from config import load_yaml, parse_config, train_job
from resgarden.trainer import train
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


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, REPO) for p in RECIPES])
def test_recipe_trains_one_tiny_epoch(tmp_path, path):
    write_imagenet_layout(str(tmp_path / "data"), per_class=4, size=40)
    cfg = parse_config(["-c", path, "--dataset=imagenet", f"--data_dir={tmp_path / 'data'}", "--num_classes=4",
                        "--pretrained=False", "--image_size=32", "--batch_size=8", "--epoch_size=1",
                        "--amp_level=O0", f"--ckpt_save_dir={tmp_path / 'runs'}", "--num_parallel_workers=1"])
    result = train(train_job(cfg))
    assert result["epoch"] == 1 and result["train_loss"] > 0
