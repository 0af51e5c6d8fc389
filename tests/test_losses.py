"""The binary cross-entropy of the ResNet-strikes-back recipes against timm's own
``BinaryCrossEntropy`` (run in the torch environment, as tests/test_timm_parity.py does)."""
from __future__ import annotations

import json
import subprocess

import mindspore as ms
import numpy as np
import pytest

from resgarden.training.losses import BinaryCrossEntropy
from tests.test_timm_parity import torch_python

RNG = np.random.RandomState(0)
LOGITS = (RNG.randn(6, 10) * 3).astype(np.float32)
INDICES = RNG.randint(0, 10, 6).astype(np.int32)
SOFT = RNG.dirichlet(np.full(10, 0.3), 6).astype(np.float32)  # like mixed targets: a few large entries
CASES = [  # targets, smoothing, threshold
    ("indices", 0.0, None), ("indices", 0.1, None), ("indices", 0.1, 0.2), ("soft", 0.0, None), ("soft", 0.0, 0.2),
]

TIMM = """
import json, sys, torch
from timm.loss import BinaryCrossEntropy
case = json.loads(sys.stdin.read())
logits = torch.tensor(case["logits"])
target = torch.tensor(case["target"]) if case["soft"] else torch.tensor(case["target"], dtype=torch.long)
loss = BinaryCrossEntropy(smoothing=case["smoothing"], target_threshold=case["threshold"])(logits, target)
print(json.dumps(float(loss)))
"""


def _ours(targets: str, smoothing: float, threshold: float | None) -> float:
    soft = targets == "soft"
    loss = BinaryCrossEntropy(smoothing, threshold, soft_targets=soft)
    return float(loss(ms.Tensor(LOGITS), ms.Tensor(SOFT if soft else INDICES)).asnumpy())


@pytest.mark.parametrize("targets, smoothing, threshold", CASES)
def test_matches_a_hand_computation(targets, smoothing, threshold):
    if targets == "soft":
        target = SOFT.astype(np.float64)
    else:
        target = np.full((6, 10), smoothing / 10)
        target[np.arange(6), INDICES] = 1 - smoothing + smoothing / 10
    if threshold is not None:
        target = (target > threshold).astype(np.float64)
    x = LOGITS.astype(np.float64)
    want = np.mean(np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x))))
    assert _ours(targets, smoothing, threshold) == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_matches_timm():
    python = torch_python()
    if python is None:
        pytest.skip("no torch + timm (.venv-torch)")
    for targets, smoothing, threshold in CASES:
        soft = targets == "soft"
        case = dict(logits=LOGITS.tolist(), target=(SOFT if soft else INDICES).tolist(), soft=soft,
                    smoothing=smoothing, threshold=threshold)
        theirs = json.loads(subprocess.run([python, "-c", TIMM], input=json.dumps(case), capture_output=True,
                                           text=True, check=True, timeout=120).stdout)
        assert _ours(targets, smoothing, threshold) == pytest.approx(theirs, rel=1e-5), (targets, smoothing, threshold)
