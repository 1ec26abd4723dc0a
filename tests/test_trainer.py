"""The trainer as users run it: real processes, real orbax checkpoints, real kill -9."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny_configs import TOY, config_file_and_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny, fast config: the MLP on the 8-Gaussians, cheap snapshots.
TINY = TOY


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "diffjax", "train", f"--workdir={workdir}", *TINY, *extra]


def env(devices=1):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return e


def run(cmd, devices=1, timeout=300, cwd=ROOT):
    return subprocess.run(cmd, cwd=cwd, env=env(devices), capture_output=True, text=True, timeout=timeout)


def steps_in(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*") if os.path.basename(p).isdigit())


def final_params(workdir):
    """The latest checkpoint's params as numpy, read back through the trainer's own restore."""
    from diffjax.workdir import load_workdir

    *_, state, step = load_workdir(str(workdir))
    return step, [np.asarray(x) for x in jax.tree.leaves(state["params"])], np.asarray(state["rng"])


# The kill -9 test's uninterrupted reference: 40 steps, a checkpoint every 4 (the newest 3 kept:
# 32, 36, 40), an eval every 10. The corrupted-checkpoint tests copy it (they damage step 40).
KILL9 = ["--config.training.n_iters=40", "--config.training.snapshot_freq=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 40-step reference run, trained once for the module."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    # The reference run also evaluates (eval must not touch the training state or its RNG).
    res = run(train_cmd("ref", *KILL9, "--config.training.eval_freq=10"), cwd=cwd)  # relative workdir
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd / "ref"


def test_kill9_and_resume_is_bit_identical(uninterrupted, tmp_path):
    """Killed with kill -9 three times at random moments and resumed: bit-identical to an uninterrupted run."""
    ref, killed = uninterrupted, tmp_path / "killed"
    moments = np.random.default_rng(0)
    for at_least in (8, 16, 24):  # three kill -9s, each a random moment after that step is saved
        proc = subprocess.Popen(
            train_cmd(killed, *KILL9), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 240
        while time.time() < deadline and not any(s >= at_least for s in steps_in(killed)):
            time.sleep(0.05)
        time.sleep(moments.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 0 < max(steps_in(killed)) < 40, "the kill must land mid-run"
    res = run(train_cmd(killed, *KILL9))
    assert res.returncode == 0 and "resumed from step" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    step_a, params_a, rng_a = final_params(ref)
    step_b, params_b, rng_b = final_params(killed)
    assert step_a == step_b == 40
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rng_a, rng_b)
    # Logs: JSONL metrics with finite losses, TensorBoard events, sample grids at snapshots.
    lines = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    assert [m["step"] for m in lines if "loss" in m] == list(range(2, 41, 2))
    assert all(np.isfinite(m["loss"]) for m in lines if "loss" in m)
    evals = [(m["step"], m["eval_loss"]) for m in lines if "eval_loss" in m]
    assert [s for s, _ in evals] == [10, 20, 30, 40] and all(np.isfinite(v) for _, v in evals)
    assert glob.glob(f"{ref}/tensorboard/events.out.tfevents.*")
    assert os.path.exists(ref / "samples" / "step_00000040.png")


def data_fingerprints(workdir) -> dict[int, str]:
    """{step: fingerprint of the global batches since the previous log line} from metrics.jsonl."""
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = [m["step"] for m in lines if "data" in m]
    assert len(steps) == len(set(steps)), steps  # process 0 alone logs, each step once
    return {m["step"]: m["data"] for m in lines if "data" in m}


# One log line (with its data fingerprint) per step, one step per program, a checkpoint every 4.
PER_STEP = ["--config.training.log_freq=1", "--config.training.n_jitted_steps=1", "--config.training.snapshot_freq=4"]


def one_by_four(workdir, n, *extra):
    """Train to step n on 1 process x 4 devices; its stdout."""
    res = run(train_cmd(workdir, f"--config.training.n_iters={n}", *PER_STEP, *extra), devices=4)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def two_by_two(workdir, n, *extra):
    """Train to step n on 2 processes x 2 devices (launch/local.py: gloo over loopback); their stdout."""
    local = [sys.executable, f"{ROOT}/launch/local.py", "--num-processes=2", "--devices-per-process=2", "--"]
    res = run([*local, *train_cmd(workdir, f"--config.training.n_iters={n}", *PER_STEP, *extra)], timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def one_by_four_reference(tmp_path_factory):
    """An uninterrupted 8-step run on 1 process x 4 devices (plain data parallel), trained once for
    the module: the run the topology-change resumes and the two-slice run must reproduce."""
    ref = tmp_path_factory.mktemp("one_by_four") / "ref"
    one_by_four(ref, 8)
    want = data_fingerprints(ref)
    assert sorted(want) == list(range(1, 9)) and len(set(want.values())) == 8
    assert steps_in(ref) == [4, 8]
    return ref


def assert_params_match(workdir, ref):
    _, params_ref, _ = final_params(ref)
    step, params, _ = final_params(workdir)
    assert step == 8
    for x, y in zip(params, params_ref):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_resume_on_another_topology_continues_the_exact_input_order(one_by_four_reference, tmp_path):
    """2 processes x 2 devices (launch/local.py: gloo over loopback) train 4 steps and 1 process x 4
    devices resumes to 8, and 1 x 4 -> 2 x 2: every step reads the global batch an uninterrupted
    1 x 4 run reads (data fingerprints in metrics.jsonl; each process also checks the examples it
    read against the order), and the final params agree to float tolerance (the batch mean's
    reduction order differs across topologies)."""
    ref, a, b = one_by_four_reference, tmp_path / "a", tmp_path / "b"
    two_by_two(a, 4)
    assert "resumed from step 4" in one_by_four(a, 8)
    # 1 x 4 to step 4: the uninterrupted 1 x 4 run as it stood at its step-4 checkpoint (nothing in
    # training depends on n_iters), so its workdir without the step-8 checkpoint, not a 5th run;
    # the resume drops the log lines after step 4.
    shutil.copytree(ref, b)
    shutil.rmtree(b / "checkpoints" / "8")
    assert steps_in(b) == [4]
    assert "resumed from step 4" in two_by_two(b, 8)
    want = data_fingerprints(ref)
    assert data_fingerprints(a) == want and data_fingerprints(b) == want
    assert steps_in(a) == steps_in(b) == [4, 8]
    for w in (a, b):
        assert_params_match(w, ref)


def test_two_slices_over_dcn_match_one_process(one_by_four_reference, tmp_path):
    """Multislice on the CPU: 2 processes x 2 devices as two "slices" (training.dcn_data=2: a hybrid
    mesh from mesh_utils, data parallel across the processes, FSDP over the 2 devices within each)
    read the same batches and train the same losses and parameters as the uninterrupted 1 process
    x 4 devices run, to float tolerance (rtol 1e-4: only the reduction order of the batch mean
    differs)."""
    flags = ["--config.training.fsdp=True", "--config.training.dcn_data=2"]
    out = two_by_two(tmp_path / "two", 8, *flags)
    assert "mesh: data=2 x fsdp=2 over 4 devices, data parallel across 2 processes (DCN)" in out

    def losses(workdir):
        return [m["loss"] for m in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in m]

    assert len(losses(one_by_four_reference)) == 8
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(one_by_four_reference), rtol=1e-4)
    assert data_fingerprints(tmp_path / "two") == data_fingerprints(one_by_four_reference)
    assert_params_match(tmp_path / "two", one_by_four_reference)
    bad_flags = ["--config.training.n_iters=6", "--config.training.fsdp=True", "--config.training.dcn_data=3"]
    bad = run(train_cmd(tmp_path / "bad", *bad_flags), devices=4)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "diffjax train: training.dcn_data=3 must be 1, the number of TPU slices (1) or the number of processes (1) "
        "(0: the number of slices)"
    )


def test_a_workdir_the_other_processes_cannot_see_is_refused(tmp_path):
    """A multi-process run whose workdir is node-local (here: the same relative path from two
    different directories, as two nodes' local disks would be) stops on both processes with one
    line and exit 2, before anything is trained."""
    sys.path.insert(0, ROOT)
    from launch.local import free_port, process_env

    port = free_port()
    procs = []
    for i in range(2):
        node = tmp_path / f"node{i}"
        node.mkdir()
        procs.append(
            subprocess.Popen(
                train_cmd("w", "--config.training.n_iters=2"),
                cwd=node,
                env=process_env(env(), i, 2, 1, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, out[-2000:] + err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("diffjax train:")]
        assert lines == [
            "diffjax train: --workdir w is not shared: process(es) 0, 1 cannot see the files the other processes "
            "write there; use a gs:// bucket or a filesystem every node mounts"
        ], err[-2000:]
    assert not glob.glob(str(tmp_path / "node*" / "w" / "checkpoints" / "*"))


def test_processes_agree_on_the_step_to_restore(uninterrupted, tmp_path):
    """Two processes whose views of the workdir differ (process 1's copy of the newest step is
    truncated, as a host with a failed read would see it) both restore the previous step, which
    both can read: no hang, no mix of steps across hosts."""
    sys.path.insert(0, ROOT)
    from launch.local import free_port, process_env

    assert steps_in(uninterrupted) == [32, 36, 40]
    for i in range(2):
        (tmp_path / f"node{i}").mkdir()
        shutil.copytree(uninterrupted, tmp_path / f"node{i}" / "w")
    for path in glob.glob(f"{tmp_path}/node1/w/checkpoints/40/state/**/*", recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    port = free_port()
    cmd = [sys.executable, "-m", "diffjax", "sample", "--workdir=w", "--num=8", "--out=g.png"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path / f"node{i}",
            env=process_env(env(), i, 2, 1, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:
        assert "checkpoint step 40 in" in out and "is unreadable on process(es) 1" in out, out[-2000:]
    assert "8 samples from step 36" in outs[0]  # process 0 writes
    assert np.load(tmp_path / "node0" / "g.npz")["samples"].shape == (8, 2)
    assert not (tmp_path / "node1" / "g.npz").exists()


def test_corrupted_latest_checkpoint_falls_back(uninterrupted, tmp_path):
    workdir = tmp_path / "c"
    shutil.copytree(uninterrupted, workdir)
    for path in glob.glob(f"{workdir}/checkpoints/40/state/**/*", recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    res = run([sys.executable, "-m", "diffjax", "sample", f"--workdir={workdir}", "--num=16", f"--out={tmp_path / 'g.png'}"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "checkpoint step 40" in res.stdout and "unreadable" in res.stdout
    assert "from step 36" in res.stdout
    assert np.load(tmp_path / "g.npz")["samples"].shape == (16, 2)


def test_non_finite_loss_stops_without_saving(tmp_path):
    workdir = tmp_path / "nan"
    res = run(
        train_cmd(
            workdir,
            "--config.training.n_iters=20",
            "--config.training.snapshot_freq=2",
            "--config.optim.lr=1e30",
            "--config.optim.grad_clip=0.0",
        )
    )
    assert res.returncode == 3
    assert "non-finite loss" in res.stderr and "at step" in res.stderr
    bad_step = int(res.stderr.split("at step ")[1].split(";")[0])
    assert all(s < bad_step for s in steps_in(workdir))


@pytest.mark.parametrize(
    "extra,devices,message",
    [
        (["--config.training.batch_size=12"], 8, "training.batch_size=12 must be divisible by the device count 8"),
        (["--config.data.dataset=imagenet_typo"], 1, "data.dataset"),
        (["--config.training.bogus=1"], 1, "bogus"),
        (["--config.data.augment_p=0.12"], 1, "data.augment_p=0.12 needs model.augment_dim=9"),
        (["--config.data.augment_p=2", "--config.model.augment_dim=9"], 1, "data.augment_p must be in [0, 1]"),
        (["--config.training.ema_rate=1.5"], 1, "training.ema_rate=1.5 must be in [0, 1)"),
        (["--config.training.grad_accum_steps=0"], 1, "training.grad_accum_steps=0 must be >= 1"),
        (["--config.training.ema_rates=(0.5, 1.0)"], 1, "training.ema_rates: 1.0 must be a number in (0, 1)"),
    ],
)
def test_bad_input_errors(tmp_path, extra, devices, message):
    res = run(train_cmd(tmp_path / "w", "--config.training.n_iters=2", *extra), devices=devices)
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert "Traceback" not in res.stderr or message in res.stderr


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = run(train_cmd(blocker / "sub", "--config.training.n_iters=2"))
    assert res.returncode != 0 and "cannot write to --workdir" in res.stderr


def test_fsdp_switch_shards_kernels_and_trains(tmp_path):
    workdir = tmp_path / "fsdp"
    cmd = [
        sys.executable,
        "-m",
        "diffjax",
        "train",
        f"--workdir={workdir}",
        "--config=configs/digits.py",
        "--config.training.fsdp=True",
        # smaller programs to compile for 8 devices (nf 16 still splits 8 ways): one level of one
        # block, attention at 8x8 (and in the middle); with ch_mult (1, 2) compiling the init, the
        # train step and the snapshot's sampler took ~125 s of CPU here, ~65 s with (1,)
        "--config.model.num_res_blocks=1",
        "--config.model.ch_mult=(1,)",
        "--config.model.attn_resolutions=(8,)",
        "--config.training.batch_size=16",
        "--config.training.n_iters=2",
        "--config.training.n_jitted_steps=1",
        "--config.training.snapshot_freq=2",
        "--config.sampling.num_steps=2",
        "--config.training.eval_freq=0",
        "--no_progress",
    ]
    res = run(cmd, devices=8)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mesh: data=1 x fsdp=8 over 8 devices" in res.stdout
    from diffjax.workdir import Workdir

    w = Workdir(str(workdir), inference=True)  # this process has 8 devices too; nothing initialised
    state, step = w.restore(only=("params",))
    assert step == 2 and w.config.training.fsdp
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])]
    assert any("fsdp" in str(s) for s in specs)  # large kernels are split over the fsdp axis
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state["params"]))


def test_remote_workdir_logs_are_staged_and_shipped_in_the_background(tmp_path):
    """gs:// workdirs cannot be appended to: the logger stages files locally and a background thread
    ships them (never inside write()); a resume from step S drops the lines the interrupted run logged
    after S (exercised here with remote=True on a local directory standing in for the bucket; the
    GCS emulator tests run the real thing)."""
    from diffjax import plotting
    from diffjax.train import Logger

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    earlier = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 3, "loss": 0.8}]
    torn = '{"step": 4, "lo'  # the interrupted run was killed mid-line
    (bucket / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier) + torn)
    logger = Logger(str(bucket), True, remote=True, resume_step=2, upload_s=3600)  # resumed from step 2
    assert logger.samples_dir() != str(bucket)
    logger.write(3, {"loss": 0.5})
    assert len(open(bucket / "metrics.jsonl").readlines()) == 4  # nothing shipped by write()
    logger.upload()  # what the thread does every upload_s
    assert [json.loads(line)["step"] for line in open(bucket / "metrics.jsonl")] == [1, 2, 3]
    assert glob.glob(str(bucket / "tensorboard" / "events.out.tfevents.*"))
    png = os.path.join(logger.samples_dir(), "samples", "step_00000003.png")
    plotting.scatter_png([("x", np.zeros((4, 2)))], png)
    logger.image(3, "samples", png)
    logger.write(4, {"loss": 0.25})
    logger.close()  # the last upload
    assert (bucket / "samples" / "step_00000003.png").exists()
    assert [json.loads(line)["step"] for line in open(bucket / "metrics.jsonl")] == [1, 2, 3, 4]

    ticking = Logger(str(bucket), True, remote=True, resume_step=4, upload_s=0.05)
    ticking.write(5, {"loss": 0.125})
    deadline = time.time() + 30
    while time.time() < deadline and len(open(bucket / "metrics.jsonl").readlines()) < 5:
        time.sleep(0.05)
    assert [json.loads(line)["step"] for line in open(bucket / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    ticking.close()


def test_eval_loss_is_compiled_once_and_scores_the_ema_weights():
    """snapshots.EvalLoss: one held-out batch read and one compilation for the whole run."""
    from diffjax import data, losses, snapshots, trainer
    from diffjax.info import load_config

    config = load_config(f"{ROOT}/configs/toy/eight_gaussians.py", ["--config.training.batch_size=32"])
    mesh = trainer.make_mesh(config)
    state, _, graphdef, rest = trainer.init_state(config, mesh)
    process = trainer.build_process(config)
    evaluate = snapshots.EvalLoss(config, graphdef, rest, process)
    held_out = next(data.make_iterator(config, "eval", seed=0))["x"]
    np.testing.assert_array_equal(np.asarray(evaluate.batch["x"]), held_out)

    def direct(weights):
        den = trainer.network_denoiser(graphdef, rest, process, config, weights)
        return float(losses.loss(config.training.loss, den, process, evaluate.batch, jax.random.PRNGKey(0)))

    first = evaluate(state)
    np.testing.assert_allclose(first, direct(state["ema"]), rtol=1e-5)
    # The EMA weights are scored, not the raw params; a new state reuses the compiled loss.
    moved = dict(state, ema=jax.tree.map(lambda w: w * 0.5, state["ema"]))
    second = evaluate(moved)
    assert second != first
    np.testing.assert_allclose(second, direct(moved["ema"]), rtol=1e-5)
    assert evaluate.loss._cache_size() == 1


def test_data_workers_train_and_resume(tmp_path):
    """--data_workers: the input runs in grain worker processes and a resume starts them at the
    step's global batch (the trainer checks the examples read against the order; the logged
    fingerprints are the order's)."""
    from diffjax import data
    from diffjax.configuration import load_config

    workdir = tmp_path / "w"
    first = run(train_cmd(workdir, "--config.training.n_iters=4", "--config.training.snapshot_freq=4", "--data_workers=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    again = run(train_cmd(workdir, "--config.training.n_iters=8", "--config.training.snapshot_freq=4", "--data_workers=2"))
    assert again.returncode == 0 and "resumed from step 4" in again.stdout, again.stderr[-2000:]
    assert max(steps_in(workdir)) == 8
    order = data.GlobalOrder(load_config(*config_file_and_overrides(TINY)))
    assert data_fingerprints(workdir) == {s: data.fingerprint(order.indices(s - 2, 2)) for s in (2, 4, 6, 8)}
    bad = run(train_cmd(tmp_path / "b", "--data_workers=-1"))
    assert bad.returncode == 2 and "argument --data_workers: must be >= 0, got -1" in bad.stderr


@pytest.mark.parametrize(
    "rates,bad",
    [
        ("(1.0,)", "1.0"),
        ("(0.0,)", "0.0"),
        ("(0.5, 0.5)", "0.5 is listed twice"),
        ("(0.5, 0.9)", "0.9 is training.ema_rate"),
    ],
)
def test_bad_ema_rates_are_refused(rates, bad):
    """training.ema_rates: each in (0, 1) (ema_rate itself may be 0), distinct, none equal to ema_rate."""
    from diffjax.configuration import load_config

    with pytest.raises(ValueError, match="training.ema_rates") as err:
        load_config(
            f"{ROOT}/configs/toy/eight_gaussians.py",
            [f"--config.training.ema_rates={rates}", "--config.training.ema_rate=0.9"],
        )
    assert bad in str(err.value)
    load_config(f"{ROOT}/configs/toy/eight_gaussians.py", ["--config.training.ema_rate=0.0"])  # still allowed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ema_moves_only_when_grad_accumulation_applies_an_update(dtype):
    """grad_accum_steps=4: params change at micro-steps 4 and 8 only, and the EMA equals the one
    computed from those two applied updates (it used to move at every micro-step); so does each
    extra EMA of training.ema_rates, kept in state["ema_extra"] (same shardings as the params).
    bfloat16 compute keeps params and every EMA in float32."""
    from diffjax import trainer
    from diffjax.configuration import load_config

    config = load_config(
        f"{ROOT}/configs/toy/eight_gaussians.py",
        [
            "--config.training.batch_size=32",
            "--config.training.grad_accum_steps=4",
            "--config.training.ema_rate=0.9",
            "--config.training.ema_rates=(0.5,)",
            "--config.optim.warmup=0",
            f"--config.model.dtype={dtype}",
        ],
    )
    mesh = trainer.make_mesh(config)
    state, shardings, graphdef, rest = trainer.init_state(config, mesh)
    assert set(state["ema_extra"]) == {"0.5"} and shardings["ema_extra"]["0.5"] == shardings["params"]
    step = trainer.make_train_step(config, graphdef, rest, trainer.build_process(config), shardings, mesh)
    ema = jax.tree.map(np.asarray, state["ema"])
    fast = jax.tree.map(np.asarray, state["ema_extra"]["0.5"])
    params = [jax.tree.map(np.asarray, state["params"])]
    rng = np.random.default_rng(0)
    for _ in range(8):
        batch = {"x": rng.normal(size=(1, 32, 2)).astype(np.float32)}
        state, _ = step(state, batch)
        params.append(jax.tree.map(np.asarray, state["params"]))
    moved = [
        i
        for i in range(1, 9)
        if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[i]), jax.tree.leaves(params[i - 1])))
    ]
    assert moved == [4, 8]
    for i in moved:
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params[i])
        fast = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, fast, params[i])
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7), state["ema"], ema)
    got = state["ema_extra"]["0.5"]
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7), got, fast)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves((got, state["ema"], state["params"])))
    # no ema_extra entry when ema_rates is empty: old checkpoints restore as before
    plain = load_config(f"{ROOT}/configs/toy/eight_gaussians.py", ["--config.training.batch_size=32"])
    assert "ema_extra" not in trainer.state_layout(plain, mesh)[0]


