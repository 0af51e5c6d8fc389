"""Repeated augmentation: every rank's share of an epoch equals timm's RepeatAugSampler's for the
same image order (timm runs in the torch environment), the epoch length the trainer plans with, and
each copy of an image gets its own augmentation."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from resgarden.data.datasets import repeated_shard, samples_per_rank, training_order
from tests.test_timm_parity import torch_python

CASES = [(1000, 1, 3), (1000, 2, 3), (1000, 8, 3), (100, 8, 3), (300, 3, 2)]  # images, ranks, repeats

TIMM = """
import json, sys
from timm.data.distributed_sampler import RepeatAugSampler
answers = []
for count, size, repeats in json.loads(sys.stdin.read()):
    answers.append([list(RepeatAugSampler(list(range(count)), num_replicas=size, rank=rank, shuffle=False,
                                          num_repeats=repeats)) for rank in range(size)])
print(json.dumps(answers))
"""


def test_each_image_is_repeated_on_consecutive_ranks():
    shards = [repeated_shard(np.arange(1000), rank, 8, 3) for rank in range(8)]
    assert {len(s) for s in shards} == {samples_per_rank(1000, 8, 3)} == {1000 // 256 * 256 // 8}
    dealt = np.stack(shards, axis=1).reshape(-1)  # position p of the dealt sequence went to rank p % 8
    triples = dealt[:len(dealt) // 3 * 3].reshape(-1, 3)
    assert (triples == triples[:, :1]).all()  # an image's 3 copies: consecutive positions, so 3 different ranks
    one = training_order(1000, seed=0, epoch=2, rank=0, size=1, repeats=3)
    assert len(one) == 768 and (one[0::3] == one[1::3]).all() and (one[0::3] == one[2::3]).all()
    assert samples_per_rank(1000, 8) == 125  # off: the plain shard


def test_the_copies_of_an_image_are_augmented_differently(tmp_path):
    from resgarden.base.specs import LoaderSpec
    from resgarden.data.datasets import load_imagenet_split, make_loader
    from tests.helpers import write_imagenet_layout

    write_imagenet_layout(str(tmp_path), per_class=2, size=40, splits=("train",))
    split = load_imagenet_split(str(tmp_path), "train")
    spec = LoaderSpec(batch_size=3, workers=1, aug_repeats=3)
    _, source = make_loader(split, spec, training=True)
    images, labels = next(iter(source))  # one image, three times
    assert len(set(labels.tolist())) == 1
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


@pytest.mark.slow
def test_matches_timms_sampler():
    python = torch_python()
    if python is None:
        pytest.skip("no torch + timm (.venv-torch)")
    theirs = json.loads(subprocess.run([python, "-c", TIMM], input=json.dumps(CASES), capture_output=True, text=True,
                                       check=True, timeout=120).stdout)
    for (count, size, repeats), ranks in zip(CASES, theirs):
        for rank, want in enumerate(ranks):
            assert repeated_shard(np.arange(count), rank, size, repeats).tolist() == want, (count, size, repeats, rank)
