"""Checkpoints in mindspore/models' layouts (official ResNet, research ResNeXt) load into our models
with every parameter matched and the source network's logits."""
from __future__ import annotations

import logging
import os

import mindspore as ms
import numpy as np
import pytest

import models
import validate as validate_entry
from models import layouts
from models.checkpoint import open_checkpoint
from models.weights import WeightsError
from tests.helpers import write_imagenet_layout
from tests.msmodels_reference import OfficialResNet, ResNeXtNet, randomise_statistics

IMAGES = np.random.RandomState(7).normal(0, 1, (2, 3, 32, 32)).astype(np.float32)


def _save_like_mindspore_models(net: ms.nn.Cell, path: str) -> str:
    """The network's parameters plus the optimizer state mindspore/models' checkpoints carry."""
    extra = [{"name": "moments." + p.name, "data": ms.Tensor(np.zeros(p.shape, np.float32))}
             for p in net.trainable_params()[:3]]
    extra += [{"name": "learning_rate", "data": ms.Tensor(np.float32(0.1))},
              {"name": "global_step", "data": ms.Tensor(np.int32(500))}]
    params = [{"name": p.name, "data": p.value()} for p in net.get_parameters()]
    ms.save_checkpoint(params + extra, path)
    return path


def _assert_same_logits(reference: ms.nn.Cell, ours: ms.nn.Cell, classes: int) -> None:
    reference.set_train(False)
    ours.set_train(False)
    want = reference(ms.Tensor(IMAGES)).asnumpy()[:, :classes]
    got = ours(ms.Tensor(IMAGES)).asnumpy()
    scale = float(np.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name,basic,blocks", [("resnet18", True, (2, 2, 2, 2)), ("resnet50", False, (3, 4, 6, 3))])
@pytest.mark.slow
def test_official_resnet_checkpoint_loads_with_the_source_logits(tmp_path, graph_mode, caplog, name, basic, blocks):
    reference = OfficialResNet(basic, blocks, num_classes=1001)
    randomise_statistics(reference)
    path = _save_like_mindspore_models(reference, str(tmp_path / f"{name}-90_5004.ckpt"))
    assert open_checkpoint(path).model_name() == name
    with caplog.at_level(logging.INFO, logger="resgarden"):
        ours = models.create_model(name, num_classes=1000, checkpoint_path=path, head="refuse")  # strict
    layout = "ResNet-18/34" if basic else "ResNet-50/101/152"
    renamed = f"renamed from mindspore/models {layout} layout"
    assert renamed in caplog.text and "1001 outputs" in caplog.text
    if not basic:
        assert "conv_pad='same'" in caplog.text  # built as the source computes
    _assert_same_logits(reference, ours, 1000)


@pytest.mark.slow
def test_resnext_group_convs_are_joined_into_one_grouped_weight(tmp_path, graph_mode, caplog):
    reference = ResNeXtNet(group_conv=True, num_classes=1001)
    randomise_statistics(reference)
    path = _save_like_mindspore_models(reference, str(tmp_path / "resnext50-150_2502.ckpt"))
    checkpoint = open_checkpoint(path)
    assert checkpoint.model_name() == "resnext50_32x4d"
    assert "backbone.layer1.0.conv2.convs.31.weight" in checkpoint.state
    with caplog.at_level(logging.INFO, logger="resgarden"):
        ours = models.create_model("resnext50_32x4d", num_classes=1000, checkpoint_path=checkpoint, head="refuse")
    assert "renamed from mindspore/models ResNeXt layout" in caplog.text
    assert ours.layer1[0].conv2.weight.shape == (128, 4, 3, 3)
    _assert_same_logits(reference, ours, 1000)


def _shapes_only(state: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {k: np.zeros(v, np.float32) for k, v in state.items()}


def test_resnext101_is_told_apart_by_its_group_count():
    """research/cv/ResNeXt's resnext101 is 32x4d on Ascend (GroupConv) and 64x4d on GPU (one grouped conv)."""
    def names(groups: int, group_conv: bool) -> dict[str, np.ndarray]:
        width = 128 * groups // 32
        state = {"head.fc.weight": (1000, 2048)}
        for stage, count in enumerate((3, 4, 23, 3), 1):
            for i in range(count):
                state[f"backbone.layer{stage}.{i}.conv1.weight"] = (width, 64, 1, 1)
        if group_conv:
            state.update({f"backbone.layer1.0.conv2.convs.{k}.weight": (4, 4, 3, 3) for k in range(groups)})
        else:
            state["backbone.layer1.0.conv2.weight"] = (width, 4, 3, 3)
        return _shapes_only(state)

    for groups, group_conv, want in ((32, True, "resnext101_32x4d"), (64, False, "resnext101_64x4d"),
                                     (32, False, "resnext101_32x4d")):
        state = names(groups, group_conv)
        assert layouts.source_model(layouts.detect_layout(state), state) == want


@pytest.mark.slow
def test_a_recognised_but_unsupported_variant_is_one_line(tmp_path):
    state = {"end_point.weight": np.zeros((10, 2048), np.float32), "conv1_0.weight": np.zeros((32, 3, 3, 3), np.float32),
             "layer3.5.se_dense_0.weight": np.zeros((256, 1024), np.float32)}
    path = str(tmp_path / "se_resnet50.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], path)
    with pytest.raises(WeightsError, match=r"mindspore/models ResNet-50/101/152 checkpoint of SE-ResNet") as err:
        models.create_model("resnet50", checkpoint_path=path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_users_padding_choice_wins_and_is_said(tmp_path, caplog):
    reference = OfficialResNet(False, (3, 4, 6, 3), num_classes=10)
    path = _save_like_mindspore_models(reference, str(tmp_path / "r50.ckpt"))
    with caplog.at_level(logging.INFO, logger="resgarden"):
        ours = models.create_model("resnet50", num_classes=10, checkpoint_path=path, pool_pad="pad")
    assert "pool_pad='pad' as given" in caplog.text and "outputs will differ" in caplog.text
    assert ours.conv1.pad_mode == "same"  # what the user did not set still follows the source


@pytest.mark.slow
def test_eval_py_scores_a_mindspore_models_ckpt_folder(tmp_path, capsys):
    reference = OfficialResNet(False, (3, 4, 6, 3), num_classes=1001)
    randomise_statistics(reference)
    folder = tmp_path / "train" / "ckpt_0"
    folder.mkdir(parents=True)
    older = _save_like_mindspore_models(OfficialResNet(False, (3, 4, 6, 3)), str(folder / "resnet-1_10.ckpt"))
    os.utime(older, (1, 1))
    _save_like_mindspore_models(reference, str(folder / "resnet-2_10.ckpt"))
    write_imagenet_layout(str(tmp_path / "imagenet"), per_class=2, size=40, splits=("val",))
    assert validate_entry.main([f"--data_path={tmp_path / 'imagenet' / 'val'}", "--device_target=CPU",
                                f"--checkpoint_file_path={folder}/", "--image_size=32", "--batch_size=4",
                                "--num_parallel_workers=1"], prog="eval.py") == 0
    printed = capsys.readouterr().out
    assert "resnet50: top-1 " in printed and "images 8" in printed


@pytest.mark.slow
def test_a_run_fine_tuned_from_mindspore_models_weights_keeps_their_padding(tmp_path, caplog):
    """The padding the source network computed with travels in the run's checkpoints: validate and
    --resume build the model the same way."""
    from models.checkpoint import find_checkpoint
    from models.pooling import MaxPool3x3
    from resgarden.training.trainer import train
    from tests.helpers import train_job_of

    reference = OfficialResNet(True, (2, 2, 2, 2), num_classes=1001)
    path = _save_like_mindspore_models(reference, str(tmp_path / "resnet18-90_625.ckpt"))
    write_imagenet_layout(str(tmp_path / "data"), per_class=4, size=36)
    args = ["--model=resnet18", f"--data_dir={tmp_path / 'data'}", f"--ckpt_save_dir={tmp_path / 'runs'}",
            "--image_size=32", "--batch_size=8", "--num_parallel_workers=1", "--val_while_train=False"]
    args.append("--epoch_size=2")
    run = train(train_job_of(args + [f"--ckpt_path={path}"]))
    saved = open_checkpoint(find_checkpoint(run["run_dir"]))
    assert saved.meta["build"] == {"pool_pad": "pad"}
    with caplog.at_level(logging.INFO, logger="resgarden"):
        again = models.create_model("resnet18", num_classes=4, checkpoint_path=saved)
    assert "built with pool_pad='pad' to match the run that saved it" in caplog.text
    pool = again.max_pool
    if isinstance(pool, MaxPool3x3):  # the native pool: the same padding, that pool its fallback
        assert pool.pad_mode == "pad"
        pool = pool.fallback
    assert isinstance(pool, ms.nn.SequentialCell)  # zero pad + pool, as the source's explicit pad
    first_epoch = os.path.join(run["run_dir"], "ckpt_0", "resnet18-e001.ckpt")
    resumed = train(train_job_of(args + [f"--resume={first_epoch}"]))
    assert resumed["epoch"] == 2
    assert open_checkpoint(find_checkpoint(run["run_dir"])).meta["build"] == {"pool_pad": "pad"}