def test_sample_picks_the_ema_with_ema_flag(tmp_path):
    """A real run tracking ema_rates=(0.5,) beside ema_rate=0.9: `diffjax sample --ema` reads either
    EMA (just that one), the samples differ, and an untracked rate is one line naming it, exit 2."""
    from diffjax.workdir import Workdir, load_workdir

    workdir = tmp_path / "w"
    # 16 steps at lr 1e-2: enough for samples inside the data range (an untrained MLP's are all clipped)
    flags = ["--config.training.n_iters=16", "--config.training.snapshot_freq=16", "--config.optim.lr=1e-2"]
    rates = ["--config.training.ema_rate=0.9", "--config.training.ema_rates=(0.5,)"]
    res = run(train_cmd(workdir, *flags, *rates))
    assert res.returncode == 0, res.stderr[-2000:]
    *_, full, _ = load_workdir(str(workdir))
    assert set(full["ema_extra"]) == {"0.5"}
    fast, _ = Workdir(str(workdir), inference=True, ema=0.5).restore(only=("ema",))
    assert set(fast) == {"ema"}
    jax.tree.map(np.testing.assert_array_equal, fast["ema"], full["ema_extra"]["0.5"])
    default, _ = Workdir(str(workdir), inference=True).restore(only=("ema",))
    jax.tree.map(np.testing.assert_array_equal, default["ema"], full["ema"])

    def sample(*flags):
        cmd = [sys.executable, "-m", "diffjax", "sample", f"--workdir={workdir}", "--num=16", *flags]
        return run(cmd, cwd=tmp_path)

    samples = {}
    for rate in ("0.5", "0.9"):
        res = sample(f"--ema={rate}", f"--out={tmp_path}/{rate}.png")
        assert res.returncode == 0 and f"(EMA {rate})" in res.stdout, res.stderr[-2000:]
        samples[rate] = np.load(tmp_path / f"{rate}.npz")["samples"]
    assert not np.allclose(samples["0.5"], samples["0.9"])
    bad = sample("--ema=0.7")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "0.7" in bad.stderr and "0.9, 0.5" in bad.stderr, bad.stderr


