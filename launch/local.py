"""N processes on this machine: `python launch/local.py --num-processes N --devices-per-process M -- diffjax train ...`

Each process gets JAX_PLATFORMS=cpu (or --platform), M fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=M) and DIFFJAX_COORDINATOR_ADDRESS /
DIFFJAX_NUM_PROCESSES / DIFFJAX_PROCESS_ID for one coordinator on a free local port, so
`diffjax train` runs as it would on N hosts (gloo collectives between the CPU processes). This is
how the multi-host code paths are tested without a cluster.

Every output line is prefixed with `[proc i]`. If a process fails, the others are terminated and
its exit code is returned. SIGINT / SIGTERM are forwarded to all processes (diffjax train saves a
checkpoint on SIGTERM); a second one kills them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 10.0  # after a failure: how long the others get to exit on SIGTERM before SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str], index: int, num: int, devices: int, port: int, platform: str | None = "cpu"
) -> dict[str, str]:
    env = dict(base)
    if platform:
        env["JAX_PLATFORMS"] = platform
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["DIFFJAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["DIFFJAX_NUM_PROCESSES"] = str(num)
    env["DIFFJAX_PROCESS_ID"] = str(index)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def resolve_command(command: list[str]) -> list[str]:
    """`diffjax ...` runs as `python -m diffjax ...` when no diffjax script is on PATH."""
    if command and command[0] == "diffjax" and shutil.which("diffjax") is None:
        return [sys.executable, "-m", "diffjax", *command[1:]]
    return command


def _pump(index: int, stream, lock: threading.Lock, out) -> None:
    for line in stream:
        with lock:
            out.write(f"[proc {index}] {line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal s -> 128 + s


def launch(
    command: list[str],
    num_processes: int,
    devices_per_process: int,
    *,
    platform: str | None = "cpu",
    port: int | None = None,
    out=None,
    cwd: str | None = None,
) -> int:
    out = sys.stdout if out is None else out
    port = port or free_port()
    command = resolve_command(command)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    signals = {"count": 0}

    def forward(signum, frame):
        signals["count"] += 1
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGKILL if signals["count"] > 1 else signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(num_processes):
            env = process_env(os.environ, i, num_processes, devices_per_process, port, platform)
            # Own session: a terminal's Ctrl-C reaches only us, and we forward it once.
            p = subprocess.Popen(
                command,
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            procs.append(p)
            t = threading.Thread(target=_pump, args=(i, p.stdout, lock, out), daemon=True)
            t.start()
            pumps.append(t)
        failed: tuple[int, int] | None = None  # (index, exit code) of the first failure
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                if signals["count"] == 0:
                    with lock:
                        out.write(f"[launch] process {failed[0]} exited with {_exit_code(failed[1])}; stopping the others\n")
                        out.flush()
                _stop(procs)
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=5)
        if failed is not None:
            return _exit_code(failed[1])
        return 0
    finally:
        for p in procs:  # only on an exception above: nothing may outlive the launcher
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python launch/local.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-processes", "-n", type=int, default=2)
    parser.add_argument("--devices-per-process", "-d", type=int, default=1)
    parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the processes ('' keeps it)")
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. diffjax train ...")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- diffjax train --config configs/digits.py --workdir DIR")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num-processes and --devices-per-process must be >= 1")
    return launch(command, args.num_processes, args.devices_per_process, platform=args.platform or None, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
