"""N processes on this machine: `python launch/local.py --num-processes N --devices-per-process M -- diffjax train ...`

Each process gets JAX_PLATFORMS=cpu (or --platform), M fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=M) and DIFFJAX_COORDINATOR_ADDRESS /
DIFFJAX_NUM_PROCESSES / DIFFJAX_PROCESS_ID for one coordinator on a free local port, so
`diffjax train` runs as it would on N hosts (gloo collectives between the CPU processes). This is
how the multi-host code paths are tested without a cluster.

Every output line is prefixed with `[proc i]`. If a process fails, the others are terminated and
its exit code is returned. SIGINT / SIGTERM are forwarded to all processes (diffjax train saves a
checkpoint on SIGTERM); a second one kills them. A signal that comes while the processes are
being started stops the start: the ones already running get it, and the launcher exits with
128 + the signal number.
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
from collections.abc import Mapping

GRACE_S = 10.0  # after a failure: how long the others get to exit on SIGTERM before SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: Mapping[str, str], index: int, num: int, devices: int, port: int, platform: str | None = "cpu"
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
    # SIGINT / SIGTERM: the handler only records the signal; the main thread forwards it (see
    # _forward). Forwarding from the handler itself lost signals: it runs between any two
    # bytecodes of the main thread, so a signal taken while a process was being started (after
    # Popen, before procs.append) or before the later ones were started never reached them, and
    # the launcher then waited for ever; and one taken inside Popen.poll (the main loop's), just
    # after waitpid had reaped a process, sent the signal to that reaped, reusable pid.
    received: list[int] = []
    sent: list[int] = []  # per process: how many of the received signals it has been sent

    def record(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(num_processes):
            if received:  # interrupted while starting: start no more
                break
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
            sent.append(0)
            t = threading.Thread(target=_pump, args=(i, p.stdout, lock, out), daemon=True)
            t.start()
            pumps.append(t)
        if len(procs) < num_processes:
            with lock:
                out.write(f"[launch] signal {received[0]} before all processes started: started {len(procs)}\n")
                out.flush()
        failed: tuple[int, int] | None = None  # (index, exit code) of the first failure
        while True:
            _forward(procs, sent, received)
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                if not received:
                    with lock:
                        out.write(f"[launch] process {failed[0]} exited with {_exit_code(failed[1])}; stopping the others\n")
                        out.flush()
                _stop(procs, received)
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=5)
        if failed is not None:
            return _exit_code(failed[1])
        if len(procs) < num_processes:
            return 128 + received[0]
        return 0
    finally:
        for p in procs:  # only on an exception above: nothing may outlive the launcher
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)


def _forward(procs: list[subprocess.Popen], sent: list[int], received: list[int]) -> None:
    """Send every process the signals received since it was last sent one (main thread only):
    the first one as it came, any further one as SIGKILL."""
    n = len(received)
    for i, p in enumerate(procs):
        if sent[i] < n:
            sent[i] = n
            if p.poll() is None:  # polls: no signal to a reaped process (whose pid may be reused)
                p.send_signal(signal.SIGKILL if n > 1 else received[0])


def _stop(procs: list[subprocess.Popen], received: list[int] | None = None) -> None:
    """SIGTERM to the running processes, SIGKILL after GRACE_S (or at once on a further signal)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    signals = len(received) if received is not None else 0
    deadline = time.monotonic() + GRACE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if received is not None and len(received) > max(signals, 1):
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
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
