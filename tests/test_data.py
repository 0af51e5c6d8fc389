"""Data: ImageNet folders and list files, CIFAR-10 binary (+ verified download), digits, corrupt images."""
from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import socket
import tarfile
import threading

import numpy as np
import pytest

from config import parse_config, train_job
from resgarden.base.download import DownloadError
from resgarden.data import datasets as data
from resgarden.data.datasets import (
    DataError,
    load_cifar10_split,
    load_imagenet_split,
    load_splits,
    make_loader,
    read_list_file,
    scan_class_folders,
)
from tests.helpers import write_cifar10_binary, write_imagenet_layout


def test_class_folders_sorted_and_labelled(tmp_path):
    classes = write_imagenet_layout(str(tmp_path), per_class=3)
    split = scan_class_folders(str(tmp_path / "train"))
    assert split.classes == sorted(classes) and len(split) == 12
    assert [os.path.basename(os.path.dirname(p)) for p in split.paths] == [classes[i] for i in split.labels]


def test_list_files_define_samples_and_labels(tmp_path):
    write_imagenet_layout(str(tmp_path), per_class=2)
    (tmp_path / "train_list.txt").write_text(
        "train/n01443537/n01443537_0.JPEG 0\ntrain/n01440764/n01440764_1.JPEG 1\n"
        "train/n01443537/n01443537_1.JPEG 0\n")
    split = load_imagenet_split(str(tmp_path), "train")  # list file wins over the folder
    assert split.classes == ["n01443537", "n01440764"] and list(split.labels) == [0, 1, 0]
    assert split.paths[1] == os.path.join(str(tmp_path), "train/n01440764/n01440764_1.JPEG")
    (tmp_path / "bad_list.txt").write_text("train/a.JPEG zero\n")
    with pytest.raises(DataError, match="bad_list.txt:1: expected '<relative path> <label>'"):
        read_list_file(str(tmp_path), str(tmp_path / "bad_list.txt"))


def test_data_path_may_be_the_split_folder(tmp_path):
    write_imagenet_layout(str(tmp_path), per_class=2)
    train = load_imagenet_split(str(tmp_path / "train"), "train")
    val = load_imagenet_split(str(tmp_path / "train"), "val")  # the sibling val/
    assert len(train) == len(val) == 8
    with pytest.raises(DataError, match="no 'test' split"):
        load_imagenet_split(str(tmp_path), "test")
    # evaluation also takes any folder of class sub-folders as the split
    assert len(load_imagenet_split(str(tmp_path / "val"), "test", plain_folder_ok=True)) == 8
    with pytest.raises(DataError, match="data directory not found"):
        load_imagenet_split(str(tmp_path / "nope"), "train")


def test_cifar10_binary_reads_back_exactly(tmp_path):
    images, labels = write_cifar10_binary(str(tmp_path), per_file=7)
    test = load_cifar10_split(str(tmp_path), train=False)
    np.testing.assert_array_equal(test.images, images)
    np.testing.assert_array_equal(test.labels, labels)
    assert len(load_cifar10_split(str(tmp_path), train=True)) == 35 and test.classes[0] == "airplane"
    with open(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", "ab") as handle:
        handle.write(b"\0" * 10)
    with pytest.raises(DataError, match="truncated"):
        load_cifar10_split(str(tmp_path), train=False)


def test_cifar10_missing_without_download_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="--dataset_download.*cifar-10-binary.tar.gz"):
        load_cifar10_split(str(tmp_path / "c"), train=True)


@pytest.fixture
def cifar_server(tmp_path, monkeypatch):
    """A loopback server with a CIFAR-10 binary archive; patches the URL and MD5 to it."""
    source = tmp_path / "src"
    write_cifar10_binary(str(source), per_file=5)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(str(source / "cifar-10-batches-bin"), arcname="cifar-10-batches-bin")
    www = tmp_path / "www"
    www.mkdir()
    (www / "cifar-10-binary.tar.gz").write_bytes(buffer.getvalue())
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(www), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "CIFAR10_URL", f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-binary.tar.gz")
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(buffer.getvalue()).hexdigest())
    yield
    httpd.shutdown()


def test_cifar10_download_good_checksum(tmp_path, cifar_server):
    split = load_cifar10_split(str(tmp_path / "cifar"), train=True, download=True)
    assert len(split) == 25
    assert sorted(os.listdir(tmp_path / "cifar")) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]


def test_cifar10_download_bad_checksum_leaves_nothing(tmp_path, cifar_server, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DownloadError, match="md5 of .* expected 0000"):
        load_cifar10_split(str(tmp_path / "cifar"), train=True, download=True)
    assert os.listdir(tmp_path / "cifar") == []


