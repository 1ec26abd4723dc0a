"""The scheduler: one thread that owns the Engine, packs queued requests into free slots and
delivers finished samples to the requests they belong to.

Requests are admitted sample by sample into whatever slots are free. admission="fifo" (the
default) fills them in arrival order: best mean latency when requests are alike, but a huge
request holds every request behind it until all its samples have slots. admission="fair" first
gives slots, in arrival order, to requests below their fair share (slots / requests running or
waiting), then the rest in arrival order: a small request then waits at most about one sample's
duration behind huge ones, at the cost of spreading a burst of equal requests over the batch (they
all finish late together). No slot idles while work waits under either policy. A request may run
beside any others and start before an earlier one has finished. Cancelled requests
(client cancel, deadline) are dropped from the queue and their slots freed at the next step.
A new checkpoint is swapped in between steps once the busy slots have drained, so every request is
made by one set of weights and says which.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Callable

import numpy as np

from diffjax.denoiser import Denoiser
from diffjax.serving.engine import Admission, Engine, request_key

ADMISSION = ("fifo", "fair")


class QueueFull(Exception):
    """The scheduler's request queue is at its limit."""


class NotAccepting(Exception):
    """The scheduler is shutting down."""


@dataclasses.dataclass(eq=False)  # identity semantics: jobs are hashed and found by identity
class Job:
    """One validated request; `events` receives ("batch", indices, samples, step) and ("done",)."""

    num_samples: int
    sampler: str
    num_steps: int
    seed: int
    labels: np.ndarray  # (num_samples,) int32, -1 = none
    guidance_scale: float | None
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    admitted: int = 0
    finished: int = 0
    cancelled: bool = False
    checkpoint_step: int | None = None
    key: np.ndarray | None = None
    options: dict = dataclasses.field(default_factory=dict)  # per-request numeric sampler options
    submitted: float = 0.0  # time.perf_counter() at submit
    started: float | None = None  # ... at its first slot