def test_progress_counts_finished_steps_not_dispatched_ones():
    """train.FinishedSteps: a dispatched step still computing (here ~1 s of matmuls, checked right
    after dispatch) is not counted, nor any after it; once it finishes every step is, in order."""
    import jax.numpy as jnp

    from diffjax.train import FinishedSteps

    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 100, lambda i, y: jnp.tanh(y @ y), x))
    x = jnp.full((512, 512), 0.01)
    slow(x).block_until_ready()  # compiled
    counter = FinishedSteps(10)
    counter.dispatched(15, jnp.ones(5))  # steps 11-15, computed
    counter.dispatched(20, slow(x))  # steps 16-20, still running
    counter.dispatched(25, jnp.ones(5))  # computed, but after a running one
    assert counter.count() == 15
    assert counter.count(wait=True) == 25 and counter.count() == 25


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
    """Multi-host preemption: SIGTERM reaches process 1 only; JAX's preemption service makes both
    processes agree on the step, both save it (orbax: each writes its part) and exit 0, and a
    resume continues from it."""
    import socket

    workdir = tmp_path / "pre"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["--config.training.n_iters=100000", "--config.training.snapshot_freq=100000"]
    procs = [
        subprocess.Popen(
            [
                *train_cmd(workdir, *common),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env(devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not os.path.exists(workdir / "metrics.jsonl"):
            time.sleep(0.1)
        while time.time() < deadline and len(open(workdir / "metrics.jsonl").readlines()) < 3:
            time.sleep(0.1)  # training is under way on both processes
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    (saved,) = steps_in(workdir)  # one checkpoint: the agreed step, written by both processes
    assert 0 < saved < 100000
    # (orbax finalises a step only once every process has written its part)
    assert all(f"SIGTERM at step {saved}" in out for out in outputs), outputs
    res = run(train_cmd(workdir, f"--config.training.n_iters={saved + 4}", "--config.training.snapshot_freq=100000"))
    assert res.returncode == 0 and f"resumed from step {saved}" in res.stdout, res.stderr[-2000:]
    assert steps_in(workdir)[-1] == saved + 4
