"""Tiny data sets written by the tests themselves, and one training step's gradients."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def write_imagenet_layout(root: str, per_class: int = 6, size: int = 40, splits=("train", "val"),
                          classes=("n01440764", "n01443537", "n01484850", "n01491361"), seed: int = 0) -> list[str]:
    """``root/<split>/<wnid>/<wnid>_<i>.JPEG``: noisy images whose colour is the class."""
    rs = np.random.RandomState(seed)
    for split in splits:
        for index, wnid in enumerate(classes):
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(rs.normal(COLORS[index % len(COLORS)], 40, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{wnid}_{i}.JPEG"), quality=90)
    return list(classes)


def write_cifar10_binary(folder: str, per_file: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``folder/cifar-10-batches-bin`` with 5 train batches and a test batch; returns test (images, labels)."""
    rs = np.random.RandomState(seed)
    root = os.path.join(folder, "cifar-10-batches-bin")
    os.makedirs(root, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rs.randint(0, 10, per_file).astype(np.uint8)
        images = rs.randint(0, 256, (per_file, 3, 32, 32)).astype(np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
        records.tofile(os.path.join(root, name))
    return images.transpose(0, 2, 3, 1), labels.astype(np.int32)


def train_job_of(args: list[str]):
    """The training specs of a command line."""
    from config import parse_config, train_job

    return train_job(parse_config(args))


def inference_job_of(args: list[str]):
    """The validate / infer / export specs of a command line."""
    from config import inference_job, parse_config

    return inference_job(parse_config(args))


def step_gradients(net, x, labels) -> tuple[np.ndarray, list[np.ndarray]]:
    """(loss, gradients of net's trainable parameters) of one training-mode cross-entropy step."""
    import mindspore as ms
    from mindspore import nn

    loss_net = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))
    loss_net.set_train(True)
    loss, grads = ms.value_and_grad(loss_net, None, net.trainable_params())(x, labels)
    return loss.asnumpy(), [g.asnumpy() for g in grads]


def step_results(net, x, labels) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(loss, gradients, BatchNorm running statistics after it) of one training step of ``net``."""
    loss, grads = step_gradients(net, x, labels)
    return loss, grads, [p.asnumpy() for p in net.get_parameters() if "moving" in p.name]


def assert_same_step(ours, reference) -> None:
    """Two :func:`step_results` agree: loss, every gradient, every running statistic."""
    (loss, grads, stats), (loss_ref, grads_ref, stats_ref) = ours, reference
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4 * max(1e-3, np.abs(g_ref).max()))
    for s, s_ref in zip(stats, stats_ref):
        np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)


def pytest_under_avx2_cap(path: str, selection: str) -> str:
    """Runs the tests of ``path`` matching ``-k selection`` in a process capped at AVX2 (oneDNN then
    wants other layouts: 8-channel blocks); asserts they pass and returns pytest's output."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", selection]
    result = subprocess.run(command, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_train(args: list[str], **popen) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """``python train.py *args`` in the repository, its output collected line by line as it comes
    (by the returned thread, which ends with the output)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines, reader


def wait_for_output(proc: subprocess.Popen, lines: list[str], text: str, timeout: float = 180) -> None:
    """Wait until ``text`` appears in ``lines``; fail if ``proc`` ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)


def read_board(folder: str, last_file_only: bool = False) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """The scalars ({tag: {step: value}}) and texts of a TensorBoard folder's event files, read with
    tensorboardX's own protobuf types, as TensorBoard shows them: the files in the order written,
    a file that starts a session at step s (a resumed run's purge_step) hiding what earlier files
    logged from step s on."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    names = sorted(f for f in os.listdir(folder) if f.startswith("events.out.tfevents"))
    for name in names[-1:] if last_file_only else names:
        with open(os.path.join(folder, name), "rb") as handle:
            data = handle.read()
        offset = 0
        while offset < len(data):  # TFRecord: length, its CRC, the record, its CRC
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for points in scalars.values():
                    for step in [s for s in points if s >= event.step]:
                        del points[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif value.HasField("tensor"):
                    texts[value.tag] = b"".join(value.tensor.string_val).decode()
    return scalars, texts
