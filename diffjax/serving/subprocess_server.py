"""Start `diffjax serve` in a child process and wait for SERVING (tests, benchmarks, notebooks)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


class ServerProcess:
    """`diffjax serve --workdir DIR --port 0 FLAGS...` (workdir None: no --workdir, models from
    `--model` flags); the port is read from its SERVING line, `metrics_port` (with --metrics_port)
    from its metrics line.

    `lines` collects the server's output; `stop()` kills it (send SIGTERM yourself to drain).
    """

    def __init__(self, workdir, *flags: str, env: dict | None = None, cwd: str | None = None, timeout: float = 300):
        workdir_flag = [] if workdir is None else [f"--workdir={workdir}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diffjax", "serve", *workdir_flag, "--port=0", *flags],
            cwd=cwd,
            env=env or dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self.metrics_port: int | None = None
        stdout = self.proc.stdout
        assert stdout is not None  # stdout=PIPE
        deadline = time.monotonic() + timeout
        for line in stdout:
            self.lines.append(line)
            if "metrics on http://" in line:
                self.metrics_port = int(line.strip().rsplit(":", 1)[1].split("/")[0])
            if "SERVING on" in line:
                self.port = int(line.rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("server not SERVING in time:\n" + "".join(self.lines))
        if not self.port:
            raise RuntimeError("server exited before SERVING:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(stdout), daemon=True).start()
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
