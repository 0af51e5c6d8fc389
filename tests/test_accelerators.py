"""The GPU / Ascend paths, checked without the hardware by simulating what MindSpore reports: the
device target, Ascend SoC features, each launcher's environment, overflow status, dataset sink mode.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mindspore as ms
import mindspore.communication as communication
import numpy as np
import pytest
from mindspore import nn, ops
from mindspore.nn.layer import pooling

import models
import train as train_entry
from config import ConfigError, inference_job, parse_config, train_job
from resgarden import platform
from resgarden.base.errors import Preempted, StepCountError, UserError
from resgarden.base.specs import ClusterSpec
from resgarden.inference import validation
from resgarden.runtime import context, distributed
from resgarden.runtime.distributed import Cluster, ClusterPlan, init_cluster, local_device_id, plan_cluster
from resgarden.training import steps, train_step
from resgarden.training.train_step import TrainStep
from resgarden.training.trainer import train
from tests.helpers import train_job_of, write_imagenet_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENMPI = {"OMPI_COMM_WORLD_RANK": "11", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
MPICH = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "5"}
SLURM = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}


def _no_local_rank():
    raise AssertionError("the local rank was asked of MPI although the launcher set it (or none was needed)")


# ---------------------------------------------------------------- device target

def test_device_target_defaults_to_what_the_installation_runs_on():
    assert parse_config([]).device_target == "auto"
    assert platform.resolve_device_target("auto", ["Ascend", "CPU"]) == "Ascend"
    assert platform.resolve_device_target("auto", ["GPU", "CPU"]) == "GPU"
    assert platform.resolve_device_target("auto", ["CPU"]) == "CPU"
    assert platform.resolve_device_target("GPU", ["GPU", "CPU"]) == "GPU"
    assert platform.available_device_targets()[0][-1] == "CPU"  # this machine: the CPU backend only


def test_a_target_the_installation_cannot_serve_is_one_line(monkeypatch, capsys):
    load_error = ("Load dynamic library: libmindspore_ascend.so.2 failed. libge_runner.so: cannot open\n"
                  "Load dynamic library: libmindspore_gpu.so.11.6 failed. libcudnn.so.8: cannot open shared object")
    monkeypatch.setattr(platform, "available_device_targets", lambda: (["CPU"], load_error))
    with pytest.raises(UserError, match=r"device_target=GPU is not available .* it can run on CPU .*libcudnn"):
        platform.resolve_device_target("GPU", ["CPU"], load_error)
    assert train_entry.main(["--device_target=GPU", "--epoch_size=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it can run on CPU" in err[0]


def _guard_in_fresh_process(targets: list[str], env: dict[str, str]) -> list[str]:
    """Import the models as a user script would, with MindSpore reporting ``targets``; returns
    [native builds attempted, ONEDNN_MAX_CPU_ISA, the guard's decision]."""
    code = ("import os, resgarden.native as native, resgarden.platform as platform\n"
            "calls = []\n"
            "def build():\n"
            "    calls.append(1)\n"
            "    raise native.NativeUnavailable('simulated build failure')\n"
            "native.build_conv_library = build\n"
            f"platform.available_device_targets = lambda: ({targets!r}, '')\n"
            "import models\n"
            "net = models.create_model('resnet18', num_classes=2)\n"
            "print(len(calls)); print(os.environ.get('ONEDNN_MAX_CPU_ISA', '<unset>'))\n"
            "print(platform.apply_cpu_speed_guard())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip().splitlines()[-3:]


@pytest.mark.slow
def test_native_cpu_kernels_are_neither_built_nor_capped_on_accelerator_hosts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != platform.ISA_VARIABLE}
    env["RESGARDEN_CACHE"] = str(tmp_path)  # no cached library to find
    builds, isa, decision = _guard_in_fresh_process(["GPU", "CPU"], env)
    assert (builds, isa) == ("0", "<unset>") and decision.startswith("device target GPU: native CPU convolutions not")
    # the same user script on a CPU-only installation tries the build and, where it fails, caps oneDNN
    builds, isa, decision = _guard_in_fresh_process(["CPU"], env)
    expected = platform.decide_isa_cap(env, platform.mindspore_version(), platform.cpu_has_avx512())[0]
    assert builds == "1" and isa == (expected or "<unset>") and "simulated build failure" in decision


# ---------------------------------------------------------------- Res2Net on Ascend 910B / 910_93

class _Ascend910B:
    """MSContext as MindSpore 2.10 reports it on Atlas A2 / A3 (910B, 910_93)."""

    @staticmethod
    def get_instance():
        return _Ascend910B()

    @staticmethod
    def ascend_soc_supports_feature(feature: str) -> bool:
        return feature == "avg_pool2d_pad_constraint_train_successor"


@pytest.mark.slow
def test_every_model_builds_on_ascend_910b_without_padded_pools(monkeypatch):
    monkeypatch.setattr(pooling, "MSContext", _Ascend910B)
    with pytest.raises(ValueError, match="not support in Ascend910B"):  # the simulation bites
        nn.AvgPool2d(kernel_size=3, stride=1, pad_mode="pad", padding=1)
    for name in models.list_models():  # "pad": PyTorch-style padding everywhere ("same" never pads)
        net = models.create_model(name, num_classes=10, pool_pad="pad")
        padded = [cell_name for cell_name, cell in net.cells_and_names()
                  if isinstance(cell, (nn.AvgPool2d, nn.MaxPool2d)) and cell.pad_mode == "PAD"]
        assert not padded, (name, padded[:3])


@pytest.mark.slow
def test_padded_average_pool_equals_mindspores_own_padding(exec_mode):
    x = ms.Tensor(np.random.RandomState(0).randn(2, 5, 9, 8).astype(np.float32))
    for stride in (1, 2):
        ours = models.layers.pool3x3("avg", stride, "pad")
        theirs = nn.AvgPool2d(kernel_size=3, stride=stride, pad_mode="pad", padding=1, count_include_pad=True)
        np.testing.assert_allclose(ours(x).asnumpy(), theirs(x).asnumpy(), rtol=1e-6, atol=1e-6)
        grad = ops.GradOperation()
        np.testing.assert_allclose(grad(ours)(x).asnumpy(), grad(theirs)(x).asnumpy(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- overflow on Ascend 910A / saturation mode

def _dense_step(**kwargs):
    net = nn.Dense(4, 3)
    net.weight.set_data(ms.Tensor(np.full((3, 4), 0.1, np.float32)))
    step = TrainStep(nn.WithLossCell(net, nn.CrossEntropyLoss()), nn.SGD(net.trainable_params(), 0.1), **kwargs)
    step.set_train(True)
    return net, step


def _saturated(inputs):
    """all_finite as on a 910A whose float16 gradients saturated: finite values, overflow status set."""
    return ops.zeros((), ms.bool_)


def test_overflow_is_what_mindspores_all_finite_reports(exec_mode, monkeypatch):
    x, y = ms.Tensor(np.ones((4, 4), np.float32)), ms.Tensor(np.array([0, 1, 2, 0], np.int32))
    assert train_step.all_finite is ms.amp.all_finite
    monkeypatch.setattr(train_step, "all_finite", _saturated)
    net, step = _dense_step(loss_scale=1024.0, dynamic_loss_scale=True)
    step(x, y)
    np.testing.assert_array_equal(net.weight.asnumpy(), np.full((3, 4), 0.1, np.float32))  # update skipped
    assert int(step.skipped_steps.asnumpy()) == 1 and float(step.loss_scale.asnumpy()) == 512.0


@pytest.mark.slow
def test_skipped_steps_are_counted_and_logged(tmp_path, caplog):
    root = tmp_path / "data"
    write_imagenet_layout(str(root), per_class=4, size=36)
    cfg = parse_config(["--model=resnet18", "--image_size=32", "--batch_size=8", "--num_parallel_workers=1",
                        "--epoch_size=1", "--log_interval=1", f"--data_dir={root}", f"--output_path={tmp_path}",
                        "--loss_scale=3e38", "--val_while_train=False"])  # every scaled gradient overflows
    result = train(train_job(cfg))
    assert result["skipped_steps"] == 2
    record = json.loads(open(os.path.join(result["run_dir"], "metrics.jsonl")).read().splitlines()[0])
    assert record["skipped_steps"] == 2
    assert "1 optimizer step(s) skipped since the last log: gradients overflowed" in caplog.text
    assert "2 this epoch" in caplog.text


# ---------------------------------------------------------------- launchers and devices

@pytest.mark.parametrize("target", ["CPU", "GPU", "Ascend"])
def test_mpi_launchers_join_through_the_dynamic_cluster(target):
    accelerator = target != "CPU"
    assert plan_cluster(OPENMPI, target, local_rank_fallback=_no_local_rank) == \
        ClusterPlan("OpenMPI", "dynamic_cluster", 11, 16, 3 if accelerator else None)
    assert plan_cluster(MPICH, target, local_rank_fallback=_no_local_rank) == \
        ClusterPlan("MPICH / Intel MPI", "dynamic_cluster", 5, 8, 5 if accelerator else None)
    assert plan_cluster(SLURM, target, local_rank_fallback=_no_local_rank) == \
        ClusterPlan("Slurm srun", "dynamic_cluster", 9, 16, 1 if accelerator else None)
    # mpirun inside a Slurm allocation is an OpenMPI job
    assert plan_cluster({**SLURM, **OPENMPI}, target, local_rank_fallback=_no_local_rank).launcher == "OpenMPI"


def test_srun_through_pmi_is_slurm_with_its_local_rank():
    """srun --mpi=pmi2 also sets PMI_RANK / PMI_SIZE; the local rank is Slurm's (MPI is not asked)."""
    plan = plan_cluster({**SLURM, "PMI_RANK": "9", "PMI_SIZE": "16"}, "GPU", local_rank_fallback=_no_local_rank)
    assert (plan.launcher, plan.rank, plan.size, plan.device_id) == ("Slurm srun", 9, 16, 1)
    # MPICH's mpiexec inside a Slurm allocation names its own local rank: still MPICH
    assert plan_cluster({**SLURM, **MPICH}, "GPU", local_rank_fallback=_no_local_rank).launcher == "MPICH / Intel MPI"


def test_local_rank_comes_from_mpi_only_where_the_launcher_sets_none():
    no_local = {k: v for k, v in MPICH.items() if k != "MPI_LOCALRANKID"}
    assert plan_cluster(no_local, "GPU", local_rank_fallback=lambda: 2).device_id == 2
    assert plan_cluster(no_local, "CPU", local_rank_fallback=_no_local_rank).device_id is None


def test_msrun_workers_take_their_local_rank_and_the_scheduler_no_device():
    worker = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "DEVICE_ID": "6"}
    assert plan_cluster(worker, "Ascend") == ClusterPlan("msrun", "dynamic_cluster", device_id=6)
    assert plan_cluster(worker, "CPU").device_id is None
    assert plan_cluster({**worker, "MS_ROLE": "MS_SCHED"}, "Ascend").device_id is None
    assert plan_cluster({**worker, **OPENMPI}, "GPU").launcher == "msrun"  # MindSpore prefers MS_ROLE too


def test_one_visible_device_per_rank_is_device_zero():
    for target, variable in (("GPU", "CUDA_VISIBLE_DEVICES"), ("Ascend", "ASCEND_RT_VISIBLE_DEVICES")):
        assert plan_cluster({**OPENMPI, variable: "3"}, target).device_id == 0
        assert local_device_id(3, target, {variable: "0,1,2,3,4,5,6,7"}) == 3
        with pytest.raises(ConfigError, match=f"local rank 3 has no {target} of its own: {variable}='0,1' makes 2"):
            local_device_id(3, target, {variable: "0,1"})
    assert local_device_id(3, "GPU", {"ASCEND_RT_VISIBLE_DEVICES": "0"}) == 3  # another runtime's variable


def test_unsupported_launch_setups_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="native: MindSpore's own MPI bootstrap reads OpenMPI's variables only, "
                                          "not MPICH / Intel MPI's"):
        plan_cluster(MPICH, "Ascend", "native")
    with pytest.raises(ConfigError, match="native: MindSpore cannot use MPI on CPU"):
        plan_cluster(OPENMPI, "CPU", "native")
    assert plan_cluster(OPENMPI, "GPU", "native") == ClusterPlan("OpenMPI", "native", 11, 16, 3)
    with pytest.raises(ConfigError, match="PMIX_RANK but no rank variables known here; start the job with OpenMPI"):
        plan_cluster({"PMIX_RANK": "0"}, "GPU")
    with pytest.raises(ConfigError, match="Slurm srun: SLURM_PROCID is set but not SLURM_STEP_NUM_TASKS"):
        plan_cluster({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, "GPU")  # a batch script without srun
    with pytest.raises(ConfigError, match="needs a launcher"):
        plan_cluster({}, "GPU")


class _FakeMindSporeCluster:
    """What MindSpore's communication package reports to rank ``rank`` of ``size``; records calls."""

    def __init__(self, monkeypatch, rank: int, size: int, events: list[str]) -> None:
        self.rank, self.size, self.events, self.devices = rank, size, events, []
        monkeypatch.setattr(communication, "init", lambda: events.append("init"))
        monkeypatch.setattr(communication, "get_rank", lambda: rank)
        monkeypatch.setattr(communication, "get_group_size", lambda: size)
        monkeypatch.setattr(communication, "get_local_rank", lambda: rank % 8)
        monkeypatch.setattr(ms, "set_device", lambda target, device_id=None: (
            events.append("set_device"), self.devices.append((target, device_id))))
        monkeypatch.setattr(ms, "set_auto_parallel_context", lambda **kwargs: events.append("parallel context"))
        monkeypatch.setattr(distributed, "wait_for_port", lambda host, port, timeout: events.append("scheduler up"))
        monkeypatch.setattr(distributed, "start_scheduler", lambda env, log: events.append("scheduler started"))
        monkeypatch.setattr(distributed, "_current", Cluster())


def _dist_cfg(target: str, **extra) -> ClusterSpec:
    return ClusterSpec(distribute=True, dist_init="auto", device_target=target, dist_host=None,
                       dist_port=8118, dist_timeout=60, **extra)


@pytest.mark.parametrize("target", ["GPU", "Ascend"])
def test_each_rank_is_placed_on_its_device_once_before_init(monkeypatch, target):
    events: list[str] = []
    fake = _FakeMindSporeCluster(monkeypatch, 11, 16, events)
    environ = dict(OPENMPI)
    cluster = init_cluster(_dist_cfg(target), environ)
    assert fake.devices == [(target, 3)]
    assert events == ["scheduler up", "set_device", "init", "parallel context"]  # rank 11 starts no scheduler
    assert (cluster.rank, cluster.size, cluster.local_rank, cluster.device_id) == (11, 16, 3, 3)
    assert cluster.launcher == "OpenMPI/dynamic_cluster"
    assert (environ["MS_ROLE"], environ["MS_NODE_ID"], environ["MS_WORKER_NUM"]) == ("MS_WORKER", "11", "16")


def test_validate_and_train_join_before_any_parameter_exists(monkeypatch, tmp_path):
    """MindSpore needs init() before any Tensor or Parameter on Ascend: the checkpoint is read after."""
    events: list[str] = []
    _FakeMindSporeCluster(monkeypatch, 0, 1, events)

    class Joined(Exception):
        pass

    def init():
        events.append("init")
        raise Joined

    monkeypatch.setattr(communication, "init", init)
    original = ms.Parameter.__init__

    def parameter_init(self, *args, **kwargs):
        events.append("parameter")
        original(self, *args, **kwargs)

    monkeypatch.setattr(ms.Parameter, "__init__", parameter_init)
    ckpt = tmp_path / "weights.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.zeros(2, np.float32))}], str(ckpt))
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")  # an msrun worker
    monkeypatch.setenv("MS_WORKER_NUM", "1")
    args = parse_config(["--distribute", "--model=resnet18", f"--ckpt_path={ckpt}", "--device_target=CPU"])
    for job in (lambda: validation.validate(inference_job(args)), lambda: train(train_job(args))):
        events.clear()
        with pytest.raises(Joined):
            job()
        assert events[-1] == "init" and "parameter" not in events, events
    ms.load_checkpoint(str(ckpt))
    assert events[-1] == "parameter"  # the probe sees what reading a checkpoint creates


def _drop_path_masks(rank: int, size: int, out) -> np.ndarray:
    """Drop-path masks as rank ``rank`` of ``size`` draws them in its own process (graph mode)."""
    code = ("import sys, numpy as np, mindspore as ms, models\n"
            "from resgarden.runtime.distributed import Cluster, seed_random_ops\n"
            "ms.set_context(mode=ms.GRAPH_MODE)\n"
            f"seed_random_ops(42, Cluster({rank}, {size}))\n"
            "drop = models.layers.DropPath(0.5)\n"
            "drop.set_train(True)\n"
            "x = ms.Tensor(np.ones((64, 1, 1, 1), np.float32))\n"
            f"np.save({str(out)!r}, np.stack([drop(x).asnumpy().ravel() for _ in range(2)]))\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120, check=True)
    return np.load(out)


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_masks(tmp_path):
    single = _drop_path_masks(0, 1, tmp_path / "single.npy")
    rank0, rank1 = (_drop_path_masks(r, 2, tmp_path / f"rank{r}.npy") for r in (0, 1))
    np.testing.assert_array_equal(single, rank0)  # a process replays its seed's masks: rank 0 is a single run
    assert not np.array_equal(rank0, rank1)


# ---------------------------------------------------------------- compile level and dataset sink mode

def test_jit_level_is_mindspores_default_unless_given(monkeypatch):
    calls: list[dict] = []
    real = ms.set_context
    monkeypatch.setattr(ms, "set_context", lambda **kwargs: (calls.append(kwargs), real(**{
        k: v for k, v in kwargs.items() if k != "jit_config"})))
    context.set_context(train_job(parse_config(["--device_target=CPU"])).context)
    assert not [c for c in calls if "jit_config" in c]
    context.set_context(train_job(parse_config(["--device_target=CPU", "--jit_level=O1"])).context)
    assert {"jit_config": {"jit_level": "O1"}} in calls


def test_sink_size_divides_the_epoch_and_a_resumed_epoch():
    assert steps.sink_size_for(625, 10) == 5 and steps.sink_size_for(40, 10) == 10
    assert steps.sink_size_for(7, 10) == 7 and steps.sink_size_for(13, 10) == 1 and steps.sink_size_for(4, 0) == 1
    # the case: resumed at step 4010 of 5004 (994 left): 9 would leave 4 batches in the queue
    assert steps.sink_size_for(5004, 10) == 9 and steps.sink_size_for(5004, 10, first_step=4010) == 2
    assert steps.sink_size_for(5004, 10, first_step=4014) == 9  # a call boundary: unchanged


def test_sink_mode_compiles_at_the_targets_default_level(monkeypatch):
    """--jit_level=auto is O0, and O2 on a 910A (MindSpore's default there); data_sink would turn an
    empty level into O0, and on a 910A then run one step where sink_size were counted."""
    levels = []
    monkeypatch.setattr(ms, "data_sink", lambda fn, dataset, sink_size=1, jit_config=None: levels.append(
        jit_config.jit_config_dict["jit_level"]))
    for level, on_910a in [("auto", False), ("auto", True), ("O1", True), ("O0", False)]:
        monkeypatch.setattr(steps, "ascend_910a", lambda: on_910a)
        steps.SinkSteps(nn.Dense(2, 2), None, 2, level)
    assert levels == ["O0", "O2", "O1", "O0"]


def _fake_data_sink(fn, dataset, sink_size=1, jit_config=None, input_signature=None):
    """MindSpore's data_sink as it behaves on a device: one pass of the dataset feeds the calls,
    each of which runs ``sink_size`` steps and returns the last step's output."""
    assert jit_config is not None and dataset.get_dataset_size() > 0
    batches = dataset.create_tuple_iterator(num_epochs=1)

    def run():
        out = None
        for _ in range(sink_size):
            out = fn(*next(batches))
        return out

    return run


SINK_BASE = ["--model=resnet18", "--image_size=32", "--batch_size=4", "--num_parallel_workers=1", "--lr=0.01",
             "--epoch_size=2", "--log_interval=2", "--scale", "1", "1", "--ratio", "1", "1", "--hflip=0",
             "--crop_pct=1.0", "--val_while_train=False", "--seed=3"]


@pytest.mark.slow
def test_dataset_sink_mode_trains_like_the_step_loop(tmp_path, monkeypatch, caplog):
    root = tmp_path / "data"
    write_imagenet_layout(str(root), per_class=5, size=32)  # 20 images: 5 steps of 4, sink calls of 1
    base = SINK_BASE + [f"--data_dir={root}", f"--output_path={tmp_path}"]
    plain = train(train_job_of(base + ["--dataset_sink_mode"]))  # CPU: says so and trains without
    assert "supports dataset sink mode on GPU and Ascend only, not on CPU; training without it" in caplog.text
    monkeypatch.setattr(steps, "SINK_TARGETS", ("CPU",))
    monkeypatch.setattr(ms, "data_sink", _fake_data_sink)
    sunk = train(train_job_of(base + ["--dataset_sink_mode", "--log_interval=10"]))
    assert "dataset sink mode: 5 steps per call, epochs 1-2 in one device queue" in caplog.text
    assert sunk["global_step"] == plain["global_step"] == 10
    assert sunk["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)  # every step's loss, not each call's last
    weights = [{k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(r["run_dir"], "ckpt_0",
                                                                          "resnet18-e002.ckpt")).items()
                if not k.startswith("meta.")} for r in (plain, sunk)]
    for name, value in weights[0].items():
        np.testing.assert_allclose(weights[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(ConfigError, match="mixup cannot stop at --mixup_off_epoch"):
        train(train_job_of(base + ["--dataset_sink_mode", "--mixup=0.2", "--mixup_off_epoch=1"]))


def _stopping_after(n: int, real):
    """steps.batch_steps that sends this process SIGUSR1 after ``n`` steps (a scheduler's warning)."""
    def run(*args, **kwargs):
        for done, item in enumerate(real(*args, **kwargs), 1):
            if done == n:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield item
    return run


def _final_weights(run_dir: str) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(run_dir, "ckpt_0", "resnet18-e002.ckpt")).items()
            if not k.startswith("meta.")}


@pytest.mark.slow
def test_sink_mode_resumed_mid_epoch_trains_every_batch_once(tmp_path, monkeypatch, caplog):
    """Stopped at step 3 of 5, resumed in sink mode (5 steps per call would leave 2 batches of epoch 1
    in the queue for epoch 2): the same weights as an uninterrupted run."""
    root = tmp_path / "data"
    write_imagenet_layout(str(root), per_class=5, size=32)
    base = SINK_BASE + [f"--data_dir={root}", f"--output_path={tmp_path}", "--log_interval=1"]
    plain = train(train_job_of(base))
    monkeypatch.setattr(steps, "SINK_TARGETS", ("CPU",))
    monkeypatch.setattr(ms, "data_sink", _fake_data_sink)
    real_batch_steps = steps.batch_steps
    monkeypatch.setattr("resgarden.training.trainer.batch_steps", _stopping_after(3, real_batch_steps))
    with pytest.raises(Preempted):
        train(train_job_of(base + [f"--output_path={tmp_path}/stopped"]))
    (run_dir,) = [os.path.join(tmp_path, "stopped", d) for d in os.listdir(tmp_path / "stopped")]
    monkeypatch.setattr("resgarden.training.trainer.batch_steps", real_batch_steps)
    resumed = train(train_job_of([f"--resume={run_dir}", "--dataset_sink_mode", "--log_interval=10"]))
    assert "resumed at step 3 of 5, so 1 steps per call" in caplog.text
    assert resumed["global_step"] == plain["global_step"] == 10
    reference = _final_weights(plain["run_dir"])
    for name, value in _final_weights(resumed["run_dir"]).items():
        np.testing.assert_allclose(value, reference[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _one_step_per_call(fn, dataset, sink_size=1, jit_config=None, input_signature=None):
    """data_sink as a compile that lost the device loop would run it: one step per call."""
    return _fake_data_sink(fn, dataset, 1, jit_config, input_signature)


@pytest.mark.slow
def test_a_sink_call_that_runs_fewer_steps_than_counted_stops_the_run(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_imagenet_layout(str(root), per_class=5, size=32)
    monkeypatch.setattr(steps, "SINK_TARGETS", ("CPU",))
    monkeypatch.setattr(ms, "data_sink", _one_step_per_call)
    with pytest.raises(StepCountError, match="the device ran 1 optimizer steps .* where the training loop counted 5"):
        train(train_job_of(SINK_BASE + [f"--data_dir={root}", f"--output_path={tmp_path}", "--dataset_sink_mode",
                                        "--log_interval=10"]))
