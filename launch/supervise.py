"""`python -m launch.tpu supervise NAME --zone Z --accelerator-type T ... --config C --workdir gs://...
[-- train flags]`: keep one training run going on a Spot / preemptible TPU until it finishes.

    1. describe the TPU (queued resource: its state.state); create it if there is none
    2. wait until it is READY (a queued resource: ACTIVE)
    3. setup (the same commands as `setup`), then run in the foreground (as `run --foreground`,
       one ssh per slice, all at once) while describing the TPU every --watch-interval seconds
    4. the run exits 0 (diffjax train reached n_iters): done, exit 0
    5. it exits non-zero, or the TPU is lost while it runs: describe until the state leaves READY
       (at most --settle seconds). PREEMPTED / TERMINATED (TPU VM) or FAILED / SUSPENDING /
       SUSPENDED (queued resource): delete the TPU and go to 1; `diffjax train` resumes from the
       last checkpoint in the gs:// workdir by itself. Still READY: a real failure, not retried.

Every delete + re-create counts against --max-restarts; past it, supervise stops with a one-line
error and leaves the TPU as it is. Every action is logged with a UTC timestamp; the gcloud
commands are echoed as `+ ...` lines as the other commands do.
"""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from launch import runner

READY = frozenset({"READY", "ACTIVE"})
LOST = frozenset({"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDING", "SUSPENDED"})
MISSING = "MISSING"
DESCRIBE_FAILURES = 10  # consecutive failed describes (not NOT_FOUND) before giving up


class SuperviseError(Exception):
    """Supervision gave up; one line, reported as `launch.tpu: error: supervise: ...`."""


