"""Launchers: Cloud TPU command lines (through a fake gcloud that runs them on fake workers),
the SLURM template and GPU launcher (through a fake srun), and real local multi-process training."""

import glob
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
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
    assert "tar -xzf diffjax-src.tar.gz -C diffjax" in script
    # Pinned by the lock (jax / jaxlib included; libtpu follows jax's pin); gcsfs is a base dependency now.
    assert "pip install -q -c requirements.lock -e '.[tpu]'" in script and "gcsfs" not in script
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
        node = argv[4]  # a multislice TPU's nodes have their own workers: root/NODE/worker{{w}}
        base = os.path.join(root, node) if os.path.isdir(os.path.join(root, node)) else root
        code = 0
        for w in workers:
            home = os.path.join(base, f"worker{{w}}")
            env = dict(os.environ, HOME=home, TPU_WORKER_ID=str(w), FAKE_NODE=node)
            code |= subprocess.run(["bash", "-c", opts["command"]], cwd=home, env=env).returncode
        sys.exit(code)
    """)

FAKE_DIFFJAX = textwrap.dedent("""\
    #!{python}
    # Fake `.venv/bin/diffjax` on a fake worker: records argv and env, then trains until SIGTERM.
    import json, os, signal, sys, time
    record = {{"argv": sys.argv[1:], "tfds": os.environ.get("TFDS_DATA_DIR"), "cwd": os.getcwd()}}
    path = os.path.join(os.environ["HOME"], "record.json")
    with open(path + ".tmp", "w") as f:  # then renamed: the test polls for the file, which must be whole
        json.dump(record, f)
    os.replace(path + ".tmp", path)
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
        (
            ["create", "ms", "--zone=us-east5-a", "--accelerator=v5p-16", "--spot", "--num-slices=2"],
            "--num-slices 2 needs --queued",
        ),
        (
            ["create", "ms", "--zone=us-east5-a", "--accelerator=v3-32", "--queued", "--num-slices=2"],
            "multislice needs TPU v4 or later, not v3-32",
        ),
        (["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--num-slices=0"], "--num-slices 0: the number"),
        (
            ["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--labels=Team=ml"],
            "key 'Team' must start with a lowercase letter",
        ),
        (
            ["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--labels=team=ML"],
            "value 'ML' of 'team' may have only lowercase letters",
        ),
        (["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--labels=team"], "'team' is not KEY=VALUE"),
        (["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--labels=a=1,a=2"], "key 'a' is given twice"),
        (["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--network=My_VPC"], "--network 'My_VPC' is not"),
        (
            ["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--subnetwork=projects/p/global/networks/n"],
            "--subnetwork 'projects/p/global/networks/n' is not a subnetwork name",
        ),
        (
            ["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--service-account=robot"],
            "--service-account 'robot' is not a service account email",
        ),
        (["create", "t", "--zone=us-east5-a", "--accelerator=v5p-8", "--reserved", "--spot"], "--reserved and --spot"),
        (
            [
                "run",
                "ms",
                "--zone=us-east5-a",
                "--num-slices=2",
                "--config=c.py",
                "--workdir=/tmp/w",
                "--allow-local-workdir",
            ],
            "2 slices need storage every worker sees",
        ),
        (["ssh", "ms", "--zone=us-east5-a", "--num-slices=2", "--node=2", "--", "ls"], "--node '2': a slice index 0..1"),
        (["sample", "t", "--zone=us-east5-a"], "give the diffjax sample arguments after --"),
        (
            [
                "supervise",
                "t",
                "--zone=us-east5-a",
                "--accelerator=v4-8",
                "--config=c.py",
                "--workdir=gs://bkt/w",
                "--poll-interval=0",
            ],
            "--poll-interval 0.0: seconds, more than 0",
        ),
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
# Cloud TPU: create flags, multislice, sample / eval.


