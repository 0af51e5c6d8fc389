"""Data-parallel training: launcher detection, sharding, and real 2-rank jobs on CPU under mpirun and
msrun (equal to a single process on the full batch), end to end through train.py, and a killed rank.

The multi-process tests need OpenMPI's ``mpirun`` (``apt-get install openmpi-bin libopenmpi-dev``,
as README and .ci/run do); msrun ships with MindSpore.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import train as train_entry
from config import ConfigError
from models import checkpoint
from resgarden.base.specs import ClusterSpec
from resgarden.data.datasets import epoch_order, shard_order
from resgarden.runtime.distributed import (
    Cluster,
    check_port_free,
    describe_failure,
    dynamic_cluster_env,
    init_cluster,
    lost_rank,
    plan_cluster,
)
from tests.helpers import write_imagenet_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun")
MSRUN = os.path.join(os.path.dirname(sys.executable), "msrun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="OpenMPI's mpirun is not installed (README: distributed)")
LAUNCH_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict[str, str]:
    """This venv's python first on PATH (msrun runs `python`); OpenMPI allowed to run as root (CI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "MS_"))}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    return env


def _launch(launcher: str, script_args: list[str], log_dir: str, ranks: int = 2) -> list[str]:
    port = _free_port()
    if launcher.startswith("mpirun"):
        # "mpirun-hosts": one slot on each of two host names of this machine, as a hostfile of two nodes lists them
        placement = ["--host", "127.0.0.1:1,localhost:1"] if launcher == "mpirun-hosts" else ["--oversubscribe"]
        return [MPIRUN, "-n", str(ranks), *placement, sys.executable, *script_args,
                *(["--port", str(port)] if script_args[0] == "tests/dist_worker.py" else ["--dist_port", str(port)])]
    return [MSRUN, f"--worker_num={ranks}", f"--local_worker_num={ranks}", f"--master_port={port}", "--join=True",
            f"--log_dir={log_dir}", *script_args]


# ---------------------------------------------------------------- without launching anything

def test_launcher_detection_and_mpi_translation():
    openmpi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    plan = plan_cluster(openmpi, "CPU")
    assert (plan.launcher, plan.path, plan.rank, plan.size) == ("OpenMPI", "dynamic_cluster", 3, 8)
    mpich = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}
    assert (plan_cluster(mpich, "GPU").rank, plan_cluster(mpich, "GPU").device_id) == (2, 0)
    assert plan_cluster({"MS_ROLE": "MS_WORKER"}, "CPU").launcher == "msrun"
    env = dynamic_cluster_env(3, 8, "10.0.0.5", 9000, timeout=45)
    assert env == {"MS_ROLE": "MS_WORKER", "MS_NODE_ID": "3", "MS_WORKER_NUM": "8", "MS_SCHED_HOST": "10.0.0.5",
                   "MS_SCHED_PORT": "9000", "MS_NODE_TIMEOUT": "45", "MS_TOPO_TIMEOUT": "600"}
    # nodes may join up to msrun's 10 minutes apart, or as long as the user exported
    assert dynamic_cluster_env(3, 8, "h", 9000, 45, {"MS_TOPO_TIMEOUT": "1800"})["MS_TOPO_TIMEOUT"] == "1800"


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_cover_each_sample_once_per_epoch(size):
    order = epoch_order(103, seed=5, epoch=2, shuffle=True)
    train = [shard_order(order, r, size, equal=True) for r in range(size)]
    assert len({len(s) for s in train}) == 1  # same number of steps on every rank
    joined = np.concatenate(train)
    assert len(np.unique(joined)) == len(joined) == 103 // size * size
    evaluation = np.concatenate([shard_order(order, r, size, equal=False) for r in range(size)])
    assert sorted(evaluation) == list(range(103))  # evaluation scores every image once


def test_no_launcher_is_a_clear_error(monkeypatch, capsys):
    for name in list(os.environ):
        if name.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "MS_ROLE")):
            monkeypatch.delenv(name)
    cfg = ClusterSpec(distribute=True, dist_init="auto", device_target="CPU")
    with pytest.raises(ConfigError, match="needs a launcher: start with `mpirun"):
        init_cluster(cfg)
    assert init_cluster(ClusterSpec(distribute=False)) == Cluster()
    assert train_entry.main(["--run_distribute=1", "--epoch_size=1"]) == 2
    assert "mpirun -n N python train.py" in capsys.readouterr().err


def test_busy_scheduler_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="not free .*--dist_port"):
            check_port_free("127.0.0.1", busy.getsockname()[1])


