"""Launchers: Cloud TPU command lines (through a fake gcloud that runs them on fake workers),
the SLURM template and GPU launcher (through a fake srun), and real local multi-process training."""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from tiny_configs import TOY

from launch import gpu, local, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def launch_env(**extra):
    """The environment for a launcher subprocess: this repo importable, no zone from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in tpu.ZONE_ENV + (tpu.NAME_ENV, "CLOUDSDK_CORE_PROJECT")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def tpu_cli(*args, env=None, timeout=60):
    return subprocess.run(
        [PY, "-m", "launch.tpu", *args], cwd=ROOT, env=env or launch_env(), capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------
# Cloud TPU: dry-run command lines.


def test_create_single_host_v4_8_dry_run():
    res = tpu_cli("create", "--name=diffjax-v4", "--zone=us-central2-b", "--accelerator-type=v4-8", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create diffjax-v4 --zone=us-central2-b --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base"
    ]


@pytest.mark.parametrize(
    "accel,gcloud_type,runtime,hosts",
    [
        ("v4-32", "v4-32", "tpu-ubuntu2204-base", 4),
        ("v5e-32", "v5litepod-32", "v2-alpha-tpuv5-lite", 8),
        ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
        ("v5p-16", "v5p-16", "v2-alpha-tpuv5", 2),
        ("v6e-64", "v6e-64", "v2-alpha-tpuv6e", 16),
        ("v3-32", "v3-32", "tpu-ubuntu2204-base", 4),
    ],
)
def test_create_multi_host_dry_run(accel, gcloud_type, runtime, hosts):
    a = tpu.parse_accelerator(accel)
    assert (a.type, a.hosts, a.multi_host) == (gcloud_type, hosts, True)
    res = tpu_cli(
        "--dry-run",
        "--zone=us-west4-a",
        "create",
        "--name=pod",
        f"--accelerator-type={accel}",
        "--spot",
        "--project=my-proj",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"gcloud compute tpus tpu-vm create pod --zone=us-west4-a --project=my-proj --accelerator-type={gcloud_type} "
        f"--version={runtime} --spot"
    ]


def test_single_host_types():
    for accel in ("v4-8", "v5litepod-8", "v5e-4", "v6e-8", "v5p-8", "v2-8", "v6e-1"):
        assert tpu.parse_accelerator(accel).hosts == 1, accel


def test_queued_resource_and_delete_dry_run():
    env = launch_env(DIFFJAX_TPU_ZONE="us-central2-b", DIFFJAX_TPU_NAME="q1")  # zone and name from the env
    res = tpu_cli(
        "create", "--accelerator-type=v4-32", "--queued", "--spot", "--runtime-version=v2-alpha-tpuv4", "--dry-run", env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "gcloud compute tpus queued-resources create q1 --node-id=q1 --zone=us-central2-b --accelerator-type=v4-32 "
        "--runtime-version=v2-alpha-tpuv4 --spot"
    ]
    res = tpu_cli("delete", "--queued", "--dry-run", env=env)
    assert res.stdout.splitlines() == ["gcloud compute tpus queued-resources delete q1 --zone=us-central2-b --force --quiet"]
    res = tpu_cli("delete", "--dry-run", env=env)
    assert res.stdout.splitlines() == ["gcloud compute tpus tpu-vm delete q1 --zone=us-central2-b --quiet"]


def test_setup_dry_run_copies_the_repo_to_all_workers():
    res = tpu_cli("setup", "--name=pod", "--zone=us-central2-b", "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = [shlex.split(line) for line in res.stdout.splitlines()]
    assert lines[0] == ["git", "archive", "--format=tar.gz", "--output=/tmp/diffjax-src.tar.gz", "HEAD"]
    assert lines[1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "/tmp/diffjax-src.tar.gz",
        "pod:diffjax-src.tar.gz",
        "--zone=us-central2-b",
        "--worker=all",
    ]
    assert lines[2][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--worker=all"]
    script = lines[2][8].removeprefix("--command=")
    assert "tar -xzf diffjax-src.tar.gz -C diffjax" in script and "pip install -q -e '.[tpu]' gcsfs" in script
    clone = tpu_cli("setup", "--name=pod", "--zone=us-central2-b", "--dry-run", "--repo-url=https://example.com/d j.git")
    [line] = clone.stdout.splitlines()  # nothing copied: every worker clones
    assert "git clone -q 'https://example.com/d j.git' diffjax" in shlex.split(line)[8]


def test_run_dry_run_every_worker_gets_the_same_command():
    args = [
        "run",
        "--name=pod",
        "--zone=us-central2-b",
        "--accelerator-type=v4-32",
        "--config=configs/ddpm_cifar10.py",
        "--workdir=gs://bucket/runs/cifar 10",
        "--tfds-data-dir=gs://bucket/tfds",
        "--dry-run",
        "--",
        "--config.training.batch_size=256",
        "--config.data.dataset=folder:/mnt/my images",
    ]
    res = tpu_cli(*args)
    assert res.returncode == 0, res.stderr
    [line] = res.stdout.splitlines()  # one gcloud call: --worker=all runs it on all 4 hosts
    argv = shlex.split(line)
    assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--worker=all"]
    script = argv[8].removeprefix("--command=")
    assert (
        "nohup env TFDS_DATA_DIR=gs://bucket/tfds .venv/bin/diffjax train --config=configs/ddpm_cifar10.py "
        "'--workdir=gs://bucket/runs/cifar 10' --tpu --config.training.batch_size=256 "
        "'--config.data.dataset=folder:/mnt/my images' --no_progress" in script
    )


# ---------------------------------------------------------------------------------------------
# Cloud TPU: the real runner against a fake gcloud that runs ssh commands on fake workers.

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # Fake gcloud: records each call; `tpu-vm ssh --command` runs the command with bash on each
    # fake worker (a directory standing for its $HOME), as the real one does over ssh.
    import json, os, subprocess, sys
    root = os.environ["FAKE_TPU_ROOT"]
    argv = sys.argv[1:]
    with open(os.path.join(root, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        opts = dict(a[2:].split("=", 1) for a in argv[5:] if a.startswith("--") and "=" in a)
        n = int(os.environ["FAKE_TPU_WORKERS"])
        workers = range(n) if opts["worker"] == "all" else [int(opts["worker"])]
        code = 0
        for w in workers:
            home = os.path.join(root, f"worker{{w}}")
            env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(w))
            code |= subprocess.run(["bash", "-c", opts["command"]], cwd=home, env=env).returncode
        sys.exit(code)
    """)