def test_create_passes_network_account_labels_through():
    res = tpu_cli(
        "create",
        "t",
        "--zone=us-central2-b",
        "--accelerator-type=v4-8",
        "--network=my-vpc",
        "--subnetwork=projects/my-proj/regions/us-central2/subnetworks/tpu-subnet",
        "--service-account=trainer@my-proj.iam.gserviceaccount.com",
        "--internal-ips",
        "--reserved",
        "--labels=team=gen-ai,run=ddpm_cifar10,empty=",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create t --zone=us-central2-b --accelerator-type=v4-8 --version=tpu-ubuntu2204-base "
        "--network=my-vpc --subnetwork=projects/my-proj/regions/us-central2/subnetworks/tpu-subnet "
        "--service-account=trainer@my-proj.iam.gserviceaccount.com --internal-ips --reserved "
        "--labels=team=gen-ai,run=ddpm_cifar10,empty="
    ]
    res = tpu_cli("create", "q", "--zone=us-central2-b", "--accelerator=v4-8", "--queued", "--labels=a=b", "--dry-run")
    assert res.stdout.splitlines() == [
        "gcloud compute tpus queued-resources create q --node-id=q --zone=us-central2-b --accelerator-type=v4-8 "
        "--runtime-version=tpu-ubuntu2204-base --labels=a=b"
    ]
    assert tpu.parse_labels("k=v,k2=") == "k=v,k2="
    with pytest.raises(tpu.LaunchError, match="at most 64"):
        tpu.parse_labels(",".join(f"k{i}=v" for i in range(65)))


MS = ["--zone=us-east5-a", "--num-slices=2"]  # a 2-slice TPU named ms: nodes ms-0 and ms-1


def test_multislice_v5p_16_dry_run():
    res = tpu_cli(
        "--dry-run",
        "create",
        "ms",
        "--zone",
        "us-east5-a",
        "--accelerator",
        "v5p-16",
        "--queued",
        "--spot",
        "--num-slices",
        "2",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "gcloud compute tpus queued-resources create ms --node-count=2 --node-prefix=ms --zone=us-east5-a "
        "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot"
    ]

    res = tpu_cli("--dry-run", "setup", "ms", *MS)  # one archive, then every node: scp + install
    assert res.returncode == 0, res.stderr
    lines = [shlex.split(line) for line in res.stdout.splitlines()]
    assert lines[0] == ["git", "archive", "--format=tar.gz", "--output=/tmp/diffjax-src.tar.gz", "HEAD"]
    assert [line[:8] for line in lines[1:]] == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "/tmp/diffjax-src.tar.gz",
            "ms-0:diffjax-src.tar.gz",
            "--zone=us-east5-a",
        ],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ms-0", "--zone=us-east5-a", "--worker=all"],
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "/tmp/diffjax-src.tar.gz",
            "ms-1:diffjax-src.tar.gz",
            "--zone=us-east5-a",
        ],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ms-1", "--zone=us-east5-a", "--worker=all"],
    ]
    assert lines[1][8:] == lines[3][8:] == ["--worker=all"] and lines[2][8] == lines[4][8]  # the same install

    run = ["ms", *MS, "--config=configs/ddpm_cifar10.py", "--workdir=gs://bkt/runs/ms", "--tfds-data-dir=gs://bkt/tfds"]
    res = tpu_cli("--dry-run", "run", *run, "--", "--config.training.batch_size=512")
    lines = [shlex.split(line) for line in res.stdout.splitlines()]
    assert [line[:8] for line in lines] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--zone=us-east5-a", "--worker=all"]
        for node in ("ms-0", "ms-1")
    ]
    script = lines[0][8].removeprefix("--command=")
    assert lines[1][8] == lines[0][8] and "nohup env TFDS_DATA_DIR=gs://bkt/tfds .venv/bin/diffjax train" in script
    # The TPU runtime gives every worker its MEGASCALE_* settings; the script must not override them.
    assert "MEGASCALE" not in script and "JAX_" not in script and script.count("=gs://bkt/tfds") == 1

    res = tpu_cli("--dry-run", "run", *run, "--foreground")  # every slice must join: both ssh at once
    out = res.stdout.splitlines()
    assert [line.endswith(" &") for line in out] == [True, True, False] and out[2] == "wait"
    assert [shlex.split(line.removesuffix(" &"))[5] for line in out[:2]] == ["ms-0", "ms-1"]

    res = tpu_cli("--dry-run", "delete", "ms", *MS)  # one queued resource; --force takes its nodes
    assert res.stdout.splitlines() == ["gcloud compute tpus queued-resources delete ms --zone=us-east5-a --force --quiet"]
    res = tpu_cli("--dry-run", "stop", "ms", *MS)
    assert [shlex.split(line)[5] for line in res.stdout.splitlines()] == ["ms-0", "ms-1"]
    res = tpu_cli("--dry-run", "logs", "ms", *MS, "--node=1", "--worker=3", "-f")
    assert shlex.split(res.stdout)[5:9] == [
        "ms-1",
        "--zone=us-east5-a",
        "--worker=3",
        "--command=tail -n 100 -F $HOME/diffjax-logs/train.log",
    ]
    res = tpu_cli("--dry-run", "ssh", "ms", *MS, "--worker=all", "--internal-ip", "--", "uptime")
    assert [shlex.split(line)[5:] for line in res.stdout.splitlines()] == [
        [node, "--zone=us-east5-a", "--worker=all", "--internal-ip", "--command=uptime"] for node in ("ms-0", "ms-1")
    ]


