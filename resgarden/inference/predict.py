"""Classify image files, folders or list files with released or trained weights: the top-k class
names and probabilities of each image, printed or written to CSV / JSON."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import sys
from typing import Any

import mindspore as ms
import numpy as np
from tqdm import tqdm

import models
from resgarden.base.atomic import write_text
from resgarden.base.errors import ConfigError, DataError
from resgarden.base.specs import InferenceJob
from resgarden.data.datasets import IMAGE_EXTENSIONS, image_transform
from resgarden.data.images import UnreadableImage, read_rgb
from resgarden.inference.model_loading import build_inference_model, eval_transform, model_name, read_weights
from resgarden.runtime.context import set_context

logger = logging.getLogger("resgarden")
CLASS_NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(models.__file__)), "imagenet_classes.tsv")


def imagenet_lemmas() -> dict[str, str]:
    """WordNet id -> readable name for the 1,000 ImageNet-1k classes."""
    with open(CLASS_NAMES_FILE, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t", 1) for line in handle if not line.startswith("#")]
    return dict(rows)


def image_files(inputs: tuple[str, ...]) -> list[str]:
    """The files ``--images`` names: image files as given, every image file under a folder (sorted,
    recursive), and the paths listed in a ``.txt`` file (one per line, relative to the list)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(item) for name in names
                           if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {item}")
            files += found
        elif item.endswith(".txt") and os.path.isfile(item):
            with open(item, encoding="utf-8") as handle:
                base = os.path.dirname(os.path.abspath(item))
                files += [os.path.join(base, line.split()[0]) for line in handle if line.strip()]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise DataError(f"no such image, folder or list file: {item}")
    return files


def predict(job: InferenceJob) -> list[dict[str, Any]]:
    """Top-k (name, probability) for each image of ``job.images`` (files, folders, list files), in
    batches of ``--batch_size``; unreadable files are logged and left out."""
    if not job.images:
        raise ConfigError("give the images to classify: --images a.jpg [b.jpg ...], a folder or a list file")
    files = image_files(job.images)
    lemmas = imagenet_lemmas()
    set_context(job.context)
    checkpoint = read_weights(job)
    classes = (checkpoint.meta.get("classes") if checkpoint else None) or list(lemmas)
    names = [lemmas.get(c, c) for c in classes]
    model = build_inference_model(job, model_name(job, checkpoint), checkpoint, len(classes))
    loader = dataclasses.replace(job.loader, eval_transform=eval_transform(job, model))
    transform = image_transform(loader, training=False)
    top = min(job.top_k, len(names))
    results, unreadable = [], 0
    batch_size = loader.batch_size
    with tqdm(total=len(files), unit="img", disable=len(files) <= batch_size or not sys.stderr.isatty()) as bar:
        for start in range(0, len(files), batch_size):
            arrays, paths = [], []
            for path in files[start:start + batch_size]:
                try:
                    arrays.append(transform(read_rgb(path), rng=None))
                    paths.append(path)
                except UnreadableImage as exc:
                    unreadable += 1
                    logger.warning("cannot read image %s (%s): left out", path, exc)
            bar.update(len(files[start:start + batch_size]))
            if not arrays:
                continue
            logits = model(ms.Tensor(np.stack(arrays).astype(np.float32))).asnumpy().astype(np.float64)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            for path, row in zip(paths, probs):
                best = np.argsort(-row)[:top]
                results.append(dict(image=path, top=[(names[i], float(row[i])) for i in best]))
    if unreadable:
        logger.warning("%d of %d images unreadable, left out", unreadable, len(files))
    if not results:
        raise DataError(f"none of the {len(files)} images could be read")
    if job.predictions:
        write_predictions(job.predictions, results)
    return results


def write_predictions(path: str, results: list[dict[str, Any]]) -> None:
    """Each image's top-k classes and probabilities: JSON (a list of objects) for ``.json``, else
    CSV with one row per image (``image, class_1, prob_1, ..., class_k, prob_k``)."""
    if path.endswith(".json"):
        write_text(path, json.dumps([dict(image=r["image"], top=[dict(name=n, prob=p) for n, p in r["top"]])
                                     for r in results], indent=1))
        return
    table = io.StringIO()
    writer = csv.writer(table)
    k = max(len(r["top"]) for r in results)
    writer.writerow(["image"] + [f"{column}_{i}" for i in range(1, k + 1) for column in ("class", "prob")])
    for r in results:
        writer.writerow([r["image"]] + [value for name, prob in r["top"] for value in (name, f"{prob:.6f}")])
    write_text(path, table.getvalue())


def format_predictions(results: list[dict[str, Any]], written_to: str | None = None) -> str:
    """Each image path, then one line per class: probability and name; or, when they went to a
    file, one line saying so."""
    if written_to:
        return f"wrote the top-{len(results[0]['top'])} classes of {len(results)} images to {written_to}"
    lines = []
    for result in results:
        lines.append(result["image"])
        lines += [f"  {prob * 100:6.2f}%  {name}" for name, prob in result["top"]]
    return "\n".join(lines)