class Scheduler:
    """Continuous batching over an Engine; thread-safe submit/cancel from gRPC handler threads."""

    def __init__(
        self,
        engine: Engine,
        *,
        checkpoint_step: int,
        max_queued_requests: int = 256,
        admission: str = "fifo",
        on_step: Callable[[float], None] | None = None,
        on_start: Callable[[float], None] | None = None,
    ):
        """on_step(seconds): called after each step call with its wall time; on_start(seconds): when a
        request gets its first slot, with its time in the queue (both on the scheduler thread)."""
        if admission not in ADMISSION:
            raise ValueError(f"admission must be one of {ADMISSION}, got {admission!r}")
        self.engine, self.admission = engine, admission
        self.on_step, self.on_start = on_step, on_start
        self.checkpoint_step = checkpoint_step
        self.max_queued_requests = int(max_queued_requests)
        self._pending: collections.deque[Job] = collections.deque()
        self._owner: dict[int, tuple[Job, int]] = {}  # slot -> (job, sample index)
        self._to_free: list[int] = []
        self._staged: tuple[Denoiser, int] | None = None  # (denoiser, step) waiting for the slots to drain
        self._cond = threading.Condition()
        self._accepting, self._running = True, True
        self.stats: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="diffjax-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    # ---- called from handler threads ------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self._accepting:
                raise NotAccepting("server is shutting down")
            if len(self._pending) >= self.max_queued_requests:
                raise QueueFull(f"request queue is full ({self.max_queued_requests} queued requests)")
            job.key = request_key(job.seed)
            job.submitted = time.perf_counter()
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job: out of the queue, and its slots freed at the next step. Idempotent."""
        with self._cond:
            if job.cancelled or job.finished == job.num_samples:
                return
            job.cancelled = True
            self.stats["requests_cancelled"] += 1
            if job in self._pending:
                self._pending.remove(job)
            for slot, (owner, _) in list(self._owner.items()):
                if owner is job:
                    del self._owner[slot]
                    self._to_free.append(slot)
            self._cond.notify()

    def stage_weights(self, denoiser: Denoiser, step: int) -> None:
        """Swap in new weights once the busy slots drain (admissions pause until then)."""
        with self._cond:
            self._staged = (denoiser, step)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            return dict(
                batch_slots=self.engine.batch_slots,
                busy_slots=int(self.engine.busy.sum()),
                queued_requests=len(self._pending),
                max_queued_requests=self.max_queued_requests,
                steps_run=self.engine.calls,
                checkpoint_step=self.checkpoint_step,
                **self.stats,
            )

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self.engine.busy.any()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with drain, finish queued and running work first (up to timeout)."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        if drain:
            end = None if timeout is None else time.monotonic() + timeout
            while not self.idle() and self._thread.is_alive() and (end is None or time.monotonic() < end):
                time.sleep(0.02)
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the scheduler thread -------------------------------------------------------------------
    def _plan(self) -> tuple[list[Admission], list[int]] | None:
        """Under the lock: free cancelled slots, swap staged weights, fill free slots. None = stop."""
        while True:
            if not self._running:
                return None
            if self._staged is not None and not self.engine.busy.any():
                denoiser, step = self._staged
                self.engine.set_denoiser(denoiser)
                self.checkpoint_step, self._staged = step, None
                self.stats["reloads"] += 1
            free, self._to_free = self._to_free, []
            slots = [s for s in self.engine.free_slots() if s not in self._owner]
            admissions = self._admit(slots) if slots and self._pending else []
            if admissions or free or self.engine.busy.any():
                return admissions, free
            self._cond.wait(timeout=0.5)

    def _admit(self, slots: list[int]) -> list[Admission]:
        """Fill free slots: with admission="fair" fair shares first, then arrival order."""
        running = collections.Counter(id(job) for job, _ in self._owner.values())
        jobs = {id(job) for job, _ in self._owner.values()} | {id(job) for job in self._pending}
        share = max(1, self.engine.batch_slots // len(jobs))
        # New requests wait for staged weights; started ones finish on the weights they began with.
        ready = [job for job in self._pending if self._staged is None or job.admitted > 0]
        admissions: list[Admission] = []
        for capped in (True, False) if self.admission == "fair" else (False,):
            for job in ready:
                while slots and job.admitted < job.num_samples and not (capped and running[id(job)] >= share):
                    slot, index = slots.pop(0), job.admitted
                    if job.checkpoint_step is None:
                        job.checkpoint_step = self.checkpoint_step
                    if job.started is None:
                        job.started = time.perf_counter()
                        if self.on_start is not None:
                            self.on_start(job.started - job.submitted)
                    assert job.key is not None  # request_key(seed), set by submit
                    admissions.append(
                        Admission(
                            slot,
                            job.key,
                            index,
                            job.num_steps,
                            job.sampler,
                            int(job.labels[index]),
                            job.guidance_scale,
                            job.options,
                        )
                    )
                    self._owner[slot] = (job, index)
                    job.admitted += 1
                    running[id(job)] += 1
        self._pending = collections.deque(job for job in self._pending if job.admitted < job.num_samples)
        return admissions

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    plan = self._plan()
                if plan is None:
                    return
                calls, t0 = self.engine.calls, time.perf_counter()
                finished = self.engine.step(*plan)
                if self.on_step is not None and self.engine.calls != calls:  # a step call ran (not only frees)
                    self.on_step(time.perf_counter() - t0)
                if finished:
                    self._deliver(finished)
        except BaseException as err:  # noqa: BLE001 - fail every waiting request, not silently hang
            with self._cond:
                jobs = {j for j, _ in self._owner.values()} | set(self._pending)
                self._accepting = False
            for job in jobs:
                job.events.put(("error", f"scheduler failed: {err!r}"))
            raise

    def _deliver(self, finished: list[tuple[int, np.ndarray]]) -> None:
        batches: dict[int, tuple[Job, list[int], list[np.ndarray]]] = {}
        with self._cond:
            for slot, x in finished:
                owner = self._owner.pop(slot, None)
                if owner is None:  # cancelled while running
                    continue
                job, index = owner
                entry = batches.setdefault(id(job), (job, [], []))
                entry[1].append(index)
                entry[2].append(x)
                job.finished += 1
                self.stats["samples_completed"] += 1
                if job.finished == job.num_samples:
                    self.stats["requests_completed"] += 1
        for job, indices, xs in batches.values():
            job.events.put(("batch", indices, np.stack(xs), job.checkpoint_step))
            if job.finished == job.num_samples:
                job.events.put(("done",))


def wait_events(job: Job, is_active: Callable[[], bool], poll_s: float = 0.1):
    """Yield a job's events until it is done; stops (and returns) when is_active() turns False."""
    while True:
        try:
            event = job.events.get(timeout=poll_s)
        except queue.Empty:
            if not is_active():
                return
            continue
        yield event
        if event[0] in ("done", "error"):
            return