def test_lost_rank_message_names_the_rank():
    text = "The total number of timed out node is 1. ... worker 3 is the first one timed out, please check its log."
    assert lost_rank(text) == 3
    message = describe_failure(RuntimeError(text), timeout=20)
    assert "rank 3 died or stopped answering" in message and "--dist_timeout" in message
    assert "another rank" in describe_failure(RuntimeError("Launch kernel failed, name:Default/AllReduce-op0"), 20)


# ---------------------------------------------------------------- 2 ranks on CPU

@needs_mpirun
def test_local_rank_from_mpi_when_the_launcher_sets_none(tmp_path):
    """Without OMPI_COMM_WORLD_LOCAL_RANK, mpi4py's shared-memory split gives the same local rank
    (each rank writes its own file: ranks printing to one stdout interleave)."""
    code = ("import os, sys; from resgarden.runtime.distributed import LAUNCHERS, launcher_local_rank; "
            "env = dict(os.environ); local = env.pop('OMPI_COMM_WORLD_LOCAL_RANK'); "
            "open(os.path.join(sys.argv[1], 'rank' + env['OMPI_COMM_WORLD_RANK']), 'w')"
            ".write(f'{local} {launcher_local_rank(LAUNCHERS[0], env)}')")
    done = subprocess.run([MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["0 0", "1 1"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "tests/dist_worker.py", "--out", str(out)], cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=LAUNCH_TIMEOUT)
    return dict(np.load(out / "rank0.npz"))


@needs_mpirun
@pytest.mark.parametrize("launcher,mode", [("mpirun", "graph"), ("msrun", "graph"), ("mpirun", "pynative"),
                                           ("mpirun-hosts", "graph")])
@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_full_batch(launcher, mode, single_process_run, tmp_path):
    """3 steps of SGD (momentum, weight decay, clipping) on shards of 4: both ranks end bit-identical,
    and equal to one graph-mode process on the 8-sample batches within 1e-6 (float32 summation order)."""
    script = ["tests/dist_worker.py", "--out", str(tmp_path), "--distribute", *(["--pynative"] if mode == "pynative"
                                                                                  else [])]
    done = subprocess.run(_launch(launcher, script, str(tmp_path / "logs")),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    for name, reference in single_process_run.items():
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name], reference, rtol=0, atol=1e-6, err_msg=name)
    assert not np.allclose(rank0["head.weight"], _initial_head()), "the weights did not move"


@needs_mpirun
@pytest.mark.parametrize("launcher", ["msrun", "mpirun"])
@pytest.mark.slow
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(launcher, tmp_path):
    """Rank 1's overflow check fires at every step, rank 0's never (a 910A whose float16 gradients
    saturated on one card): both ranks skip all 3 steps, halve the loss scale each time and keep
    their initial weights, identical to each other."""
    script = ["tests/dist_worker.py", "--out", str(tmp_path), "--distribute", "--overflow_rank", "1"]
    done = subprocess.run(_launch(launcher, script, str(tmp_path / "logs")),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rank0, rank1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    for rank in (rank0, rank1):
        assert int(rank["skipped_steps"]) == 3 and float(rank["loss_scale"]) == 1024.0 / 8
        np.testing.assert_array_equal(rank["head.weight"], _initial_head().astype(np.float32))
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)


def _initial_head() -> np.ndarray:
    rs = np.random.RandomState(0)
    rs.normal(0, 0.3, (8, 3, 3, 3))
    return rs.normal(0, 0.3, (4, 8))


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_data")
    write_imagenet_layout(str(root), per_class=10, size=36)  # 40 train, 40 val
    return str(root)


TRAIN_ARGS = ["--model=resnet18", "--image_size=32", "--batch_size=4", "--num_parallel_workers=1", "--lr=0.02",
              "--warmup_epochs=0", "--log_interval=2", "--crop_pct=1.0"]


