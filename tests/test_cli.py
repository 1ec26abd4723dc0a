"""The `diffjax` command as a user runs it."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from diffjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, "-m", "diffjax", *args], capture_output=True, text=True, timeout=300)


def test_demo_writes_scatter_png(tmp_path):
    out = tmp_path / "demo.png"
    res = run("demo", "--num", "2000", "--steps", "20", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "20 NFE" in res.stdout and f"wrote {out}" in res.stdout
    sw = float(res.stdout.split("sliced W2 to fresh true samples: ")[1].split(";")[0])
    assert sw < 0.2
    img = Image.open(out)
    assert img.size[0] > 2 * img.size[1] * 0.9  # two panels side by side
    # Both panels have drawn points (non-white, non-grey pixels).
    px = {color for _, color in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in px and (214, 39, 40) in px


def test_demo_evolution_writes_the_strip_and_its_densities_are_the_mixture(tmp_path):
    """`diffjax demo --evolution`: a five-panel PNG; computed (not read off the image): the t = 0
    panel's density holds 1/8 of the mass at each of the 8 modes, the t_max one is the N(0, I)
    prior's, and the ODE samples go from that prior (left) to the modes (right)."""
    import jax
    import numpy as np

    from diffjax import demo, plotting, processes, toy

    out = tmp_path / "evolution.png"
    res = run("demo", "--evolution", str(out), "--num", "500")
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout
    size, pad, title = 220, 10, 22
    assert Image.open(out).size == (5 * (size + pad) + pad, size + title + pad)

    mixture, process = toy.eight_gaussians(), processes.get("vp")
    evo = demo.evolution(mixture, process, jax.random.key(0), 400, size=size)
    assert evo.times[0] == process.t_max and evo.times[-1] == 0 and np.all(np.diff(evo.times) < 0)
    points = plotting.pixel_centres(evo.lim, size)
    cell = (2 * evo.lim / size) ** 2
    near = np.linalg.norm(points[:, None] - np.asarray(mixture.means)[None], axis=-1) < 0.35  # 3.5 mode stds
    clean, noise = evo.densities[-1].ravel() * cell, evo.densities[0].ravel() * cell
    np.testing.assert_allclose([clean[near[:, k]].sum() for k in range(8)], 1 / 8, atol=0.003)
    assert clean[~near.any(1)].sum() < 0.005  # nothing between the modes
    assert abs(noise.sum() - 1) < 0.01 and noise[near.any(1)].sum() < 0.1  # the prior: no modes yet (0.066)
    assert np.unravel_index(evo.densities[0].argmax(), (size, size)) in {(r, c) for r in (109, 110) for c in (109, 110)}
    np.testing.assert_allclose(evo.samples[0].std(0), 1.0, atol=0.1)
    stats = toy.mode_statistics(mixture, evo.samples[-1])
    np.testing.assert_allclose(stats["weights"], 1 / 8, atol=0.05)  # 400 samples: binomial sd 0.017
    np.testing.assert_allclose(stats["axis_stds"], 0.1, rtol=0.25)


def test_unknown_command_and_bad_flags():
    res = run("frobnicate")
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr and "demo" in res.stderr
    res = run("demo", "--sampler", "euler")
    assert res.returncode == 2 and "invalid choice: 'euler'" in res.stderr
    res = run("demo", "--num", "0")
    assert res.returncode == 2 and "argument --num: must be positive, got 0" in res.stderr
    res = run("--help")
    assert res.returncode == 0 and "demo" in res.stdout