@dataclass(frozen=True)
class Supervision:
    """The commands of one round and the loop's bounds (built and checked by launch.tpu)."""

    name: str
    describe: list[str]
    create: list[list[str]]
    delete: list[list[str]]
    setup: list[list[str]]
    run: list[list[str]]  # foreground; started together (one per slice)
    max_restarts: int = 10
    poll_s: float = 30.0  # between describes while waiting for READY / for the state to settle
    watch_s: float = 60.0  # between describes while the run is going
    ready_timeout_s: float = 0.0  # 0: wait for READY as long as it takes (a queued resource may wait hours)
    settle_s: float = 120.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Supervisor:
    def __init__(self, s: Supervision, out: TextIO | None = None, sleep: Callable[[float], None] = time.sleep):
        self.s, self.out, self.sleep = s, (sys.stdout if out is None else out), sleep
        self.restarts = 0

    def log(self, message: str) -> None:
        print(f"[supervise {_now()}] {message}", file=self.out, flush=True)

    # -- state -----------------------------------------------------------------------------

    def state(self) -> str:
        """The TPU's state, MISSING when gcloud says NOT_FOUND; retries a failing describe."""
        for attempt in range(1, DESCRIBE_FAILURES + 1):
            code, stdout, stderr = runner.capture(self.s.describe)
            if code == 0 and stdout.strip():
                state = stdout.strip().splitlines()[-1].strip().upper()
                self.log(f"{self.s.name}: {state}")
                return state
            if "NOT_FOUND" in stderr or "not found" in stderr.lower():
                self.log(f"{self.s.name}: not found")
                return MISSING
            last = (stderr.strip().splitlines() or [f"exit {code}" + ", no state printed" * (code == 0)])[-1]
            self.log(f"describe failed ({attempt}/{DESCRIBE_FAILURES}): {last}")
            if code == 127 or attempt == DESCRIBE_FAILURES:
                raise SuperviseError(f"cannot describe {self.s.name}: {last}")
            self.sleep(self.s.poll_s)
        raise AssertionError("unreachable")

    def wait_ready(self) -> str:
        """Describe until READY / ACTIVE or lost; bounded by ready_timeout_s (0: no bound)."""
        start = time.monotonic()
        while True:
            state = self.state()
            if state in READY or state in LOST:
                return state
            if self.s.ready_timeout_s and time.monotonic() - start > self.s.ready_timeout_s:
                raise SuperviseError(f"{self.s.name} is still {state} after --ready-timeout {self.s.ready_timeout_s:g} s")
            self.sleep(self.s.poll_s)

    def settle(self) -> str:
        """After a failure: describe until the state leaves READY, for at most settle_s."""
        deadline = time.monotonic() + self.s.settle_s
        state = self.state()
        while state in READY and time.monotonic() < deadline:
            self.sleep(self.s.poll_s)
            state = self.state()
        return state

    # -- actions ---------------------------------------------------------------------------

    def count_restart(self, reason: str) -> None:
        if self.restarts >= self.s.max_restarts:
            raise SuperviseError(
                f"{self.s.name} {reason}; --max-restarts {self.s.max_restarts} reached after "
                f"{self.restarts} restart(s), giving up (the TPU is left as it is)"
            )
        self.restarts += 1
        self.log(f"restart {self.restarts}/{self.s.max_restarts}: {self.s.name} {reason}")

    def step(self, what: str, commands: Sequence[Sequence[str]]) -> int:
        self.log(what)
        code = runner.execute(commands, False, out=self.out)
        if code != 0:
            self.log(f"{what.split()[0]} exited with {code}")
        return code

    def run_watched(self) -> tuple[int, str | None]:
        """Start the run commands together; describe every watch_s. Returns (exit code, None), or
        (-1, lost state) when the TPU was lost while they ran (they are stopped then)."""
        self.log(f"run on {self.s.name}")
        procs: list[subprocess.Popen] = []
        try:
            for cmd in self.s.run:
                print("+ " + shlex.join(cmd) + " &" * (len(self.s.run) > 1), file=self.out, flush=True)
                procs.append(subprocess.Popen(list(cmd)))
            next_watch = time.monotonic() + self.s.watch_s
            while True:
                codes = [p.poll() for p in procs]
                failed = next((c for c in codes if c not in (None, 0)), None)
                if failed is not None or all(c == 0 for c in codes):
                    code = failed or 0
                    self.log(f"run exited with {code}")
                    return code, None
                if time.monotonic() >= next_watch:
                    state = self.state()
                    if state in LOST or state == MISSING:
                        self.log(f"{self.s.name} is {state} while the run goes on: stopping it")
                        return -1, state
                    next_watch = time.monotonic() + self.s.watch_s
                time.sleep(0.05)
        except FileNotFoundError as err:
            raise SuperviseError(f"{err.filename!r} not found: install the Google Cloud CLI (gcloud)") from None
        finally:
            runner.stop(procs)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    # -- the loop --------------------------------------------------------------------------

    def supervise(self) -> int:
        self.log(f"supervising {self.s.name}: --max-restarts {self.s.max_restarts}")
        state: str | None = None  # None: not known, describe
        while True:
            state = self.state() if state is None else state
            if state in LOST:
                self.count_restart(f"is {state}")
                self.step(f"delete {self.s.name}", self.s.delete)
                state = MISSING
            if state == MISSING and self.step(f"create {self.s.name}", self.s.create) != 0:
                self.count_restart("could not be created")
                self.sleep(self.s.poll_s)
                state = None
                continue
            state = self.wait_ready()
            if state in LOST:
                continue
            if self.step(f"setup on {self.s.name}", self.s.setup) != 0:
                state = self.lost_after("setup failed")
                continue
            code, lost = self.run_watched()
            if code == 0:
                self.log("run finished with exit 0: done")
                return 0
            state = self.lost_after(f"run exited with {code}", lost)

    def lost_after(self, failure: str, state: str | None = None) -> str:
        """After a failed setup / run: the TPU's settled state if it was lost (a TPU gone without
        a preemption state, deleted by hand, counts its restart here), else SuperviseError."""
        state = state or self.settle()
        if state == MISSING:
            self.count_restart("is gone")
        elif state not in LOST:
            raise SuperviseError(f"{failure} while {self.s.name} is {state}: not a preemption, not retried")
        return state

    def print_plan(self) -> None:
        """--dry-run: the commands of the first round, in order."""
        runner.print_commands([self.s.describe, *self.s.create, self.s.describe, *self.s.setup], out=self.out)
        runner.print_commands(self.s.run, parallel=True, out=self.out)


def supervise(s: Supervision, dry_run: bool = False, out: TextIO | None = None) -> int:
    sup = Supervisor(s, out)
    if dry_run:
        sup.print_plan()
        return 0
    try:
        return sup.supervise()
    except KeyboardInterrupt:
        sup.log("interrupted: the TPU is left as it is")
        return 130
