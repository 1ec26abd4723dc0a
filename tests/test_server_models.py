"""One `diffjax serve` process serving several models (`--workdir` as "default", `--model NAME=WORKDIR
[,ema=RATE]`): each answers with its own weights and checkpoint step, an unknown one is NOT_FOUND,
and a newer checkpoint in one workdir reloads only the model read from it."""

import os
import shutil
import time

import grpc
import numpy as np
import pytest
from tiny_configs import TOY, one_device_env, train_workdir

from diffjax.serving import Client, subprocess_server
from diffjax.serving import server as serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS = 4
NAMES = ["default", "fast", "copy"]


_env = one_device_env


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """The 8-Gaussians MLP trained 2 steps with EMA rates 0.999 and 0.5, and a copy of that workdir."""
    root = tmp_path_factory.mktemp("models")
    toy, copy = root / "toy", root / "copy"
    train_workdir(toy, *TOY, "--config.training.n_iters=2", "--config.training.ema_rates=(0.5,)", timeout=600)
    shutil.copytree(toy, copy)
    return toy, copy


@pytest.fixture(scope="module")
def server(workdirs):
    """default = the toy at EMA 0.999, fast = the same workdir at EMA 0.5, copy = the copied workdir:
    one network and config, so one compiled step program serves all three."""
    toy, copy = workdirs
    s = subprocess_server.ServerProcess(
        toy,
        f"--model=fast={toy},ema=0.5",
        f"--model=copy={copy}",
        f"--batch_slots={SLOTS}",
        "--reload_s=0.3",
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.addr, timeout=120) as c:
        yield c


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_each_model_answers_with_its_own_weights(workdirs, server, client):
    from diffjax import sample

    assert client.health() == "SERVING"
    assert server.metrics_port is None  # metrics are off without --metrics_port
    models = client.models()
    assert [m.name for m in models] == NAMES
    assert [list(m.sample_shape) for m in models] == [[2]] * 3 and [m.checkpoint_step for m in models] == [2] * 3
    assert client.model_info().name == "default" and client.model_info("fast").name == "fast"
    # Each model serves its own EMA: equal to the offline sampler with that rate's weights.
    toy, _ = workdirs
    served = {name: client.sample(5, sampler="ddim", num_steps=4, seed=9, model=name) for name in NAMES}
    served[""] = client.sample(5, sampler="ddim", num_steps=4, seed=9)  # "" = the default model
    for name, ema in (("default", None), ("fast", 0.5)):
        config, graphdef, rest, process, state, step = sample.load_workdir(str(toy), ("ema",), ema=ema)
        want = sample.generate(config, graphdef, rest, process, state["ema"], 5, sampler="ddim", steps=4, seed=9)
        assert served[name].shape == (5, 2) and step == 2
        np.testing.assert_allclose(served[name], want, rtol=1e-5, atol=2e-4, err_msg=name)
    assert np.abs(served["default"] - served["fast"]).max() > 1e-2  # the two EMAs differ: the check has teeth
    np.testing.assert_array_equal(served[""], served["default"])
    np.testing.assert_array_equal(served["copy"], served["default"])
    # one program: the later models' compile + warm-up is a fraction of the first's
    warmed = [
        float(line.split("warmed up in ")[1].split("s")[0])
        for line in server.lines
        if "model" in line and "warmed up" in line
    ][:3]
    assert len(warmed) == 3 and max(warmed[1:]) < warmed[0] / 3, warmed