FAKE_DIFFJAX = textwrap.dedent("""\
    #!{python}
    # Fake `.venv/bin/diffjax` on a fake worker: records argv and env, then trains until SIGTERM.
    import json, os, signal, sys, time
    record = {{"argv": sys.argv[1:], "tfds": os.environ.get("TFDS_DATA_DIR"), "cwd": os.getcwd()}}
    with open(os.path.join(os.environ["HOME"], "record.json"), "w") as f:
        json.dump(record, f)
    print("training on worker", os.environ["TPU_WORKER_ID"], flush=True)
    def term(signum, frame):
        print("SIGTERM: checkpoint saved", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    for _ in range(600):
        time.sleep(0.1)
    """)


@pytest.fixture
def fake_tpu(tmp_path):
    """A fake gcloud on PATH and 4 fake workers, each with the repo's venv script in ~/diffjax."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "gcloud").write_text(FAKE_GCLOUD.format(python=PY))
    (bindir / "gcloud").chmod(0o755)
    for w in range(4):
        venv_bin = tmp_path / f"worker{w}" / "diffjax" / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "diffjax").write_text(FAKE_DIFFJAX.format(python=PY))
        (venv_bin / "diffjax").chmod(0o755)
    env = launch_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_TPU_ROOT=str(tmp_path), FAKE_TPU_WORKERS="4")
    return tmp_path, env


def calls(root):
    path = root / "calls.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def lines_starting(text, prefix):
    return sum(line.startswith(prefix) for line in text.splitlines())


def wait_for(predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_run_logs_stop_on_fake_workers(fake_tpu):
    """4 workers get the identical command; arguments with spaces reach diffjax train intact."""
    root, env = fake_tpu
    common = ["--name=pod", "--zone=us-central2-b"]
    overrides = [
        "--config.training.batch_size=256",
        "--config.data.dataset=folder:/mnt/my images",
        "--config.model.name=it's quoted",
    ]
    res = tpu_cli(
        "run",
        *common,
        "--accelerator-type=v4-32",
        "--config=configs/ddpm_cifar10.py",
        "--workdir=gs://bucket/runs/cifar 10",
        "--tfds-data-dir=gs://bucket/tfds",
        "--",
        *overrides,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert lines_starting(res.stdout, "started on") == 4  # the workers' output, not the echoed command
    assert len(calls(root)) == 1  # one gcloud call for the 4 hosts
    assert wait_for(lambda: all((root / f"worker{w}" / "record.json").exists() for w in range(4)))
    records = [json.load(open(root / f"worker{w}" / "record.json")) for w in range(4)]
    expected = [
        "train",
        "--config=configs/ddpm_cifar10.py",
        "--workdir=gs://bucket/runs/cifar 10",
        "--tpu",
        *overrides,
        "--no_progress",
    ]
    for w, r in enumerate(records):
        assert r["argv"] == expected
        assert r["tfds"] == "gs://bucket/tfds"
        assert r["cwd"] == str(root / f"worker{w}" / "diffjax")
    assert wait_for(lambda: "training on worker 0" in tpu_cli("logs", *common, env=env).stdout)
    res = tpu_cli("stop", *common, env=env)
    assert res.returncode == 0 and lines_starting(res.stdout, "SIGTERM sent") == 4, res.stdout + res.stderr
    for w in range(4):
        log = root / f"worker{w}" / "diffjax-logs" / "train.log"
        assert wait_for(lambda: "SIGTERM: checkpoint saved" in log.read_text()), log.read_text()
    assert calls(root)[1][:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b"]


def test_run_foreground_streams_output(fake_tpu):
    root, env = fake_tpu
    for w in range(4):  # a quick fake: records, prints, exits
        script = root / f"worker{w}" / "diffjax" / ".venv" / "bin" / "diffjax"
        script.write_text(script.read_text().replace("for _ in range(600)", "for _ in range(0)"))
    res = tpu_cli(
        "run",
        "--name=pod",
        "--zone=us-central2-b",
        "--config=configs/digits.py",
        "--workdir=gs://bkt/w",
        "--foreground",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert sorted(line for line in res.stdout.splitlines() if line.startswith("training")) == [
        f"training on worker {w}" for w in range(4)
    ]
    assert json.load(open(root / "worker3" / "record.json"))["tfds"] is None


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["create", "--name=t", "--zone=us-central2-b", "--accelerator-type=v4-7"],
            "--accelerator-type 'v4-7': v4 has no size 7; allowed: v4-{8,16,32",
        ),
        (["create", "--name=t", "--zone=us-central2-b", "--accelerator-type=v9-8"], "unknown TPU generation 'v9'"),
        (
            ["create", "--name=t", "--zone=us-central2-b", "--accelerator-type=tpu"],
            "is not GENERATION-SIZE; allowed: v2-{8,",
        ),
        (["create", "--name=t", "--zone=us-central2-b"], "--accelerator-type is required; allowed: "),
        (["create", "--name=t", "--accelerator-type=v4-8"], "--zone is required (or set DIFFJAX_TPU_ZONE"),
        (["run", "--name=t", "--config=c.py", "--workdir=gs://bkt/w"], "--zone is required"),
        (["create", "--name=t", "--zone=uscentral", "--accelerator-type=v4-8"], "--zone 'uscentral' is not a zone name"),
        (["create", "--zone=us-central2-b", "--accelerator-type=v4-8"], "--name is required"),
        (
            ["create", "--name=t", "--zone=us-central2-b", "--accelerator-type=v4-8", "--spot", "--preemptible"],
            "exclude each other",
        ),
        (["run", "--name=t", "--zone=us-central2-b", "--config=c.py", "--workdir=/home/me/run"], "use a gs://BUCKET/PATH"),
        (
            [
                "run",
                "--name=t",
                "--zone=us-central2-b",
                "--config=c.py",
                "--workdir=/tmp/w",
                "--allow-local-workdir",
                "--accelerator-type=v4-32",
            ],
            "multi-host v4-32 (4 hosts) needs storage every worker sees",
        ),
        (
            ["run", "--name=t", "--zone=us-central2-b", "--config=c.py", "--workdir=gs://bkt/w", "--tfds-data-dir=/data"],
            "--tfds-data-dir '/data': use gs://",
        ),
        (["ssh", "--name=t", "--zone=us-central2-b", "--worker=all"], "interactive ssh goes to one worker"),
    ],
)
def test_bad_arguments_fail_before_any_gcloud_call(fake_tpu, args, message):
    root, env = fake_tpu
    res = tpu_cli(*args, env=env)  # not a dry run: a gcloud call would be recorded
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.startswith("launch.tpu: error: ")
    assert calls(root) == []


def test_real_runner_calls_gcloud_with_the_printed_argv(fake_tpu):
    root, env = fake_tpu
    res = tpu_cli("create", "--name=t", "--zone=europe-west4-a", "--accelerator-type=v5e-8", env=env)
    assert res.returncode == 0, res.stderr
    assert calls(root) == [
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "t",
            "--zone=europe-west4-a",
            "--accelerator-type=v5litepod-8",
            "--version=v2-alpha-tpuv5-lite",
        ]
    ]
    assert res.stdout.strip() == "+ " + shlex.join(["gcloud", *calls(root)[0]])


# ---------------------------------------------------------------------------------------------
# GPU: plain launcher and the SLURM template.


def test_first_host_of_slurm_nodelists():
    assert gpu.first_host("gpu[003-006,9],cpu1") == "gpu003"
    assert gpu.first_host("node7") == "node7"
    assert gpu.first_host("a,b[1-2]") == "a"
    assert gpu.first_host("rack[1-2]-node[01-04]") == "rack1-node01"


def test_resolve_sources():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[12-15]", "SLURM_JOB_ID": "123456"}
    assert gpu.resolve(None, None, None, None, slurm) == {
        "DIFFJAX_COORDINATOR_ADDRESS": "gpu12:23456",
        "DIFFJAX_NUM_PROCESSES": "4",
        "DIFFJAX_PROCESS_ID": "3",
    }
    assert gpu.resolve(None, None, None, 9999, slurm)["DIFFJAX_COORDINATOR_ADDRESS"] == "gpu12:9999"
    assert gpu.resolve("10.0.0.1:1234", 2, 1, None, slurm)["DIFFJAX_PROCESS_ID"] == "1"  # flags win
    torch_style = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert gpu.resolve(None, None, None, None, torch_style)["DIFFJAX_COORDINATOR_ADDRESS"] == "h0:29500"
    with pytest.raises(gpu.LaunchError, match="coordinator-address HOST:PORT"):
        gpu.resolve(None, None, None, None, {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(gpu.LaunchError, match="no process count"):
        gpu.resolve(None, None, None, None, {})
    with pytest.raises(gpu.LaunchError, match=r"not in \[0, 2\)"):
        gpu.resolve("h:1", 2, 2, None, {})


FAKE_SRUN = textwrap.dedent("""\
    #!{python}
    # Fake srun: starts SLURM_NTASKS copies of the command with the variables srun sets.
    import os, subprocess, sys
    n = int(os.environ["SLURM_NTASKS"])
    args = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
    procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_NODEID=str(i))) for i in range(n)]
    sys.exit(max(p.wait() for p in procs))
    """)

FAKE_TRAIN = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    out = os.path.join(os.environ["RECORD_DIR"], os.environ["DIFFJAX_PROCESS_ID"] + ".json")
    json.dump({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items() if k.startswith("DIFFJAX_")}}}},
              open(out, "w"))
    """)


