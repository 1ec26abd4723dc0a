"""The thin runner of the launchers' argv lists: print each command, then run it (or, with
--dry-run, only print it). Commands run one after the other and stop at the first failure, or
together (`parallel`: one foreground ssh per slice of a multislice TPU, which must all be up at
once): the first failure then stops the others."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TextIO

GRACE_S = 10.0  # parallel: how long the others get to exit on SIGTERM after a failure


def _not_found(cmd: Sequence[str]) -> int:
    print(f"launch.tpu: {cmd[0]!r} not found: install the Google Cloud CLI (gcloud)", file=sys.stderr)
    return 127


def print_commands(commands: Sequence[Sequence[str]], parallel: bool = False, out: TextIO | None = None) -> None:
    """Pasteable: parallel commands as `cmd &` lines and a closing `wait`."""
    out = sys.stdout if out is None else out
    together = parallel and len(commands) > 1
    for cmd in commands:
        print(shlex.join(cmd) + (" &" if together else ""), file=out, flush=True)
    if together:
        print("wait", file=out, flush=True)


def execute(commands: Sequence[Sequence[str]], dry_run: bool, out: TextIO | None = None, parallel: bool = False) -> int:
    """Print each command (shell-quoted, pasteable); unless dry_run, run it and stop at a failure."""
    out = sys.stdout if out is None else out
    if dry_run:
        print_commands(commands, parallel, out)
        return 0
    if parallel and len(commands) > 1:
        return _execute_parallel(commands, out)
    for cmd in commands:
        print("+ " + shlex.join(cmd), file=out, flush=True)
        try:
            code = subprocess.run(list(cmd)).returncode
        except FileNotFoundError:
            return _not_found(cmd)
        if code != 0:
            return code
    return 0


def _execute_parallel(commands: Sequence[Sequence[str]], out: TextIO) -> int:
    procs: list[subprocess.Popen] = []
    try:
        for cmd in commands:
            print("+ " + shlex.join(cmd) + " &", file=out, flush=True)
            try:
                procs.append(subprocess.Popen(list(cmd)))
            except FileNotFoundError:
                return _not_found(cmd)
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0)), None)
            if failed is not None:
                stop(procs)
                return failed
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        for p in procs:  # nothing outlives the runner (an exception, Ctrl-C, a failure above)
            if p.poll() is None:
                p.kill()
                p.wait()


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to those still running; wait up to GRACE_S for them (the caller kills the rest)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def capture(cmd: Sequence[str]) -> tuple[int, str, str]:
    """Run cmd, return (exit code, stdout, stderr); 127 when the program is missing."""
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True)
    except FileNotFoundError:
        return 127, "", f"{cmd[0]}: not found"
    return res.returncode, res.stdout, res.stderr
