"""The model zoo: exact parameter counts, registry behaviour, trunk options, both execution modes."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import models
from models.fold import fold_batchnorm
from models.profile import count_macs, count_params

# The 18 variants of the brief, beside what the cards hold (models/registry.py: Card)
BRIEF = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x4d",
         "resnext101_64x4d", "res2net50", "res2net101", "res2net50_14w_8s", "res2net50_48w_2s", "res2net50_26w_6s",
         "res2net50_26w_8s", "res2net50_v1b", "res2net101_v1b", "resnest50", "resnest101"}


@pytest.fixture(scope="module")
def model_zoo():
    """name -> model with default arguments, built once for this module (its compiled graphs go with it)."""
    cache: dict[str, nn.Cell] = {}

    def get(name: str) -> nn.Cell:
        if name not in cache:
            cache[name] = models.create_model(name)
        return cache[name]

    return get


def _input(size: int = 32, batch: int = 2, channels: int = 3, seed: int = 0) -> ms.Tensor:
    return ms.Tensor(np.random.RandomState(seed).randn(batch, channels, size, size).astype(np.float32))


def test_the_registry_holds_every_variant_of_the_brief_with_its_card():
    assert BRIEF <= set(models.list_models())
    for name in models.list_models():
        card = models.model_card(name)
        assert (card.name, card.family) == (name, card.build.__module__.rsplit(".", 1)[-1])
        assert card.params > 0 and card.gmacs > 0 and card.timm
        if card.weights and card.weights.url:
            assert card.weights.sha256_prefix and card.weights.source == "mindcv"


@pytest.mark.parametrize("name", models.list_models())
@pytest.mark.slow
def test_param_count_and_macs_are_the_cards(model_zoo, name):
    card = models.model_card(name)
    assert count_params(model_zoo(name)) == card.params
    assert count_macs(model_zoo(name)) / 1e9 == pytest.approx(card.gmacs, abs=0.005)


def test_list_models_pattern():
    assert models.list_models("res2net50_*") == [
        "res2net50_14w_8s", "res2net50_26w_6s", "res2net50_26w_8s", "res2net50_48w_2s", "res2net50_v1b"]
    assert models.list_models("nothing*") == []


def test_unknown_model_names_the_closest_ones():
    with pytest.raises(ValueError, match=r"unknown model 'res2net5'.*Did you mean .*res2net50"):
        models.create_model("res2net5")


def test_pretrained_and_checkpoint_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        models.create_model("resnet18", pretrained=True, checkpoint_path="x.ckpt")


def _fast_first(names) -> list:
    """ResNet-18 in the fast tier, the other models slow."""
    return [name if name == "resnet18" else pytest.param(name, marks=pytest.mark.slow) for name in sorted(names)]


# Graph mode for one model per construct and width pattern; the deeper variants compile the same
# cells, only more of them (PyNative runs every model).
GRAPH_FORWARD = {"resnet18", "resnet50", "resnext50_32x4d", "res2net50", "res2net50_14w_8s", "res2net50_48w_2s",
                 "res2net50_v1b", "resnest50"}


@pytest.mark.parametrize("name", _fast_first(models.list_models()))
def test_forward_in_pynative_mode(model_zoo, pynative_mode, name):
    _forward_is_finite(model_zoo(name))


@pytest.mark.parametrize("name", _fast_first(GRAPH_FORWARD))
def test_forward_in_graph_mode(model_zoo, graph_mode, name):
    _forward_is_finite(model_zoo(name))


def _forward_is_finite(model: nn.Cell) -> None:
    model.set_train(False)
    out = model(_input()).asnumpy()
    assert out.shape == (2, 1000)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "res2net50", "res2net50_v1b", "resnest50"])
@pytest.mark.slow
def test_full_resolution_forward_graph(model_zoo, graph_mode, name):
    model = model_zoo(name)
    model.set_train(False)
    out = model(_input(224, batch=1)).asnumpy()
    assert out.shape == (1, 1000) and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "res2net50_14w_8s", "resnest50"])
@pytest.mark.slow
def test_options_num_classes_in_channels(exec_mode, name):  # feature maps: tests/test_features.py
    x1 = _input(64, channels=1)
    headless = models.create_model(name, num_classes=0, in_channels=1)
    headless.set_train(False)
    pooled = headless(x1).asnumpy()
    assert pooled.shape == (2, headless.num_features)


def test_forward_features_and_head_compose(model_zoo):
    model = model_zoo("resnet18")
    model.set_train(False)
    x = _input()
    composed = model.forward_head(model.forward_features(x)).asnumpy()
    np.testing.assert_allclose(composed, model(x).asnumpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_drop_rate_and_drop_path_are_active_only_in_training(exec_mode):
    model = models.create_model("resnet18", num_classes=10, drop_rate=0.5, drop_path_rate=0.5)
    x = _input()
    model.set_train(False)
    eval1, eval2 = model(x).asnumpy(), model(x).asnumpy()
    np.testing.assert_array_equal(eval1, eval2)
    model.set_train(True)
    train1, train2 = model(x).asnumpy(), model(x).asnumpy()
    assert not np.allclose(train1, train2)
    # drop path rises linearly from 0 at the first block to the rate at the last block
    assert model.layer1[0].drop_path is None
    assert model.layer4[1].drop_path.keep_prob == pytest.approx(0.5)


def test_zero_init_last_starts_blocks_as_identity():
    model = models.create_model("res2net50_48w_2s", zero_init_last=True)
    assert not model.layer2[1].bn3.gamma.asnumpy().any()
    assert model.layer2[1].bn1.gamma.asnumpy().all()


@pytest.mark.slow
def test_reset_classifier(exec_mode):
    model = models.create_model("resnet18")
    model.set_train(False)
    assert model(_input()).shape == (2, 1000)  # compiled (graph mode) before the head changes
    model.reset_classifier(7)
    model.set_train(False)
    assert model(_input()).shape == (2, 7)
    model.reset_classifier(0)
    assert model(_input()).shape == (2, 512)


@pytest.mark.slow
def test_macs_match_published_figures(model_zoo):
    # published: ResNet-50 4.1 GFLOPs (MACs), ResNet-18 1.8, Res2Net-50 4.2, ResNeSt-50 5.4
    assert count_macs(model_zoo("resnet50")) / 1e9 == pytest.approx(4.09, abs=0.01)
    assert count_macs(model_zoo("resnet18")) / 1e9 == pytest.approx(1.81, abs=0.01)
    assert count_macs(model_zoo("res2net50")) / 1e9 == pytest.approx(4.26, abs=0.01)
    assert count_macs(model_zoo("resnest50")) / 1e9 == pytest.approx(5.37, abs=0.01)


def test_bad_trunk_arguments_fail_clearly():
    with pytest.raises(ValueError, match="pool pad_mode"):
        models.create_model("resnet18", pool_pad="reflect")
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        models.create_model("resnet18", num_classes=-1)
    with pytest.raises(ValueError, match="drop path rate"):
        models.create_model("resnet18", drop_path_rate=1.0)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "res2net50_v1b", "resnest50"])
@pytest.mark.slow
def test_folding_batchnorm_keeps_the_outputs(name):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        rng = np.random.RandomState(0)
        net = models.create_model(name, num_classes=10)
        for param in net.get_parameters():  # BN statistics and affine terms away from identity
            if param.name.endswith(("moving_mean", ".beta")):
                param.set_data(ms.Tensor(rng.randn(*param.shape).astype(np.float32) * 0.1))
            elif param.name.endswith(("moving_variance", ".gamma")):
                param.set_data(ms.Tensor(rng.uniform(0.5, 1.5, param.shape).astype(np.float32)))
        net.set_train(False)
        x = ms.Tensor(rng.randn(2, 3, 32, 32).astype(np.float32))
        expected = net(x).asnumpy()
        with pytest.raises(ValueError, match="eval mode"):
            fold_batchnorm(models.create_model(name, num_classes=10).set_train(True))
        bn_count = sum(isinstance(cell, nn.BatchNorm2d) for _, cell in net.cells_and_names())
        assert fold_batchnorm(net) == bn_count
        assert not any(isinstance(cell, nn.BatchNorm2d) for _, cell in net.cells_and_names())
        np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    finally:
        ms.set_context(mode=previous)