def test_slurm_template_runs_one_identical_task_per_node(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("fake_diffjax", FAKE_TRAIN)):
        (bindir / name).write_text(text.format(python=PY))
        (bindir / name).chmod(0o755)
    env = launch_env(
        PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NTASKS="3",
        SLURM_JOB_ID="777",
        SLURM_JOB_NODELIST="gpu[07-09]",
        SLURM_JOB_NAME="digits",
        SLURM_SUBMIT_DIR=ROOT,
        PYTHON=PY,
        DIFFJAX=str(bindir / "fake_diffjax"),
        CONFIG="configs/digits.py",
        WORKDIR="/shared/runs/my run",
        RECORD_DIR=str(tmp_path),
    )
    res = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--config.training.batch_size=64"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    records = [json.load(open(tmp_path / f"{i}.json")) for i in range(3)]
    for i, r in enumerate(records):
        assert r["argv"] == [
            "train",
            "--config",
            "configs/digits.py",
            "--workdir",
            "/shared/runs/my run",
            "--no_progress",
            "--config.training.batch_size=64",
        ]
        launched = {k: v for k, v in r["env"].items() if k != "DIFFJAX_COMPILATION_CACHE"}  # set by conftest
        assert launched == {
            "DIFFJAX_COORDINATOR_ADDRESS": "gpu07:20777",
            "DIFFJAX_NUM_PROCESSES": "3",
            "DIFFJAX_PROCESS_ID": str(i),
        }


