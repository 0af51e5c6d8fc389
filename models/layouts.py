"""Checkpoint layouts of other code bases, as declared name tables and a few reshaping rules.

A layout is recognised by names only it has; its table renames its parameters to ours. Where the
source network computes differently from our default build (``"same"`` convolution padding,
another BatchNorm epsilon), the layout says how to build our model so that logits agree, and the
epsilon is folded into the moving variance (exact in inference: ``var + eps`` is unchanged).

- mindcv: our names but ``downsample`` / ``fc`` in ResNeSt and Res2Net-v1b's shortcut indices.
- mindspore/models ``official/cv/ResNet``: ``end_point``, ``down_sample_layer``, ResNet-18/34's
  ``bn1d`` / ``bn2d``; ResNet-18/34 pad explicitly (our ``"pad"`` pool), ResNet-50+ use ``"same"``
  convolutions and max pool; BatchNorm epsilon 1e-4 except ResNet-18/34's stem and shortcuts.
- mindspore/models ``research/cv/ResNeXt``: ``backbone.*`` + ``head.fc``, stem ``conv`` / ``bn``,
  ``down_sample.conv`` / ``.bn``; on Ascend the grouped 3x3 convolution is a ``GroupConv`` of one
  convolution per group (``conv2.convs.K``), joined here into one grouped weight.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

OUR_BN_EPS = 1e-5  # MindSpore's BatchNorm2d default, which every model here uses


def _array(value: object) -> np.ndarray:
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def _stage_blocks(names: set[str], block_key: str) -> tuple[int, ...]:
    """Blocks per stage, counted from ``layer{s}.{i}.<block_key>`` names."""
    counts = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^layer{stage}\.(\d+)\.{re.escape(block_key)}")
        counts.append(len({m.group(1) for n in names if (m := pattern.match(n))}))
    return tuple(counts)


@dataclass(frozen=True)
class Layout:
    """One foreign checkpoint layout."""

    name: str
    family: str  # mindcv, official_resnet, resnext
    markers: tuple[str, ...]  # a checkpoint holding any of these names is in this layout
    renames: tuple[tuple[str, str], ...]  # (regex, replacement), first match wins
    unsupported: tuple[tuple[str, str], ...] = ()  # (regex, what it is): recognised but not mapped
    source_bn_eps: tuple[tuple[str, float], ...] = ()  # (regex on our BN name, the source's epsilon)
    build: Mapping[str, str] = field(default_factory=dict)  # create_model kwargs matching the source
    only_unknown_names: bool = False  # rename only names the model does not have (mindcv)

    def matches(self, names: set[str]) -> bool:
        return any(marker in names for marker in self.markers)

    def unsupported_part(self, names: set[str]) -> str | None:
        """What of the checkpoint this project's models do not have, if anything."""
        return next((what for pattern, what in self.unsupported if any(re.search(pattern, n) for n in names)), None)

    def rename(self, name: str) -> str:
        for pattern, replacement in self.renames:
            if re.search(pattern, name):
                return re.sub(pattern, replacement, name)
        return name


MINDCV = Layout("mindcv", "mindcv", markers=(), only_unknown_names=True, renames=(
    (r"^(layer\d+\.\d+\.)downsample\.", r"\1down_sample."),
    (r"^fc\.", "classifier."),
    # Res2Net-v1b's stride-1 avg-down shortcut has no pool entry: its conv/BN sit one index lower
    (r"^(layer1\.0\.down_sample\.)0\.", r"\g<1>1."),
    (r"^(layer1\.0\.down_sample\.)1\.", r"\g<1>2."),
))

_OFFICIAL_RESNET = dict(
    family="official_resnet", markers=("end_point.weight",),
    renames=((r"^end_point\.", "classifier."), (r"\.down_sample_layer\.", ".down_sample."),
             (r"\.bn1d\.", ".bn1."), (r"\.bn2d\.", ".bn2.")),
    unsupported=((r"^conv1_0\.|\.se_dense_0\.|\.e2\.", "SE-ResNet (use_se): squeeze-excitation blocks and a "
                  "3-conv stem, which no model here has"),))
MINDSPORE_MODELS_RESNET18 = Layout(  # basic blocks (ResNet-18/34): explicit padding like ours
    "mindspore/models ResNet-18/34", **_OFFICIAL_RESNET, build={"pool_pad": "pad"},
    source_bn_eps=((r"^layer\d+\.\d+\.bn[12]\.", 1e-4),))
MINDSPORE_MODELS_RESNET50 = Layout(  # bottlenecks (ResNet-50/101/152): 'same' convolutions and pool
    "mindspore/models ResNet-50/101/152", **_OFFICIAL_RESNET, build={"pool_pad": "same", "conv_pad": "same"},
    source_bn_eps=((r".", 1e-4),))

