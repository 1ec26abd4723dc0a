"""The `diffjax` command as a user runs it."""

import subprocess
import sys

from PIL import Image


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


def test_unknown_command_and_bad_flags():
    res = run("frobnicate")
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr and "demo" in res.stderr
    res = run("demo", "--sampler", "euler")
    assert res.returncode == 2 and "invalid choice: 'euler'" in res.stderr
    res = run("demo", "--num", "0")
    assert res.returncode == 2 and "--num must be positive" in res.stderr
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
