"""The input pipeline: MindSpore-equal evaluation, worker-count-independent training batches, worker
processes and their fallbacks, and bad images that never end a run."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import train as train_entry
from config import parse_config, train_job
from resgarden.bench.pipeline import write_photo_folder
from resgarden.data import batches
from resgarden.data import datasets as data
from resgarden.data.augment import crop_box, dct_factor, erase, jitter
from resgarden.data.datasets import DataError, Split, make_loader, scan_class_folders
from resgarden.data.images import UnreadableImage, decode_rgb
from tests.helpers import start_train, wait_for_output, write_imagenet_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return scan_class_folders(os.path.join(write_photo_folder(str(tmp_path_factory.mktemp("photos")), count=24),
                                           "train"))


def _batches(split: Split, args: list[str], training: bool, epoch: int = 0) -> list[np.ndarray]:
    loader, _ = make_loader(split, train_job(parse_config(["--batch_size=8"] + args)).loader, training=training, epoch=epoch)
    return [images for images, _ in loader.create_tuple_iterator(num_epochs=1, output_numpy=True)]


def test_evaluation_equals_mindspores_decode_resize_crop(photos):
    from mindspore.dataset import vision

    cfg = parse_config(["--image_size=224", "--crop_pct=0.875"])
    ours = data.image_transform(train_job(cfg).loader, training=False)
    theirs = [vision.Decode(), vision.Resize(256), vision.CenterCrop(224),
              vision.Normalize([m * 255 for m in cfg.mean], [s * 255 for s in cfg.std]), vision.HWC2CHW()]
    for path in photos.paths[:8]:
        with open(path, "rb") as handle:
            encoded = handle.read()
        expected = np.frombuffer(encoded, np.uint8)
        for op in theirs:
            expected = op(expected)
        got = ours(encoded, rng=None)
        assert got.shape == expected.shape == (3, 224, 224)
        grey_level = 1 / (255 * min(cfg.std))
        assert np.abs(got - expected).max() <= 2 * grey_level + 1e-6  # rounding of two resamplings
        assert np.abs(got - expected).mean() < 0.05 * grey_level


@pytest.mark.parametrize("augment", [[], ["--color_jitter=0.4", "--re_prob=0.5"]], ids=["standard", "jitter-erasing"])
def test_training_batches_do_not_depend_on_the_worker_count(photos, monkeypatch, augment):
    sequential = _batches(photos, ["--num_parallel_workers=1"] + augment, training=True)
    assert len(sequential) == 3 and sequential[0].shape == (8, 3, 224, 224) and sequential[0].dtype == np.float32
    assert np.array_equal(np.concatenate(sequential), np.concatenate(_batches(
        photos, ["--num_parallel_workers=1"] + augment, training=True)))  # replayable
    processes = _batches(photos, ["--num_parallel_workers=2"] + augment, training=True)
    monkeypatch.setattr(batches, "worker_processes_possible", lambda source: False)
    threads = _batches(photos, ["--num_parallel_workers=3"] + augment, training=True)
    for other in (processes, threads):
        assert np.array_equal(np.concatenate(sequential), np.concatenate(other))
    assert not np.array_equal(sequential[0], _batches(photos, ["--num_parallel_workers=1"] + augment, True, 1)[0])


def test_workers_live_across_epochs_and_make_the_same_batches(photos):
    """3 epochs, 2 workers: one start of the workers (3 before), and each epoch's batches as one
    process makes them."""
    started = batches.pools_started
    for epoch in range(3):
        pooled = _batches(photos, ["--num_parallel_workers=2"], training=True, epoch=epoch)
        alone = _batches(photos, ["--num_parallel_workers=1"], training=True, epoch=epoch)
        assert np.array_equal(np.concatenate(pooled), np.concatenate(alone))
    assert batches.pools_started - started == 1


def test_evaluation_keeps_the_last_partial_batch(photos):
    batches = _batches(Split(photos.classes, photos.labels[:19], photos.paths[:19]), ["--num_parallel_workers=2"],
                       training=False)
    assert [len(b) for b in batches] == [8, 8, 3]


def test_threads_when_shared_memory_is_short(photos, monkeypatch, caplog):
    class Full:
        f_bavail, f_frsize = 1, 4096

    expected = np.concatenate(_batches(photos, ["--num_parallel_workers=1"], training=True))
    monkeypatch.setattr(batches.os, "statvfs", lambda path: Full())
    monkeypatch.setattr(batches, "_THREAD_FALLBACKS", set())
    assert np.array_equal(np.concatenate(_batches(photos, ["--num_parallel_workers=2"], training=True)), expected)
    assert "data loading in 2 threads instead of processes: /dev/shm has less than the" in caplog.text
    assert "(docker: --shm-size)" in caplog.text


def test_crop_box_dct_factor_jitter_and_erasing():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(rng, 375, 500, (0.08, 1.0), (0.75, 1.333))
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.08 * 375 * 500 * 0.95 <= h * w <= 375 * 500 and 0.7 <= w / h <= 1.4
    assert crop_box(rng, 100, 1000, (0.5, 0.5), (1.0, 1.0)) == (0, 450, 100, 100)  # fallback: centred, ratio clamped
    assert [dct_factor(side, 224) for side in (100, 447, 448, 900, 5000)] == [1, 1, 2, 4, 8]
    pixels = np.full((32, 32, 3), 100, np.uint8)
    assert np.array_equal(jitter(pixels, rng, 0.0), pixels)
    assert jitter(pixels, np.random.default_rng(1), 0.5).mean() != 100
    chw = np.ones((3, 50, 50), np.float32)
    erase(chw, np.random.default_rng(2))
    erased = (chw == 0).all(axis=0).sum()
    assert 0.02 * 2500 * 0.9 <= erased <= 0.33 * 2500 * 1.1


def test_large_photos_decode_at_a_fraction_in_the_dct_domain(photos):
    big = io.BytesIO()
    Image.open(photos.paths[0]).resize((2000, 1500)).save(big, "JPEG", quality=90)
    assert decode_rgb(big.getvalue(), reduce=4).shape == (375, 500, 3)
    cfg = parse_config(["--image_size=224", "--scale", "1", "1", "--ratio", "1.333", "1.334", "--hflip=0"])
    out = data.image_transform(train_job(cfg).loader, training=True)(big.getvalue(), np.random.default_rng(0))
    full = data.image_transform(train_job(cfg).loader, training=True)(decode_rgb(big.getvalue()), np.random.default_rng(0))
    # the same picture through another filter (the DCT reduction averages, bilinear alone aliases)
    assert out.shape == (3, 224, 224) and np.corrcoef(out.ravel(), full.ravel())[0, 1] > 0.99


# ---------------------------------------------------------------- bad images

def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


def _odd_and_bad_files(folder: str, seed: int) -> tuple[list[str], list[str]]:
    """(readable odd formats, unreadable files) written into ``folder``."""
    rs = np.random.RandomState(seed)
    rgb = Image.fromarray(rs.randint(0, 255, (40, 44, 3)).astype(np.uint8))
    jpeg = _encoded(rgb, "JPEG")
    odd = {"cmyk.JPEG": _encoded(rgb.convert("CMYK"), "JPEG"), "grey.JPEG": _encoded(rgb.convert("L"), "JPEG"),
           "rgba.png": _encoded(rgb.convert("RGBA"), "PNG"), "palette.png": _encoded(rgb.convert("P"), "PNG"),
           "sixteen.png": _encoded(Image.fromarray(rs.randint(0, 65535, (40, 44)).astype(np.uint16)), "PNG")}
    bad = {"empty.JPEG": b"", "text.JPEG": b"not an image at all\n", "cut100.JPEG": jpeg[:100],
           "cut300.JPEG": jpeg[:300], "cuthalf.JPEG": jpeg[:len(jpeg) // 2], "cut.png": _encoded(rgb, "PNG")[:200]}
    for name, content in {**odd, **bad}.items():
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(content)
    return [os.path.join(folder, n) for n in odd], [os.path.join(folder, n) for n in bad]


@pytest.mark.slow
def test_every_kind_of_bad_image_is_named_once_and_replaced(tmp_path):
    root = tmp_path / "data"
    classes = write_imagenet_layout(str(root), per_class=4, size=36)
    odd_train, bad_train = _odd_and_bad_files(str(root / "train" / classes[0]), seed=0)
    odd_val, bad_val = _odd_and_bad_files(str(root / "val" / classes[1]), seed=1)
    for path in odd_train + odd_val:
        with open(path, "rb") as handle:
            assert decode_rgb(handle.read()).shape[2] == 3  # readable, just unusual
    with pytest.raises(UnreadableImage):
        decode_rgb(b"")
    args = ["--model=resnet18", "--image_size=32", "--batch_size=9", "--epoch_size=2", f"--data_dir={root}",  # 27 files
            f"--output_path={tmp_path / 'runs'}", "--num_parallel_workers=2", "--log_interval=100"]
    assert train_entry.main(args) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    log = (run_dir / "train.log").read_text()
    for path in bad_train + bad_val:
        assert log.count(f"skipping unreadable image {path} ") == 1, path  # once, though read every epoch
    for path in odd_train + odd_val:
        assert path not in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["unreadable_images"] for r in records] == [len(bad_train)] * 2
    done = subprocess.run([sys.executable, "validate.py", f"--data_dir={root}", f"--ckpt_path={run_dir}",
                           "--num_parallel_workers=2", f"--json={tmp_path / 'val.json'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for path in bad_val:
        assert done.stdout.count(f"skipping unreadable image {path} ") == 1, path
    result = json.loads((tmp_path / "val.json").read_text())
    # an unreadable image is replaced by the next one, so every file of the split is scored once
    assert result["unreadable"] == len(bad_val) and result["count"] == 4 * 4 + len(odd_val) + len(bad_val)


def _shared_memory_of(pids: list[int]) -> set[str]:
    """The /dev/shm segments mapped by ``pids``."""
    names = set()
    for pid in pids:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as handle:
            names.update(line.split("/dev/shm/", 1)[1].split()[0] for line in handle if "/dev/shm/" in line)
    return names


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux shared memory")
@pytest.mark.slow
def test_data_workers_exit_with_their_killed_parent_and_release_shared_memory(tmp_path):
    """train.py killed with SIGKILL (the OOM killer, a scheduler's hard kill) cannot shut its
    workers down: they notice within a second, and their shared-memory batches leave /dev/shm."""
    import signal
    import time

    write_imagenet_layout(str(tmp_path / "data"), per_class=100, size=48, splits=("train",))  # 100 steps
    proc, lines, _ = start_train(["--model=resnet18", "--image_size=48", "--batch_size=4", "--num_parallel_workers=2",
                                  "--epoch_size=50", "--log_interval=1", "--val_while_train=False",
                                  f"--data_dir={tmp_path / 'data'}", f"--output_path={tmp_path / 'runs'}"])
    wait_for_output(proc, lines, "step 2/")
    workers = _children_of(proc.pid, b"train.py")
    segments = _shared_memory_of([proc.pid, *workers]) & set(os.listdir("/dev/shm"))  # not another test's
    assert len(workers) == 2 and segments, (workers, segments)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while (any(map(_alive, workers)) or segments & set(os.listdir("/dev/shm"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)], "orphaned data workers"
    assert not segments & set(os.listdir("/dev/shm")), "shared memory left in /dev/shm"


def test_a_worker_killed_mid_epoch_is_replaced_and_the_epoch_has_the_same_batches(photos, caplog):
    """SIGKILL to one worker between batches (the OOM killer): new workers make the unfinished
    batches again, and the epoch's batches equal an undisturbed epoch's."""
    import signal
    import time

    transform = data.image_transform(train_job(parse_config(["--image_size=64"])).loader, True)

    def source() -> batches.BatchSource:
        return batches.BatchSource(photos, np.arange(len(photos)), transform, seed_key=(0,), batch_size=2,
                                   drop_remainder=True, workers=2)

    expected = [images for images, _ in source()]
    got, killed = [], []
    for images, _ in source():
        got.append(images)
        if len(got) == 3:
            workers = _children_of(os.getpid())
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])
            time.sleep(1)  # the pool notices before it has made every batch
    assert len(got) == len(expected) == 12
    for mine, theirs in zip(got, expected):
        np.testing.assert_array_equal(mine, theirs)
    assert f"data loading worker {killed[0]} killed by SIGKILL: new workers make batches" in caplog.text


def test_a_worker_that_dies_at_every_batch_ends_the_epoch_in_one_line(photos, monkeypatch):
    monkeypatch.setattr(batches.BatchSource, "fill", lambda self, batch, images: os._exit(3))
    source = batches.BatchSource(photos, np.arange(len(photos)), data.image_transform(train_job(parse_config([])).loader, True),
                                 seed_key=(0,), batch_size=8, drop_remainder=True, workers=2)
    with pytest.raises(DataError, match=r"a data loading worker process died \(\d+ exited with code 3.*; 4 times this "
                                        r"epoch\): .*--num_parallel_workers=1"):
        list(source)


def _children_of(pid: int, marker: bytes | None = None) -> list[int]:
    """``pid``'s live children whose command line holds ``marker`` (default: ``pid``'s own command
    line, i.e. its forked workers, not the resource tracker)."""
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        command = handle.read()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                fields, theirs = stat.read().rsplit(")", 1)[1].split(), cmd.read()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and (marker in theirs if marker else theirs == command):
            found.append(int(entry))
    return found


def test_a_training_size_below_the_evaluation_size(photos):
    """--train_image_size (the RSB A3 recipe: 160 px training, 224 px evaluation): training batches and
    the auto-augment policy's translation take the training size, evaluation the --image_size."""
    loader = train_job(parse_config(["--image_size=64", "--train_image_size=40",
                                     "--auto_augment=randaug-m9-mstd0.5"])).loader
    train, evaluate = data.image_transform(loader, True), data.image_transform(loader, False)
    photo = open(photos.paths[0], "rb").read()
    assert train(photo, np.random.default_rng(0)).shape == (3, 40, 40)
    assert evaluate(photo, None).shape == (3, 64, 64)
    assert train.policy.ops[0].hparams["translate_const"] == int(40 * 0.45)
    source = batches.BatchSource(photos, np.arange(len(photos)), train, seed_key=(0,), batch_size=2,
                                 drop_remainder=True, workers=1)
    images, _ = next(iter(source))
    assert images.shape == (2, 3, 40, 40)