def test_status_is_per_model_and_unknown_models_are_not_found(client):
    before = {name: client.status(name) for name in NAMES}
    assert all(s.batch_slots == SLOTS for s in before.values())
    for _ in range(2):
        client.sample(2, num_steps=3, model="fast")
    after = {name: client.status(name) for name in NAMES}
    assert after["fast"].requests_completed - before["fast"].requests_completed == 2
    assert after["fast"].samples_completed - before["fast"].samples_completed == 4
    for name in ("default", "copy"):
        assert after[name].requests_completed == before[name].requests_completed
        assert after[name].steps_run == before[name].steps_run  # its own slots: untouched
    for call in (
        lambda: client.sample(1, model="nope"),
        lambda: list(client.sample_stream(1, model="nope")),
        lambda: client.model_info("nope"),
        lambda: client.status("nope"),
    ):
        code, details = _code(call)
        assert code == grpc.StatusCode.NOT_FOUND
        assert "'nope'" in details and str(NAMES) in details
    # validation follows the named model: labels are wrong for the unconditional toy
    code, details = _code(lambda: client.sample(1, labels=[1], model="fast"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "labels" in details


def test_client_cli_picks_the_model(server, client, tmp_path, capsys):
    import json

    import numpy as np

    from diffjax.serving import client as cli

    assert cli.main(["models", "--addr", server.addr]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == NAMES and listed[1]["sample_shape"] == [2]
    out = tmp_path / "fast.png"
    argv = ["sample", "--addr", server.addr, "--model", "fast", "--num", "3", "--steps", "3", "--seed", "4"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "fast: ddim, 3 steps" in capsys.readouterr().out
    got = np.load(tmp_path / "fast.npz")["samples"]
    np.testing.assert_array_equal(got, client.sample(3, num_steps=3, seed=4, model="fast"))
    assert cli.main(["info", "--addr", server.addr, "--model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def _wait_for(cond, timeout, why=lambda: ""):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"condition not reached {why()}"
        time.sleep(0.1)


def test_reload_of_one_workdir_leaves_the_others_serving(workdirs, server, client):
    """A newer checkpoint (step 2's files as step 4) in the copied workdir: its model swaps it in,
    the two models of the original workdir keep step 2 and serve throughout."""
    _, copy = workdirs
    staging = copy / "staging-4"
    shutil.copytree(copy / "checkpoints" / "2", staging)
    os.rename(staging, copy / "checkpoints" / "4")  # appears at once, complete
    deadline = time.monotonic() + 60
    while client.status("copy").checkpoint_step != 4:
        for name in ("default", "fast"):
            response = client.sample_response(2, num_steps=3, model=name)
            assert response.checkpoint_step == 2 and list(response.samples.shape) == [2, 2]
        assert time.monotonic() < deadline, "".join(server.lines)
        time.sleep(0.1)
    assert client.sample_response(2, num_steps=3, model="copy").checkpoint_step == 4
    assert [m.checkpoint_step for m in client.models()] == [2, 2, 4]
    assert [client.status(name).reloads for name in NAMES] == [0, 0, 1]
    assert client.health() == "SERVING"


BAD_FLAGS = [
    (["--model", "a/b=W"], "NAME must match [A-Za-z0-9_.-]+, got 'a/b'"),
    (["--model", "toy"], "expected NAME=WORKDIR[,ema=RATE], got 'toy'"),
    (["--model", "x="], "no WORKDIR after x="),
    (["--model", "x=W,emma=0.5"], "the one option after WORKDIR is ema=RATE, got 'emma=0.5'"),
    (["--model", "x=W,ema=fast"], "ema must be a number"),
    (["--workdir", "W", "--model", "default=W"], "model name 'default' given twice (--workdir's model is named 'default')"),
    (["--model", "a=W", "--model", "a=W,ema=0.5"], "model name 'a' given twice"),
    ([], "give --workdir DIR (the model 'default') and/or --model NAME=WORKDIR[,ema=RATE]"),
    (["--model", "a=W", "--ema", "0.5"], "--ema is --workdir's EMA rate"),
    (["--model", "a=W", "--model", "b=NOPE"], "--model b=NOPE: NOPE/config.json not found"),
    (["--workdir", "NOPE"], "--workdir NOPE: NOPE/config.json not found"),
    (["--model", "a=W,ema=0.7"], "--model a=W: ema=0.7 is not an EMA rate this run tracked; its rates: 0.999, 0.5"),
    (["--workdir", "W", "--ema", "0.7"], "--workdir W: --ema 0.7 is not an EMA rate"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) or "none" for a, _ in BAD_FLAGS])
def test_bad_model_flags_are_one_line_exit_2(argv, message, workdirs, capsys, monkeypatch):
    """W stands for the toy workdir (EMA rates 0.999, 0.5); NOPE for a directory that is no workdir."""
    _, toy = workdirs
    monkeypatch.chdir(toy.parent)
    os.makedirs("NOPE", exist_ok=True)
    argv = [a.replace("W", "toy") if "NOPE" not in a and a != "--workdir" else a for a in argv]
    message = message.replace("--model a=W", "--model a=toy").replace("--workdir W", "--workdir toy")
    with pytest.raises(SystemExit) as exc:
        serve.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_without_workdir_the_first_model_is_the_default(workdirs):
    toy, copy = workdirs
    specs, options = serve.parse_args([f"--model=t={toy},ema=0.5", f"--model=c={copy}"])
    assert [(s.name, s.workdir, s.ema) for s in specs] == [("t", str(toy), 0.5), ("c", str(copy), None)]
    assert serve.Server(specs, options).default == "t"  # nothing loads before start()