FAKE_JOB = textwrap.dedent("""\
    #!{python}
    # Fake `.venv/bin/diffjax` for sample / eval: records argv, prints one line, exits (3 on FAKE_JOB_FAIL).
    import json, os, sys
    node, w = os.environ["FAKE_NODE"], os.environ["TPU_WORKER_ID"]
    with open(os.path.join(os.environ["HOME"], "job.json"), "w") as f:
        json.dump({{"argv": sys.argv[1:], "tfds": os.environ.get("TFDS_DATA_DIR")}}, f)
    print(sys.argv[1], "output of", node, "worker", w, flush=True)
    sys.exit(3 if os.environ.get("FAKE_JOB_FAIL") == node + "/" + w else 0)
    """)


@pytest.fixture
def fake_multislice(tmp_path):
    """The fake gcloud and a 2-slice TPU `ms`: nodes ms-0 and ms-1, 2 workers each."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "gcloud").write_text(FAKE_GCLOUD.format(python=PY))
    (bindir / "gcloud").chmod(0o755)
    for node in ("ms-0", "ms-1"):
        for w in range(2):
            venv_bin = tmp_path / node / f"worker{w}" / "diffjax" / ".venv" / "bin"
            venv_bin.mkdir(parents=True)
            (venv_bin / "diffjax").write_text(FAKE_JOB.format(python=PY))
            (venv_bin / "diffjax").chmod(0o755)
    env = launch_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_TPU_ROOT=str(tmp_path), FAKE_TPU_WORKERS="2")
    return tmp_path, env


def test_sample_on_every_worker_shows_worker_0(fake_multislice):
    root, env = fake_multislice
    args = ["--workdir=gs://bkt/runs/my run", "--num=64", "--out=gs://bkt/grid.png"]
    res = tpu_cli("sample", "ms", *MS, "--tfds-data-dir=gs://bkt/tfds", "--", *args, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [line for line in res.stdout.splitlines() if "output of" in line] == ["sample output of ms-0 worker 0"]
    assert sorted(c[4] for c in calls(root)) == ["ms-0", "ms-1"]  # one ssh per slice, --worker=all
    for node in ("ms-0", "ms-1"):
        for w in range(2):
            home = root / node / f"worker{w}"
            assert json.load(open(home / "job.json")) == {"argv": ["sample", *args, "--tpu"], "tfds": "gs://bkt/tfds"}
            assert (home / "diffjax-logs" / "sample.log").read_text() == f"sample output of {node} worker {w}\n"


def test_eval_failure_on_another_worker_is_shown(fake_multislice):
    root, env = fake_multislice
    env["FAKE_JOB_FAIL"] = "ms-1/1"
    res = tpu_cli("eval", "ms", *MS, "--", "run", "--workdir=gs://bkt/runs/r", env=env)
    assert res.returncode == 3
    assert "eval output of ms-0 worker 0" in res.stdout  # worker 0 streams
    assert "eval failed (3) on" in res.stdout and "worker 1; the end of" in res.stdout
    assert "eval output of ms-1 worker 1" in res.stdout  # the failing worker's log tail
    assert "eval output of ms-1 worker 0" not in res.stdout
    assert json.load(open(root / "ms-1" / "worker0" / "job.json"))["argv"] == [
        "eval",
        "run",
        "--workdir=gs://bkt/runs/r",
        "--tpu",
    ]


# ---------------------------------------------------------------------------------------------
# Cloud TPU: supervise through a fake gcloud that plays preemptions.

FAKE_GCLOUD_PREEMPT = textwrap.dedent("""\
    #!{python}
    # Fake gcloud for supervise: records argv; the TPU's state lives in a file. describe prints it
    # (NOT_FOUND without one), create makes it READY (a queued resource: ACTIVE), delete removes it.
    # The training ssh of the first FAKE_PREEMPTIONS rounds (a round: a create) preempts the TPU
    # (PREEMPTED / SUSPENDED) and fails; later ones exit 0. FAKE_RUN_FAILS: the run exits 3 and
    # the TPU stays READY. scp and the setup ssh succeed.
    import json, os, sys
    root = os.environ["FAKE_TPU_ROOT"]
    argv = sys.argv[1:]
    calls = os.path.join(root, "calls.jsonl")
    with open(calls, "a") as f:
        f.write(json.dumps(["gcloud"] + argv) + "\\n")
    state = os.path.join(root, "state")
    queued, verb = argv[2] == "queued-resources", argv[3]
    def write(text):  # atomic: a parallel ssh stopped mid-write leaves no empty state
        open(state + str(os.getpid()), "w").write(text)
        os.replace(state + str(os.getpid()), state)
    if verb == "describe":
        if not os.path.exists(state):
            sys.exit("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource 'x' was not found")
        print(open(state).read())
    elif verb == "create":
        write("ACTIVE" if queued else "READY")
    elif verb == "delete":
        os.remove(state)
    elif verb == "ssh" and any("diffjax train" in a for a in argv):
        if os.environ.get("FAKE_RUN_FAILS"):
            sys.exit(3)
        creates = sum('"create"' in line for line in open(calls))
        if creates <= int(os.environ.get("FAKE_PREEMPTIONS", "0")):
            write("SUSPENDED" if os.environ.get("FAKE_QUEUED") else "PREEMPTED")
            sys.exit(255)  # ssh: connection closed
    """)

FAKE_GIT = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    with open(os.path.join(os.environ["FAKE_TPU_ROOT"], "calls.jsonl"), "a") as f:
        f.write(json.dumps(["git"] + sys.argv[1:]) + "\\n")
    open([a for a in sys.argv if a.startswith("--output=")][0].split("=", 1)[1], "wb").close()
    """)