def test_cifar10_download_offline_names_url_and_folder(tmp_path, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/cifar-10-binary.tar.gz"
    monkeypatch.setattr(data, "CIFAR10_URL", url)
    with pytest.raises(DownloadError) as err:
        load_cifar10_split(str(tmp_path / "cifar"), train=True, download=True)
    assert url in str(err.value) and str(tmp_path / "cifar" / "cifar-10-binary.tar.gz") in str(err.value)
    assert os.listdir(tmp_path / "cifar") == []


def test_digits_written_once_in_imagenet_layout(tmp_path):
    root = data.ensure_digits(str(tmp_path / "digits"))
    train, val = scan_class_folders(os.path.join(root, "train")), scan_class_folders(os.path.join(root, "val"))
    assert train.classes == [str(d) for d in range(10)] and len(train) + len(val) == 1797
    assert 0.18 < len(val) / 1797 < 0.22
    mtime = os.path.getmtime(train.paths[0])
    data.ensure_digits(root)
    assert os.path.getmtime(train.paths[0]) == mtime


def test_loader_batches_and_corrupt_image_is_skipped(tmp_path, caplog):
    write_imagenet_layout(str(tmp_path), per_class=3, splits=("train",))
    bad = tmp_path / "train" / "n01440764" / "n01440764_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    cfg = parse_config(["--data_dir", str(tmp_path), "--image_size=24", "--batch_size=4", "--num_parallel_workers=1"])
    split = load_imagenet_split(str(tmp_path), "train")
    with caplog.at_level(logging.WARNING, logger="resgarden"):
        loader, source = make_loader(split, train_job(cfg).loader, training=False)
        batches = list(loader.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert [b[0].shape for b in batches] == [(4, 3, 24, 24)] * 3
    assert batches[0][0].dtype == np.float32 and abs(float(batches[0][0].mean())) < 3
    assert source.bad_files == {str(bad)}
    assert f"skipping unreadable image {bad}" in caplog.text


def test_auto_dataset_and_class_mismatch(tmp_path):
    write_imagenet_layout(str(tmp_path / "a"), per_class=1)
    train, val = load_splits(train_job(parse_config(["--data_dir", str(tmp_path / "a")])).data)
    assert train.classes == val.classes
    write_imagenet_layout(str(tmp_path / "b"), per_class=1, splits=("train",))
    write_imagenet_layout(str(tmp_path / "b"), per_class=1, splits=("val",), classes=("x", "y"))
    with pytest.raises(DataError, match="classes differ"):
        load_splits(train_job(parse_config(["--data_dir", str(tmp_path / "b")])).data)


@pytest.mark.parametrize("policy", ["randaug-m9-mstd0.5-inc1", "autoaug", "trivialaugwide"])
def test_training_augmentations_run(tmp_path, policy):
    write_imagenet_layout(str(tmp_path), per_class=2, splits=("train",))
    cfg = parse_config(["--image_size=24", "--batch_size=4", "--num_parallel_workers=1", f"--auto_augment={policy}",
                        "--re_prob=0.5"])
    loader, _ = make_loader(load_imagenet_split(str(tmp_path), "train"), train_job(cfg).loader, training=True)
    images, labels = next(loader.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert images.shape == (4, 3, 24, 24) and images.dtype == np.float32 and labels.shape == (4,)


def test_unknown_auto_augment_policy(tmp_path):
    write_imagenet_layout(str(tmp_path), per_class=1, splits=("train",))
    cfg = parse_config(["--auto_augment=augmix-m3-w3"])  # mindcv's AugMix mixes PIL and numpy: refused
    with pytest.raises(DataError, match="unknown auto_augment policy 'augmix-m3-w3'"):
        make_loader(load_imagenet_split(str(tmp_path), "train"), train_job(cfg).loader, training=True)


def test_mixup_gives_smoothed_soft_targets_until_the_off_epoch(tmp_path):
    write_imagenet_layout(str(tmp_path), per_class=2, splits=("train",))
    split = load_imagenet_split(str(tmp_path), "train")
    cfg = parse_config(["--image_size=16", "--batch_size=4", "--num_parallel_workers=1", "--mixup=0.8",
                        "--cutmix=1.0", "--label_smoothing=0.1", "--mixup_off_epoch=1", "--color_jitter=0.4"])
    loader, _ = make_loader(split, train_job(cfg).loader, training=True, epoch=0)
    _, targets = next(loader.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert targets.shape == (4, 4) and np.allclose(targets.sum(axis=1), 1.0)
    assert not np.allclose(np.sort(targets, axis=1)[:, -1], 0.925)  # some rows mix two classes
    loader, _ = make_loader(split, train_job(cfg).loader, training=True, epoch=1)  # mixing off: one-hot, smoothed
    _, targets = next(loader.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert np.allclose(np.sort(targets, axis=1)[:, -1], 1 - 0.1 + 0.1 / 4)