# ---------------------------------------------------------------------------------------------
# Local multi-process launcher.

TINY = TOY


def test_local_launcher_trains_with_two_processes(tmp_path):
    workdir = tmp_path / "two procs"
    cmd = [
        PY,
        os.path.join(ROOT, "launch", "local.py"),
        "--num-processes=2",
        "--devices-per-process=2",
        "--",
        "diffjax",
        "train",
        f"--workdir={workdir}",
        *TINY,
        "--config.training.n_iters=4",
        "--config.training.snapshot_freq=2",
    ]
    res = subprocess.run(
        cmd,
        cwd=ROOT,
        env=launch_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "[proc 0] done: step 4" in res.stdout and "[proc 1] done: step 4" in res.stdout
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*") if os.path.basename(p).isdigit())
    assert steps == [2, 4]
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [2, 4]  # process 0 logs


def test_local_env_replaces_the_device_count():
    env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"}, 1, 3, 2, 5555)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert (
        env["JAX_PLATFORMS"],
        env["DIFFJAX_COORDINATOR_ADDRESS"],
        env["DIFFJAX_NUM_PROCESSES"],
        env["DIFFJAX_PROCESS_ID"],
    ) == ("cpu", "127.0.0.1:5555", "3", "1")


def test_local_failure_stops_the_others(tmp_path):
    code = (
        "import os, sys, time\n"
        "if os.environ['DIFFJAX_PROCESS_ID'] == '1': print('failing'); sys.exit(7)\n"
        "print('waiting', flush=True); time.sleep(120)"
    )
    start = time.time()
    res = subprocess.run(
        [PY, os.path.join(ROOT, "launch", "local.py"), "-n", "3", "--", PY, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 7
    assert time.time() - start < 30
    assert "[proc 1] failing" in res.stdout and "process 1 exited with 7; stopping the others" in res.stdout


def test_local_forwards_sigterm(tmp_path):
    code = (
        "import os, signal, sys, time\n"
        "i = os.environ['DIFFJAX_PROCESS_ID']\n"
        "signal.signal(signal.SIGTERM, lambda s, f: (print('SIGTERM in', i, flush=True), sys.exit(0)))\n"
        "print('ready', i, flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [PY, os.path.join(ROOT, "launch", "local.py"), "-n", "2", "--", PY, "-c", code], stdout=subprocess.PIPE, text=True
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if sum("ready" in s for s in seen) == 2:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "[proc 0] SIGTERM in 0" in out and "[proc 1] SIGTERM in 1" in out