def test_train_config_mistakes_are_one_line(tmp_path):
    """A missing config file or a bad override: one line naming it, exit 2, no traceback."""
    res = run("train", "--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
    assert res.returncode == 2 and "configs/nope.py" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run("train", "--config", "configs/digits.py", "--workdir", str(tmp_path / "w"), "--config.model.nff=3")
    assert res.returncode == 2 and "nff" in res.stderr and "Traceback" not in res.stderr


def test_workdir_mistakes_are_one_line(tmp_path):
    """sample / serve / eval on a directory that is not a workdir: one line naming it, exit 2."""
    for command in ("sample", "serve", "eval"):
        res = run(command, "--workdir", str(tmp_path / "none"))
        assert res.returncode == 2 and "config.json not found" in res.stderr and "Traceback" not in res.stderr, command
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# Every command parses its flags with diffjax.commandline.Parser: each mistake is one line on stderr
# naming it, exit status 2, and nothing runs (these fail before any workdir or config is opened).
USAGE_MISTAKES = [
    (["train", "--config", "c.py"], "the following arguments are required: --workdir"),
    (["train", "--config", "c.py", "--workdir", "w", "--keep", "0"], "argument --keep: must be positive, got 0"),
    (["train", "--config", "c.py", "--workdir", "w", "--coordinator_address", "h:1"], "needs --num_processes"),
    (["train", "--config", "c.py", "--workdir", "w", "--config.training.n_iters"], "looks like --config.a.b=value"),
    (["sample", "--workdir", "w", "--steps", "x"], "argument --steps: expected int, got 'x'"),
    (["sample", "--workdir", "w", "--config.seed=1"], "takes no --config.a.b=value overrides"),
    (["sample", "--workdir", "w", "--bogus"], "unrecognized arguments: --bogus"),
    (["serve", "--workdir", "w", "--port", "70000"], "argument --port: must be in [0, 65535], got 70000"),
    (["serve", "--workdir", "w", "--tls_cert", "c.pem"], "--tls_cert and --tls_key go together"),
    (["serve", "--workdir", "w", "--reload_s", "-1"], "argument --reload_s: must be >= 0, got -1"),
    (["client", "sample", "--option", "eta"], "argument --option: must look like NAME=NUMBER, got 'eta'"),
    (["client", "sample", "--tls_ca", "/nonexistent.pem"], "--tls_ca /nonexistent.pem: No such file"),
    (["eval", "frobnicate"], "unknown command 'frobnicate'"),
    (["eval", "--workdir", "w", "--num", "-5"], "argument --num: must be positive, got -5"),
    (["eval", "bpd", "--workdir", "w", "--passes", "0"], "argument --passes: must be positive, got 0"),
    (["import", "diffusers", "src", "--workdir", "w", "--config.seed=1"], "overrides need --config BASE.py"),
    (["info", "--config", "configs/nope.py"], "config file not found: configs/nope.py"),
    (["info", "--config", "configs/digits.py", "--config.model.nff=3"], "nff"),
    (["demo", "--steps", "0"], "argument --steps: must be positive, got 0"),
    (["demo", "--process", "ddpm", "--evolution", "e.png"], "--evolution needs a continuous process"),
]


@pytest.mark.parametrize("argv,message", USAGE_MISTAKES, ids=[" ".join(a[:2]) for a, _ in USAGE_MISTAKES])
def test_usage_mistakes_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT if argv[0] == "info" else tmp_path)  # info reads configs/ (a relative path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == [] or argv[0] == "info"  # nothing written


def test_a_hung_command_prints_every_thread_stack_on_sigusr1():
    """`kill -USR1` of a running diffjax command prints all its threads' Python stacks (diffjax.cli
    registers faulthandler); the tests' watched runner uses it to turn a hang into a failure that
    shows where each thread waits."""
    from gcs_emulator import run_watched

    child = (
        "import sys, threading, time, types\n"
        "from diffjax import cli\n"
        "def nap(argv):\n"
        "    threading.Thread(target=time.sleep, args=(60,), name='waiter', daemon=True).start()\n"
        "    time.sleep(60)\n"
        "sys.modules['napper'] = types.SimpleNamespace(main=nap)\n"
        "cli.SUBCOMMANDS['nap'] = ('napper', '')\n"
        "cli.main(['nap'])  # diffjax\n"
    )
    with pytest.raises(AssertionError) as err:
        run_watched([sys.executable, "-c", child], timeout=5, cwd=ROOT)
    message = str(err.value)
    assert "still running after 5 s" in message
    assert message.count("hread 0x") >= 2, message  # the current (main) thread and the waiter
    assert "line 5 in nap" in message, message