@pytest.fixture
def fake_preempting_tpu(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD_PREEMPT), ("git", FAKE_GIT)):
        (bindir / name).write_text(text.format(python=PY))
        (bindir / name).chmod(0o755)
    env = launch_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_TPU_ROOT=str(tmp_path))
    return tmp_path, env


def kinds(root):
    """The recorded calls, shortly: 'describe', 'create', 'scp ms-0', 'ssh setup', 'ssh train ms-1', ..."""
    out = []
    for call in calls(root):
        if call[0] == "git":
            out.append("git " + call[1])
            continue
        verb = call[4]
        node = call[6].split(":")[0] if verb == "scp" else call[5]
        what = {"ssh": "ssh train" if any("diffjax train" in a for a in call) else "ssh setup"}.get(verb, verb)
        out.append(what + (f" {node}" if node.startswith("ms-") else ""))
    return out


def supervise(root, env, *args, timeout=120):
    fast = ["--poll-interval=0.05", "--watch-interval=60", "--settle=0.3", f"--archive={root / 'src.tar.gz'}"]
    return tpu_cli(
        "supervise",
        *args,
        *fast,
        "--config=configs/ddpm_cifar10.py",
        "--workdir=gs://bkt/runs/sup",
        "--",
        "--config.training.n_iters=1000",
        env=env,
        timeout=timeout,
    )


ROUND = ["describe", "git archive", "scp", "ssh setup", "ssh train"]  # after a create: READY, setup, run


