"""Our training augmentation against mindcv's own ``create_transforms`` for every recipe, in
distribution: the random crop's area and aspect ratio and the flip rate (on an image whose pixels
hold their own coordinates), colour jitter (brightness, contrast and saturation of a photo), random
erasing (rate, area and aspect of the box), the auto-augment policy and mixup/cutmix (the same mindcv
objects with the same parameters), and the evaluation transform (within grey levels, on photos).

mindcv's operations run in a MindSpore dataset pipeline, as mindcv trains (an operation called
eagerly with a fixed dataset seed draws the same numbers at every call). Each comparison is a
two-sample Kolmogorov-Smirnov test on 2,000 draws a side at a 0.1 % level, or, for rates, a
difference within 4 binomial standard errors; the seeds are fixed, so the outcome is too.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import io
import math
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from config import parse_config, train_job
from resgarden.data import datasets as data
from resgarden.bench.pipeline import write_photo_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.relpath(p, os.path.join(REPO, "configs"))
                 for p in glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))
                 if not p.split(os.sep)[-2] in ("digits", "cifar10"))
DRAWS, SIZE, SOURCE = 2000, 64, 256
LEVEL = 1e-3


@functools.lru_cache(maxsize=None)
def _loader(recipe: str):
    """The recipe's loader spec (frozen; parsed once: the module's lists below ask for it often)."""
    return train_job(parse_config(["-c", os.path.join(REPO, "configs", recipe), f"--image_size={SIZE}"])).loader


def _by_settings(recipes: list[str], settings) -> dict[str, str]:
    """One recipe for each distinct value of ``settings(loader)`` (what a comparison depends on),
    keyed by the names of all the recipes that share it."""
    groups: dict[object, list[str]] = {}
    for recipe in recipes:
        groups.setdefault(settings(_loader(recipe)), []).append(recipe)
    return {" ".join(os.path.basename(r)[:-5] for r in names): names[0] for names in groups.values()}


def _mindcv_ops(loader, training: bool = True) -> list:
    """mindcv's transform list for the recipe's settings, as its train.py asks for it."""
    from mindcv.data import create_transforms

    aug, ev = loader.augmentation, loader.eval_transform
    common = dict(dataset_name="imagenet", is_training=training, interpolation=ev.interpolation,
                  mean=[m * 255 for m in ev.mean], std=[s * 255 for s in ev.std])
    if not training:
        return create_transforms(image_resize=ev.image_size, crop_pct=ev.crop_pct, **common)
    return create_transforms(image_resize=aug.size or ev.image_size, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                             color_jitter=aug.color_jitter or None, auto_augment=aug.auto_augment,
                             re_prob=aug.re_prob, **common)


def _pipeline(ops: list, image: np.ndarray, draws: int = DRAWS) -> list[np.ndarray]:
    import mindspore.dataset as ds

    ds.config.set_seed(0)
    dataset = ds.NumpySlicesDataset({"image": np.repeat(image[None], draws, 0)}, shuffle=False)
    dataset = dataset.map(operations=ops, input_columns="image")
    return [row["image"] for row in dataset.create_dict_iterator(num_epochs=1, output_numpy=True)]


def _png(pixels: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8)


def _ours(loader, image: bytes | np.ndarray, draws: int = DRAWS, **replaced) -> list[np.ndarray]:
    """Our training transform of the recipe (fields of its evaluation transform ``replaced``) applied
    ``draws`` times, each with its own random stream as the pipeline gives it."""
    loader = dataclasses.replace(loader, eval_transform=dataclasses.replace(loader.eval_transform, **replaced))
    transform = data.image_transform(loader, training=True)
    return [transform(image, np.random.default_rng([7, i])) for i in range(draws)]


def _same(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    result = stats.ks_2samp(ours, theirs)
    assert result.pvalue > LEVEL, f"{what}: ours mean {np.mean(ours):.4g}, mindcv's {np.mean(theirs):.4g}, " \
                                  f"KS p={result.pvalue:.2g}"


def _same_rate(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    p = (ours.mean() + theirs.mean()) / 2
    error = math.sqrt(max(p * (1 - p), 1e-12) * 2 / len(ours))
    assert abs(ours.mean() - theirs.mean()) <= 4 * error, f"{what}: ours {ours.mean():.3f}, mindcv's {theirs.mean():.3f}"


def _box(chw: np.ndarray) -> tuple[float, float, bool]:
    """(area fraction, log(width / height), flipped) of the crop an output of the coordinate image shows."""
    x, y = chw[0], chw[1]
    width = abs(x[0, -1] - x[0, 0]) * SIZE / (SIZE - 1)
    height = abs(y[-1, 0] - y[0, 0]) * SIZE / (SIZE - 1)
    return width * height / SOURCE ** 2, math.log(width / height), bool(x[0, 0] > x[0, -1])


COORDINATES = np.stack(np.meshgrid(np.arange(SOURCE), np.arange(SOURCE)) + [np.full((SOURCE, SOURCE), 128)],
                       axis=-1).astype(np.uint8)  # pixel (y, x) holds (x, y, 128)


CROPS = _by_settings(RECIPES, lambda loader: (loader.augmentation.scale, loader.augmentation.ratio,
                                              loader.augmentation.hflip))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(CROPS.values()), ids=list(CROPS))
def test_the_random_crop_and_flip_are_mindcvs(recipe):
    loader = _loader(recipe)
    crop_and_flip = [op for op in _mindcv_ops(loader) if type(op).__name__ in
                     ("RandomCropDecodeResize", "RandomHorizontalFlip")]
    theirs = np.array([_box(np.moveaxis(x.astype(np.float64), -1, 0)) for x in _pipeline(crop_and_flip, _png(COORDINATES))])
    png = _png(COORDINATES).tobytes()
    plain = dict(auto_augment=None, color_jitter=0.0, re_prob=0.0)
    loader = dataclasses.replace(loader, augmentation=dataclasses.replace(loader.augmentation, **plain))
    ours = np.array([_box(x * 255.0) for x in _ours(loader, png, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))])
    _same(ours[:, 0], theirs[:, 0], f"{recipe}: crop area")
    _same(ours[:, 1], theirs[:, 1], f"{recipe}: crop aspect")
    _same_rate(ours[:, 2], theirs[:, 2], f"{recipe}: flip rate")


def _photo() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return cv2.resize(load_sample_image("china.jpg"), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def _colour(hwc: np.ndarray) -> tuple[float, float, float]:
    """Brightness, contrast and saturation of an image: mean, spread and mean (max - min) over RGB."""
    pixels = hwc.astype(np.float64)
    return pixels.mean(), pixels.std(), (pixels.max(-1) - pixels.min(-1)).mean()


JITTERED = _by_settings([r for r in RECIPES if _loader(r).augmentation.color_jitter
                         and not _loader(r).augmentation.auto_augment], lambda loader: loader.augmentation.color_jitter)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(JITTERED.values()), ids=list(JITTERED))
def test_the_colour_jitter_is_mindcvs(recipe):
    from resgarden.data.augment import jitter

    loader = _loader(recipe)
    [adjust] = [op for op in _mindcv_ops(loader) if type(op).__name__ == "RandomColorAdjust"]
    photo = _photo()
    theirs = np.array([_colour(x) for x in _pipeline([adjust], photo)])
    ours = np.array([_colour(jitter(photo.copy(), np.random.default_rng([7, i]), loader.augmentation.color_jitter))
                     for i in range(DRAWS)])
    for i, what in enumerate(("brightness", "contrast", "saturation")):
        _same(ours[:, i], theirs[:, i], f"{recipe}: {what}")


def _erased(chw: np.ndarray) -> tuple[float, float, float]:
    """(erased?, area fraction, log(width / height)) of the zeroed box of an output."""
    zero = np.all(chw == 0.0, axis=0)
    if not zero.any():
        return 0.0, math.nan, math.nan
    rows, cols = np.nonzero(zero)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    return 1.0, height * width / zero.size, math.log(width / height)


ERASED = _by_settings([r for r in RECIPES if _loader(r).augmentation.re_prob > 0],
                      lambda loader: (loader.augmentation, loader.eval_transform.interpolation))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(ERASED.values()), ids=list(ERASED))
def test_random_erasing_is_mindcvs(recipe):
    """Through each side's whole training transform (crop, flip, jitter or policy, normalisation,
    erasing) of a grey image: what is zero in every channel was erased."""
    loader = _loader(recipe)
    grey = np.full((SOURCE, SOURCE, 3), 128, np.uint8)
    theirs = np.array([_erased(x) for x in _pipeline(_mindcv_ops(loader), _png(grey))])
    ours = np.array([_erased(x) for x in _ours(loader, _png(grey).tobytes())])
    _same_rate(ours[:, 0], theirs[:, 0], f"{recipe}: erasing rate")
    kept_ours, kept_theirs = ours[ours[:, 0] == 1], theirs[theirs[:, 0] == 1]
    _same(kept_ours[:, 1], kept_theirs[:, 1], f"{recipe}: erased area")
    _same(kept_ours[:, 2], kept_theirs[:, 2], f"{recipe}: erased aspect")


POLICIES = [r for r in RECIPES if _loader(r).augmentation.auto_augment]


def _policy_description(policy) -> list:
    """What an auto-augment policy draws from: its ops (name, probability, magnitude and spread) and
    how it picks them."""
    ops = getattr(policy, "ops", None)
    if ops is None:  # AutoAugment: sub-policies of ops
        return [[_policy_description(type("P", (), {"ops": sub})()) for sub in policy.policy]]
    return [sorted((op.name, op.prob, op.magnitude, op.magnitude_std, sorted(op.hparams.items()))
                   for op in ops),
            getattr(policy, "num_layers", None), repr(getattr(policy, "choice_weights", None))]


@pytest.mark.parametrize("recipe", POLICIES)
def test_the_auto_augment_policy_is_mindcvs(recipe):
    loader = _loader(recipe)
    [theirs] = [op for op in _mindcv_ops(loader) if hasattr(op, "ops") or hasattr(op, "policy")]
    ours = data.image_transform(loader, training=True).policy
    assert type(ours) is type(theirs)
    assert _policy_description(ours) == _policy_description(theirs)


MIXED = [r for r in RECIPES if _loader(r).mixing.enabled]


@pytest.mark.parametrize("recipe", MIXED)
def test_mixup_and_cutmix_are_mindcvs(recipe):
    """mindcv's Mixup with the recipe's alphas and mindcv's switch probability (0.5) and mixing
    probability (its cutmix_prob, 1.0); mindcv's loader leaves label smoothing to the loss, ours to
    the mixed targets: the same targets (tests/test_recipe_parity.py)."""
    from mindcv.data.mixup import Mixup

    mix = _loader(recipe).mixing
    ours = data.mixing(mix, 1000, 0)
    theirs = Mixup(mixup_alpha=mix.mixup, cutmix_alpha=mix.cutmix, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                   label_smoothing=0.0, num_classes=1000)
    for name in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "mode", "mixup_enabled", "correct_lam"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.label_smoothing == mix.label_smoothing


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    folder = write_photo_folder(str(tmp_path_factory.mktemp("photos")), count=8)
    return sorted(glob.glob(os.path.join(folder, "train", "*", "*.JPEG")))


EVALUATIONS = _by_settings(RECIPES, lambda loader: dataclasses.replace(loader.eval_transform, image_size=0))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(EVALUATIONS.values()), ids=list(EVALUATIONS))
def test_the_evaluation_transform_is_mindcvs(recipe, photo_files):
    """mindcv's Decode, Resize(size / crop_pct), CenterCrop, Normalize against ours, at the
    recipe's interpolation and crop: within 1 grey level anywhere when bilinear (measured: equal),
    2 when bicubic (measured: 1 on an Intel Xeon with AVX-512; OpenCV's bicubic paths differ by
    instruction set), 1/20 of a grey level on average."""
    loader = train_job(parse_config(["-c", os.path.join(REPO, "configs", recipe)])).loader
    ours = data.image_transform(loader, training=False)
    grey_level = 1 / (255 * min(loader.eval_transform.std))
    for path in photo_files:
        encoded = open(path, "rb").read()
        expected = np.frombuffer(encoded, np.uint8)
        for op in _mindcv_ops(loader, training=False):
            expected = op(expected)
        got = ours(encoded, rng=None)
        assert got.shape == expected.shape
        levels = 1 if loader.eval_transform.interpolation == "bilinear" else 2
        assert np.abs(got - expected).max() <= levels * grey_level + 1e-6, recipe
        assert np.abs(got - expected).mean() < 0.05 * grey_level, recipe