@needs_mpirun
@pytest.mark.slow
def test_train_py_under_mpirun(tiny_imagenet, tmp_path):
    """2 ranks x 4 images: 5 steps an epoch, one run folder written by rank 0 alone, validation over
    all 40 images (each rank scores half), identical weights on both ranks, an exact resume, and
    validate.py on 2 ranks scoring what one process scores."""
    args = ["train.py", *TRAIN_ARGS, f"--data_dir={tiny_imagenet}", f"--output_path={tmp_path}/out",
            "--run_distribute=1", "--epoch_size=2", "--keep_checkpoint_max=2"]
    done = subprocess.run(_launch("mpirun", args, ""), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "global batch 8 = 4 per rank x 2 ranks x 1 accumulation" in out
    assert "5 steps/epoch" in out and "(40 images)" in out
    assert "all 2 ranks hold identical weights and optimizer state" in out
    assert out.count("done: 2 epochs") == 1  # rank 0 speaks for the job
    runs = os.listdir(tmp_path / "out")
    assert len(runs) == 1
    run_dir = tmp_path / "out" / runs[0]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    ckpt_dir = run_dir / "ckpt_0"
    uninterrupted = _weights(ckpt_dir / "resnet18-e002.ckpt")

    # as if the job had stopped after epoch 1: forget epoch 2 and resume the run folder on 2 ranks
    os.remove(ckpt_dir / "resnet18-e002.ckpt")
    manifest = ckpt_dir / checkpoint.MANIFEST
    manifest.write_text(json.dumps([e for e in json.loads(manifest.read_text()) if e["epoch"] < 1]))
    resumed = subprocess.run(_launch("mpirun", [*args, f"--resume={run_dir}"], ""), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "resumed from" in out and "all 2 ranks hold identical" in out
    again = _weights(ckpt_dir / "resnet18-e002.ckpt")
    worst = max(float(np.abs(again[k] - uninterrupted[k]).max()) for k in uninterrupted)
    assert worst < 1e-5, f"resumed weights differ by {worst}"

    # validate.py on 2 ranks (each scores half) reports what one process reports
    scores = {}
    for ranks in (1, 2):
        report = tmp_path / f"val{ranks}.json"
        command = ["validate.py", f"--data_dir={tiny_imagenet}", f"--ckpt_path={run_dir}", f"--json={report}",
                   "--num_parallel_workers=1"]
        command = _launch("mpirun", [*command, "--distribute"], "") if ranks == 2 else [sys.executable, *command]
        done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert done.stdout.count("top-1") == 1  # rank 0 speaks for the job
        scores[ranks] = json.loads(report.read_text())
    assert scores[2]["count"] == scores[1]["count"] == 40
    assert (scores[2]["top1"], scores[2]["top5"]) == (scores[1]["top1"], scores[1]["top5"])
    assert scores[2]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_train_py_under_msrun(tiny_imagenet, tmp_path):
    """msrun also runs train.py as the scheduler: it must write nothing (one run folder), and each
    worker's output lands in <log_dir>/worker_<rank>.log. msrun says nothing of how many ranks share
    a node: the ranks find out (both here) and share its CPUs as data workers."""
    args = ["train.py", *[a for a in TRAIN_ARGS if not a.startswith("--num_parallel_workers")],
            f"--data_dir={tiny_imagenet}", f"--ckpt_save_dir={tmp_path}/out", "--distribute=True", "--epoch_size=1"]
    done = subprocess.run(_launch("msrun", args, str(tmp_path / "logs")), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert len(os.listdir(tmp_path / "out")) == 1
    worker0 = (tmp_path / "logs" / "worker_0.log").read_text(errors="replace")
    assert "all 2 ranks hold identical weights and optimizer state" in worker0 and "done: 1 epochs" in worker0
    share = max(1, min(16, len(os.sched_getaffinity(0)) // 2))
    assert (f"data loading: node of ranks 0-1: {share} worker process(es) per rank ("
            f"{len(os.sched_getaffinity(0))} CPUs on the node / 2 rank(s) on it") in worker0
    assert "rank 1 of 2" in (tmp_path / "logs" / "worker_1.log").read_text(errors="replace")


def _weights(path) -> dict[str, np.ndarray]:
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items() if not k.startswith("meta.")}


def _wait_for(path_or_proc_output: str, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path_or_proc_output):
            with open(path_or_proc_output, encoding="utf-8", errors="replace") as handle:
                if needle in handle.read():
                    return
        assert proc.poll() is None, f"the job ended before {needle!r}"
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} did not appear within {timeout} s")


def _pids_with(marker: str, variable: str) -> list[int]:
    """Processes whose command line holds ``marker`` and whose environment holds ``variable``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() not in handle.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if variable.encode() in handle.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def _start(command: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    with open(log_path, "w", encoding="utf-8") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("launcher", [pytest.param("mpirun", marks=needs_mpirun), "dynamic_cluster"])
@pytest.mark.slow
def test_killed_rank_ends_the_job(launcher, tiny_imagenet, tmp_path):
    """Rank 1 is SIGKILLed mid-epoch. mpirun aborts the job at once and names the rank; with a bare
    dynamic cluster (as each node of a multi-node msrun job sees it) the survivor stops within
    --dist_timeout (10 s) + 15 s, non-zero, and the scheduler's one-line error names rank 1."""
    timeout = 10
    marker = f"--output_path={tmp_path}/out"
    args = ["train.py", *TRAIN_ARGS, f"--data_dir={tiny_imagenet}", marker, "--run_distribute=1",
            "--epoch_size=200", f"--dist_timeout={timeout}"]
    log = str(tmp_path / "rank0.log")
    env = _env()
    if launcher == "mpirun":
        procs = [_start(_launch("mpirun", args, ""), env, log)]
    else:  # scheduler and 2 workers by hand, as msrun would start them on one node
        env.update(MS_WORKER_NUM="2", MS_SCHED_HOST="127.0.0.1", MS_SCHED_PORT=str(_free_port()))
        procs = [_start([sys.executable, *args], {**env, "MS_ROLE": "MS_SCHED"}, str(tmp_path / "scheduler.log"))]
        procs += [_start([sys.executable, *args], {**env, "MS_ROLE": "MS_WORKER", "MS_NODE_ID": str(rank)},
                         str(tmp_path / f"rank{rank}.log")) for rank in (0, 1)]
    survivor = procs[0] if launcher == "mpirun" else procs[1]
    try:
        _wait_for(log, "step 4/5", survivor, LAUNCH_TIMEOUT)
        victims = _pids_with(marker, "OMPI_COMM_WORLD_RANK=1") if launcher == "mpirun" else [procs[2].pid]
        assert len(victims) == 1, f"rank 1's process was not found: {victims}"
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        code = survivor.wait(timeout=timeout + 60)
        elapsed = time.monotonic() - killed_at
        scheduler_code = procs[0].wait(timeout=timeout + 30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code != 0
    assert elapsed < timeout + 15, f"the job took {elapsed:.0f} s to stop"
    with open(log, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if launcher == "mpirun":
        assert "process rank 1" in text, text[-3000:]
    else:  # our one-line error, or MindSpore's heartbeat watchdog when the rank was inside a collective
        assert "train.py: error: data-parallel job stopped" in text or "Kill this process with SIGTERM" in text, \
            text[-3000:]
        assert scheduler_code == 1
        with open(tmp_path / "scheduler.log", encoding="utf-8", errors="replace") as handle:
            assert "train.py: error: data-parallel job stopped: rank 1 died or stopped answering" in handle.read()


@needs_mpirun
@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1])
@pytest.mark.slow
def test_a_stop_signal_under_mpirun_stops_every_rank_at_one_step_and_resumes_exactly(tiny_imagenet, tmp_path,
                                                                                     stop_signal):
    """mpirun forwards the signal to both ranks; they stop at the same log point, rank 0 writes one
    mid-epoch checkpoint, the job exits 75, and the resumed job ends with the uninterrupted weights.
    Batch 2 makes 10 steps an epoch, logged every 2: however late mpirun delivers the signal after
    step 2, the ranks agree on a later log point of epoch 1 (the log names it; the checkpoint must match)."""
    args = ["train.py", *TRAIN_ARGS, "--batch_size=2", f"--data_dir={tiny_imagenet}", "--run_distribute=1",
            "--epoch_size=2", "--val_while_train=False"]
    whole = subprocess.run(_launch("mpirun", [*args, f"--output_path={tmp_path}/whole"], ""), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]
    log = tmp_path / "cut.log"
    with open(log, "w", encoding="utf-8") as out:
        job = subprocess.Popen(_launch("mpirun", [*args, f"--output_path={tmp_path}/cut"], ""), cwd=ROOT, env=_env(),
                               stdout=out, stderr=subprocess.STDOUT)
        _wait_for(str(log), "epoch 1/2 step 2/10", job, LAUNCH_TIMEOUT)
        job.send_signal(stop_signal)
        assert job.wait(timeout=LAUNCH_TIMEOUT) == 75
    text = log.read_text(errors="replace")
    stops = re.findall(rf"train\.py: stopped by {stop_signal.name} at epoch 1 step (\d+)/10", text)
    assert len(stops) == 1, text[-3000:]  # rank 0 speaks, once
    step = int(stops[0])
    assert step in (4, 6, 8), f"stopped at step {step}/10"  # a later log point of epoch 1, before its end
    (run_dir,) = os.listdir(tmp_path / "cut")
    ckpt_dir = tmp_path / "cut" / run_dir / "ckpt_0"
    assert [f for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")] == [f"resnet18-e001-step{step:06d}.ckpt"]
    resumed = subprocess.run(_launch("mpirun", ["train.py", f"--resume={tmp_path / 'cut' / run_dir}"], ""), cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    (whole_dir,) = os.listdir(tmp_path / "whole")
    want = _weights(tmp_path / "whole" / whole_dir / "ckpt_0" / "resnet18-e002.ckpt")
    got = _weights(ckpt_dir / "resnet18-e002.ckpt")
    # relative to each tensor's scale: BN statistics averaged at the stop instead of at the epoch's
    # end are the same sum in another order (one float32 ulp of a running variance near 200)
    worst = {k: float(np.abs(got[k] - want[k]).max() / max(1.0, float(np.abs(want[k]).max()))) for k in want}
    name = max(worst, key=worst.get)
    assert worst[name] < 1e-5, f"resumed {name} differs by {worst[name]} of its scale"


# ---------------------------------------------------------------- two nodes over loopback

class _Relay:
    """What a network between two nodes does here: connections to the second node's view of the
    master (127.0.0.2:port) reach the scheduler node 0's msrun started on 127.0.0.1:port. (msrun
    starts the scheduler on the node whose address --master_addr is; 127.0.0.2 is not one of this
    machine's, so node 1's msrun starts none, as on a real second machine.)"""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.2", port))
        self.port = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def _msrun_node(rank: int, port: int, script: list[str], log_dir: str) -> list[str]:
    """One of two nodes: one worker; node 0 names itself as master, node 1 the master's address."""
    master = "127.0.0.1" if rank == 0 else "127.0.0.2"
    return [MSRUN, "--worker_num=2", "--local_worker_num=1", f"--master_addr={master}", f"--master_port={port}",
            f"--node_rank={rank}", f"--log_dir={log_dir}", "--join=True", *script]


@pytest.mark.slow
def test_two_msrun_nodes_over_loopback_equal_one_process(single_process_run, tmp_path):
    """Two msrun invocations (node 0 runs the scheduler), one worker each: the weights equal one
    process on the full batch, as with one msrun on one node."""
    port = _free_port()
    relay = _Relay(port)
    script = ["tests/dist_worker.py", "--out", str(tmp_path), "--distribute"]
    try:
        nodes = [subprocess.Popen(_msrun_node(rank, port, script, str(tmp_path / f"node{rank}")), cwd=ROOT,
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in (0, 1)]
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT)[0] for node in nodes]
    finally:
        relay.close()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    rank0, rank1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    for name, reference in single_process_run.items():
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)
        np.testing.assert_allclose(rank0[name], reference, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_killed_node_ends_the_other_within_a_minute(tiny_imagenet, tmp_path):
    """train.py on two msrun nodes; node 1's worker is SIGKILLed mid-epoch: node 0 stops within
    --dist_timeout + 50 s, non-zero, with one line naming rank 1; its last checkpoint loads."""
    timeout, port = 10, _free_port()
    relay = _Relay(port)
    marker = f"--output_path={tmp_path}/out"
    script = ["train.py", *TRAIN_ARGS, f"--data_dir={tiny_imagenet}", marker, "--run_distribute=1",
              "--epoch_size=200", f"--dist_timeout={timeout}"]
    logs = [str(tmp_path / f"node{rank}.log") for rank in (0, 1)]
    nodes = [_start(_msrun_node(rank, port, script, str(tmp_path / f"node{rank}")), _env(), logs[rank])
             for rank in (0, 1)]
    try:
        _wait_for(str(tmp_path / "node0" / "worker_0.log"), "saved ", nodes[0], LAUNCH_TIMEOUT)  # epoch 1 written
        victims = [pid for pid in _pids_with(marker, "MS_NODE_ID=1") if pid != nodes[1].pid]
        assert victims, "node 1's worker was not found"
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        code = nodes[0].wait(timeout=timeout + 60)
        elapsed = time.monotonic() - killed_at
    finally:
        relay.close()
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert code != 0 and elapsed < timeout + 50, f"node 0 took {elapsed:.0f} s to stop (exit {code})"
    text = open(tmp_path / "node0" / "worker_0.log", encoding="utf-8", errors="replace").read()
    assert "train.py: error: data-parallel job stopped" in text or "Kill this process with SIGTERM" in text, text[-2000:]
    (run_dir,) = os.listdir(tmp_path / "out")
    checkpoint.open_checkpoint(checkpoint.find_checkpoint(str(tmp_path / "out" / run_dir)))