MINDSPORE_MODELS_RESNEXT = Layout(
    "mindspore/models ResNeXt", "resnext", markers=("head.fc.weight",),
    renames=((r"^backbone\.conv\.", "conv1."), (r"^backbone\.bn\.", "bn1."),
             (r"^backbone\.(layer\d+\.\d+)\.down_sample\.conv\.", r"\1.down_sample.0."),
             (r"^backbone\.(layer\d+\.\d+)\.down_sample\.bn\.", r"\1.down_sample.1."),
             (r"^backbone\.", ""), (r"^head\.fc\.", "classifier.")),
    unsupported=((r"\.se\.fc1\.", "SE-ResNeXt (use_se): squeeze-excitation blocks, which no model here has"),),
    build={"pool_pad": "same"})

OFFICIAL_RESNET_DEPTHS = {(True, (2, 2, 2, 2)): "resnet18", (True, (3, 4, 6, 3)): "resnet34",
                          (False, (3, 4, 6, 3)): "resnet50", (False, (3, 4, 23, 3)): "resnet101",
                          (False, (3, 8, 36, 3)): "resnet152"}
RESNEXT_DEPTHS = {((3, 4, 6, 3), 32): "resnext50_32x4d", ((3, 4, 23, 3), 32): "resnext101_32x4d",
                  ((3, 4, 23, 3), 64): "resnext101_64x4d"}


def detect_layout(state: Mapping[str, object]) -> Layout:
    """The layout of a checkpoint's weights (training state already removed); ours / mindcv's
    when no other layout's markers are there."""
    names = set(state)
    if MINDSPORE_MODELS_RESNET50.matches(names):
        return MINDSPORE_MODELS_RESNET18 if any(".bn1d." in n for n in names) else MINDSPORE_MODELS_RESNET50
    if MINDSPORE_MODELS_RESNEXT.matches(names):
        return MINDSPORE_MODELS_RESNEXT
    return MINDCV


def source_model(layout: Layout, state: Mapping[str, object]) -> str | None:
    """Our model name for a mindspore/models checkpoint, from its blocks and group count (its
    resnext101 is 32x4d on Ascend and 64x4d on GPU); None for ours / mindcv's (they say so in
    their metadata) and for depths we have no model of."""
    names = set(state)
    if layout.family == "official_resnet":
        basic = layout is MINDSPORE_MODELS_RESNET18
        return OFFICIAL_RESNET_DEPTHS.get((basic, _stage_blocks(names, "conv1.weight")))
    if layout.family == "resnext":
        stripped = {n[len("backbone."):] for n in names if n.startswith("backbone.")}
        blocks = _stage_blocks(stripped, "conv1.weight")
        per_group = [n for n in stripped if n.startswith("layer1.0.conv2.convs.")]
        if per_group:
            groups = len({n.split(".")[4] for n in per_group})
        else:
            weight = state.get("backbone.layer1.0.conv2.weight")
            groups = int(weight.shape[0] // weight.shape[1]) if weight is not None else 0
        return RESNEXT_DEPTHS.get((blocks, groups))
    return None


def _join_group_convs(state: dict[str, object]) -> dict[str, object]:
    """``<conv>.convs.K.weight`` (one convolution per group) -> ``<conv>.weight``, the grouped
    weight: group K's output channels are the K-th block of rows."""
    groups: dict[str, dict[int, object]] = {}
    out: dict[str, object] = {}
    for name, value in state.items():
        match = re.match(r"^(.*)\.convs\.(\d+)\.weight$", name)
        if match:
            groups.setdefault(match.group(1), {})[int(match.group(2))] = value
        else:
            out[name] = value
    for prefix, parts in groups.items():
        out[f"{prefix}.weight"] = np.concatenate([_array(parts[k]) for k in sorted(parts)], axis=0)
    return out


def to_our_names(layout: Layout, state: Mapping[str, object],
                 model_names: set[str]) -> tuple[dict[str, object], dict[str, str], list[str]]:
    """``state`` in our names (and shapes), the renames made, and notes on the reshaping done.
    BatchNorm moving variances of a source with another epsilon are shifted so that ``var + eps``
    stays the source's."""
    notes = []
    if layout.family == "resnext":
        parts = [n for n in state if re.match(r"^.*\.convs\.\d+\.weight$", n)]
        state = _join_group_convs(dict(state))
        if parts:
            convs = len({n.rsplit(".convs.", 1)[0] for n in parts})
            notes.append(f"{len(parts)} per-group convolution weights (GroupConv) joined into {convs} grouped ones")
    out: dict[str, object] = {}
    renamed: dict[str, str] = {}
    for name, value in state.items():
        new = name if layout.only_unknown_names and name in model_names else layout.rename(name)
        if new != name:
            renamed[name] = new
        out[new] = value
    shifted, source_eps = 0, set()
    for name in [n for n in out if n.endswith(".moving_variance")]:
        eps = next((e for pattern, e in layout.source_bn_eps if re.search(pattern, name)), OUR_BN_EPS)
        if eps != OUR_BN_EPS:
            out[name] = (_array(out[name]) + np.float32(eps - OUR_BN_EPS)).astype(np.float32)
            shifted, source_eps = shifted + 1, source_eps | {eps}
    if shifted:
        notes.append(f"the source's BatchNorm epsilon {', '.join(f'{e:g}' for e in sorted(source_eps))} folded into "
                     f"{shifted} moving variances (ours: {OUR_BN_EPS:g})")
    return out, renamed, notes
