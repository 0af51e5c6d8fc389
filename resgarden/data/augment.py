"""The per-image part of the input pipelines, run by the loader's threads: decode, crop and resize,
flip, colour augmentation, normalisation to CHW float32, random erasing. The heavy steps release
the interpreter lock (libjpeg-turbo, OpenCV, NumPy; Pillow inside the auto-augment policies), so N
threads use N cores. Each image draws from its own random stream, fixed by (seed, epoch, rank,
position): the crop, flip, jitter and erasing do not depend on the number of threads, and resumes
replay them (mindcv's auto-augment policies draw from Python's global ``random``: reproducible with
one thread).

Training: RandomResizedCrop as torchvision / MindSpore sample it (10 tries of area and log-ratio,
else the centred crop of the clamped ratio); a JPEG is decoded at 1/2, 1/4 or 1/8 of its size in
the DCT domain where the crop keeps at least the output size at that scale. Colour jitter follows
torchvision's ColorJitter (brightness, contrast, saturation in random order), as MindSpore's
RandomColorAdjust does; random erasing (value 0) draws its box as MindSpore's RandomErasing, which
mindcv's recipes use (tests/test_augment_parity.py compares the distributions). Evaluation: the
shorter side resized to ``resize`` and a centred crop in MindSpore's arithmetic (long side and
offsets floored), so scores match MindSpore's Resize + CenterCrop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from resgarden.base.specs import Augmentation, EvalTransform
from resgarden.data.images import decode_rgb, jpeg_size

cv2.setNumThreads(1)  # one image per thread; the loader runs several threads
INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image (or decoded HWC uint8 array) -> (3, size, size) float32, for one split: the
    evaluation transform's size, resize, interpolation and normalisation, and in training the
    augmentation's crop, flip, jitter and erasing (or ``policy``, its auto-augment policy)."""
    training: bool
    eval: EvalTransform = EvalTransform()
    augmentation: Augmentation = Augmentation()
    policy: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False)  # auto-augment

    @property
    def size(self) -> int:
        """The output's side: the training crop (``augmentation.size``, else the evaluation's), or
        the evaluation's centre crop."""
        return (self.training and self.augmentation.size) or self.eval.image_size

    def __call__(self, image: bytes | np.ndarray, rng: np.random.Generator | None,
                 out: np.ndarray | None = None) -> np.ndarray:
        """The model's input image, written into ``out`` (a (3, size, size) float32 view) if given."""
        if self.training:
            pixels = self._crop(image, rng)
            if self.policy is not None:
                pixels = np.asarray(self.policy(pixels))  # mindcv's policies take arrays (faster than PIL images)
            elif self.augmentation.color_jitter:
                pixels = jitter(pixels, rng, self.augmentation.color_jitter)
        else:
            pixels = self._centre(image)
        out = normalize(pixels, self.eval.mean, self.eval.std, out)
        if self.training and self.augmentation.re_prob > 0 and rng.random() < self.augmentation.re_prob:
            erase(out, rng)
        return out

    def _crop(self, image: bytes | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = image.shape[:2] if isinstance(image, np.ndarray) else jpeg_size(image)
        if size is None:  # not a JPEG libjpeg-turbo converts: decode in full first
            image = decode_rgb(image)
            size = image.shape[:2]
        height, width = size
        top, left, crop_h, crop_w = crop_box(rng, height, width, self.augmentation.scale, self.augmentation.ratio)
        if not isinstance(image, np.ndarray):
            image = decode_rgb(image, fast=True, reduce=dct_factor(min(crop_h, crop_w), self.size))
        scale_y, scale_x = image.shape[0] / height, image.shape[1] / width
        y, x = int(top * scale_y), int(left * scale_x)
        crop = image[y:y + max(1, round(crop_h * scale_y)), x:x + max(1, round(crop_w * scale_x))]
        pixels = cv2.resize(crop, (self.size, self.size), interpolation=INTERPOLATION[self.eval.interpolation])
        if self.augmentation.hflip > 0 and rng.random() < self.augmentation.hflip:
            pixels = cv2.flip(pixels, 1)
        return pixels

    def _centre(self, image: bytes | np.ndarray) -> np.ndarray:
        pixels = image if isinstance(image, np.ndarray) else decode_rgb(image)
        height, width = pixels.shape[:2]
        if height <= width:
            new_h, new_w = self.eval.resize, int(self.eval.resize * width / height)
        else:
            new_h, new_w = int(self.eval.resize * height / width), self.eval.resize
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=INTERPOLATION[self.eval.interpolation])
        if min(new_h, new_w) < self.size:  # a crop larger than the image: zero padding, as MindSpore's
            pad_h, pad_w = max(0, self.size - new_h), max(0, self.size - new_w)
            pixels = cv2.copyMakeBorder(pixels, pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2,
                                        cv2.BORDER_CONSTANT, value=0)
            new_h, new_w = pixels.shape[:2]
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return pixels[top:top + self.size, left:left + self.size]


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
              out: np.ndarray | None = None) -> np.ndarray:
    """HWC uint8 -> CHW float32 ``(x / 255 - mean) / std``, into ``out`` when given."""
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    if out is None:
        out = np.empty(chw.shape, np.float32)
    scale = np.array([1.0 / (255.0 * s) for s in std], np.float32)[:, None, None]
    np.multiply(chw, scale, out=out)
    out -= np.array([m / s for m, s in zip(mean, std)], np.float32)[:, None, None]
    return out


def crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1)), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def dct_factor(crop_side: int, size: int) -> int:
    """1, 2, 4 or 8: the largest power-of-two reduction leaving ``crop_side`` >= ``size``."""
    factor = 1
    while factor < 8 and crop_side // (factor * 2) >= size:
        factor *= 2
    return factor


def jitter(pixels: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation, each by a factor in [1 - strength, 1 + strength], in
    random order (Pillow's ImageEnhance arithmetic: blends with black, the mean grey, the grey image)."""
    for op in rng.permutation(3):
        factor = float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
        if op == 0:
            pixels = cv2.addWeighted(pixels, factor, pixels, 0.0, 0.0)
        elif op == 1:
            mean = float(int(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).mean() + 0.5))
            pixels = cv2.addWeighted(pixels, factor, pixels, 0.0, mean * (1.0 - factor))
        else:
            grey = cv2.cvtColor(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            pixels = cv2.addWeighted(pixels, factor, grey, 1.0 - factor, 0.0)
    return pixels


def erase(chw: np.ndarray, rng: np.random.Generator) -> None:
    """Zero one random box of ``chw`` in place, drawn as MindSpore's RandomErasing (which mindcv's
    recipes use) draws it: area 2-33 % and width / height uniform in 0.3-3.3 (torchvision's draws the
    log of height / width uniformly instead), up to 10 tries."""
    _, height, width = chw.shape
    for _ in range(10):
        area = height * width * rng.uniform(*ERASE_SCALE)
        aspect = rng.uniform(*ERASE_RATIO)  # width / height
        box_h, box_w = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
        if box_h < height and box_w < width:
            top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
            chw[:, top:top + box_h, left:left + box_w] = 0.0
            return