def test_supervise_recreates_a_preempted_tpu_and_runs_again(fake_preempting_tpu):
    root, env = fake_preempting_tpu
    env["FAKE_PREEMPTIONS"] = "1"
    start = time.time()
    res = supervise(root, env, "sup", "--zone=us-central2-b", "--accelerator-type=v4-8", "--spot", "--max-restarts=2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.time() - start < 60
    assert kinds(root) == ["describe", "create", *ROUND, "describe", "delete", "create", *ROUND]
    recorded = calls(root)
    assert recorded[0][1:] == [
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        "sup",
        "--zone=us-central2-b",
        "--format=value(state)",
    ]
    assert recorded[1][1:] == [
        *["compute", "tpus", "tpu-vm", "create", "sup", "--zone=us-central2-b", "--accelerator-type=v4-8"],
        *["--version=tpu-ubuntu2204-base", "--spot"],
    ]
    assert recorded[8][1:] == ["compute", "tpus", "tpu-vm", "delete", "sup", "--zone=us-central2-b", "--quiet"]
    train = [c for c in recorded if c[0] == "gcloud" and c[4] == "ssh" and "diffjax train" in c[-1]]
    assert len(train) == 2 and train[0] == train[1]  # the same foreground command both times: it resumes
    assert "--config.training.n_iters=1000" in train[0][-1] and "| tee" in train[0][-1]
    log = [line for line in res.stdout.splitlines() if line.startswith("[supervise ")]
    assert all(re.match(r"\[supervise \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] ", line) for line in log)
    actions = [line.split("] ", 1)[1] for line in log]
    expected = ["sup: not found", "create sup", "sup: READY", "setup on sup", "run on sup", "run exited with 255"]
    expected += ["sup: PREEMPTED", "restart 1/2: sup is PREEMPTED", "delete sup", "run finished with exit 0: done"]
    assert [a for a in actions if a in expected] == [
        *expected[:6],
        *["sup: PREEMPTED", "restart 1/2: sup is PREEMPTED", "delete sup", "create sup", "sup: READY", "setup on sup"],
        *["run on sup", "run finished with exit 0: done"],
    ]


def test_supervise_gives_up_after_max_restarts(fake_preempting_tpu):
    root, env = fake_preempting_tpu
    env["FAKE_PREEMPTIONS"] = "99"
    res = supervise(root, env, "sup", "--zone=us-central2-b", "--accelerator-type=v4-8", "--spot", "--max-restarts=1")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "launch.tpu: error: supervise: sup is PREEMPTED; --max-restarts 1 reached after 1 restart(s), giving up "
        "(the TPU is left as it is)"
    ]
    assert kinds(root) == ["describe", "create", *ROUND, "describe", "delete", "create", *ROUND, "describe"]


def test_supervise_does_not_retry_a_failure_on_a_ready_tpu(fake_preempting_tpu):
    root, env = fake_preempting_tpu
    env["FAKE_RUN_FAILS"] = "1"
    res = supervise(root, env, "sup", "--zone=us-central2-b", "--accelerator-type=v4-8")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "launch.tpu: error: supervise: run exited with 3 while sup is READY: not a preemption, not retried"
    ]
    assert "delete" not in kinds(root) and kinds(root)[-1] == "describe"


def test_supervise_multislice_reruns_every_slice(fake_preempting_tpu):
    root, env = fake_preempting_tpu
    env.update(FAKE_PREEMPTIONS="1", FAKE_QUEUED="1")
    res = supervise(root, env, "ms", *MS, "--accelerator=v5p-16", "--queued", "--spot")
    assert res.returncode == 0, res.stdout + res.stderr
    recorded, seen = calls(root), kinds(root)
    assert recorded[0][1:] == [
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        "ms",
        "--zone=us-east5-a",
        "--format=value(state.state)",
    ]
    assert recorded[1][5:8] == ["ms", "--node-count=2", "--node-prefix=ms"]
    setup = ["describe", "git archive", "scp ms-0", "ssh setup ms-0", "scp ms-1", "ssh setup ms-1"]
    cut = seen.index("delete")
    first, second = seen[:cut], seen[cut + 1 :]
    # Round 1: the first slice's ssh to fail stops the other one, which may not have got far.
    assert first[:8] == ["describe", "create", *setup] and first[-1] == "describe"
    assert 1 <= len(first[8:-1]) <= 2 and set(first[8:-1]) <= {"ssh train ms-0", "ssh train ms-1"}
    assert second[:7] == ["create", *setup] and sorted(second[7:]) == ["ssh train ms-0", "ssh train ms-1"]
    assert "ms: SUSPENDED" in res.stdout and "restart 1/10: ms is SUSPENDED" in res.stdout


def test_supervise_dry_run_prints_the_first_round():
    res = tpu_cli(
        "--dry-run",
        "supervise",
        "t",
        "--zone=us-central2-b",
        "--accelerator-type=v4-8",
        "--spot",
        "--config=configs/digits.py",
        "--workdir=gs://bkt/w",
    )
    assert res.returncode == 0, res.stderr
    words = [shlex.split(line)[:5] for line in res.stdout.splitlines()]
    assert [w[4] if w[0] == "gcloud" else w[1] for w in words] == [
        "describe",
        "create",
        "describe",
        "archive",
        "scp",
        "ssh",
        "ssh",
    ]


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


# The processes of the SIGTERM tests: a handler, then `ready`; they exit on SIGTERM, and on their
# own when the launcher is gone (a failed test leaves nothing behind for 120 s).
SIGTERM_CHILD = (
    "import os, signal, sys, time\n"
    "i = os.environ['DIFFJAX_PROCESS_ID']\n"
    "signal.signal(signal.SIGTERM, lambda s, f: (print('SIGTERM in', i, flush=True), sys.exit(0)))\n"
    "parent = os.getppid()\n"
    "print('ready', i, flush=True)\n"
    "for _ in range(2400):\n"
    "    if os.getppid() != parent: sys.exit(9)\n"
    "    time.sleep(0.05)\n"
)


def start_local(n):
    return subprocess.Popen(
        [PY, os.path.join(ROOT, "launch", "local.py"), "-n", str(n), "--", PY, "-c", SIGTERM_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout=30):
    """All of proc's output, read through the one text stream (mixing line iteration with
    communicate() drops what the stream has read ahead), with a watchdog: a launcher still
    running after `timeout` s is killed, so a hang fails the test instead of blocking it."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return out


def test_local_forwards_sigterm():
    proc = start_local(2)
    seen, ready = [], {"[proc 0] ready 0\n", "[proc 1] ready 1\n"}
    for line in proc.stdout:  # exact lines: a line that only contains "ready" (already) must not count
        seen.append(line)
        if ready <= set(seen):
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(seen) + finish(proc)
    assert proc.returncode == 0, out
    assert "[proc 0] SIGTERM in 0" in out and "[proc 1] SIGTERM in 1" in out


def test_local_sigterm_while_starting_the_processes():
    """The signal lands right after the first process is started (inside Popen, before the
    launcher has it in its list): the launcher starts no more and stops that one. Before, the
    signal reached nobody, the other two were started anyway and the launcher waited for ever."""
    code = textwrap.dedent(f"""\
        import os, signal, subprocess, sys
        sys.path.insert(0, {ROOT!r})
        from launch import local
        real = subprocess.Popen
        def popen(*args, **kwargs):
            p = real(*args, **kwargs)
            if not hasattr(popen, "done"):
                popen.done = True
                os.kill(os.getpid(), signal.SIGTERM)
            return p
        subprocess.Popen = popen
        sys.exit(local.main(["-n", "3", "--", sys.executable, "-c", {SIGTERM_CHILD!r}]))
        """)
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = finish(proc, timeout=30)
    assert proc.returncode == 143, out
    assert "[launch] signal 15 before all processes started: started 1" in out
    assert "[proc 1]" not in out and "[proc 2]" not in out


def test_local_sigterm_at_any_moment_never_hangs():
    """SIGTERM at random moments of the start-up: before the launcher's handler (it dies), while
    it starts the processes (it starts no more, the started ones get it), before a process's own
    handler (it dies: 143), after (0). Never a launcher waiting for a process it did not signal."""
    rng = random.Random(0)
    outcomes = []
    for _ in range(12):
        proc = start_local(2)
        time.sleep(rng.uniform(0.0, 0.25))
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        out = finish(proc, timeout=20)
        assert time.time() - start < 15, f"the launcher hung after SIGTERM: {out!r}"
        assert proc.returncode in (0, 143, -signal.SIGTERM), (proc.returncode, out)
        outcomes.append(proc.returncode)
    assert len(outcomes) == 12
