"""`diffjax train --config configs/X.py --workdir DIR [--config.training.batch_size=...]`

The same command trains on a laptop, a GPU box or every worker of a TPU pod: a Mesh over all
devices of all processes, one jitted program per `n_jitted_steps` fused steps, orbax checkpoints
every `snapshot_freq` steps (and on SIGTERM), exact resume, JSONL + TensorBoard logs, a progress
bar and sample grids at each snapshot. Only process 0 logs; every process takes part in saves.

Multi-host: on Cloud TPU `jax.distributed.initialize()` needs no flags; elsewhere pass
--coordinator_address, --num_processes, --process_id (or DIFFJAX_COORDINATOR_ADDRESS,
DIFFJAX_NUM_PROCESSES, DIFFJAX_PROCESS_ID). CPU processes use gloo collectives.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import tempfile
import time

from diffjax import commandline, distributed

USAGE_EPILOG = "Config overrides: --config.a.b=value (type-checked by ml_collections)."


def parse_args(argv: list[str]):
    parser = commandline.Parser("diffjax train", __doc__.split("\n\n")[0], epilog=USAGE_EPILOG, config_overrides=True)
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/digits.py")
    parser.add_argument("--workdir", required=True, help="local path or gs:// bucket path")
    distributed.add_flags(parser)
    parser.add_argument("--keep", type=commandline.positive_int, default=3, help="checkpoints to keep")
    parser.add_argument(
        "--data_workers",
        type=commandline.non_negative_int,
        default=0,
        help="input worker processes per host (grain); 0 = threads in the training process. "
        "Use some when per-example work (decoding, data.augment_p) limits img/s",
    )
    parser.add_argument(
        "--log_upload_s",
        type=commandline.positive_float,
        default=30.0,
        help="remote (gs://) workdir: seconds between background uploads of metrics.jsonl / TensorBoard files",
    )
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse(argv)
    distributed.check_flags(parser, args)
    return parser, args


class PreemptionAgreement:
    """`preempted()`: whether to save and stop before the next step (SIGTERM: TPU maintenance,
    Spot/preemptible VMs, SLURM). One process alone: its own SIGTERM handler. Several: JAX's
    preemption service (started by jax.distributed.initialize) catches SIGTERM on any of them and
    agrees on one sync point, so all processes save the same step and exit 0 even when the signal
    reaches one host only or the hosts at different moments. Every process calls it once per loop
    iteration, as the service requires (the iteration count is passed: every process starts a run
    at the same step and takes the same fused steps)."""

    def __init__(self):
        import jax

        self.stopping, self.iteration = False, 0
        self.service = jax.process_count() > 1 and _preemption_service()
        if not self.service:
            signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "stopping", True))

    def __call__(self) -> bool:
        if self.service and not self.stopping:
            from jax.experimental import multihost_utils

            self.stopping = multihost_utils.reached_preemption_sync_point(self.iteration)
        self.iteration += 1
        return self.stopping


def _preemption_service() -> bool:
    from jax._src import distributed  # the service's handle; no public accessor

    return distributed.global_state.preemption_sync_manager is not None


class FinishedSteps:
    """How many training steps have finished on the device, without waiting for any: dispatch runs
    ahead of the device, so counting dispatched steps makes a progress bar jump in bursts and its
    rate and ETA swing. Each dispatch's losses are the last thing it computes; `is_ready()` on them
    tells (non-blocking) that its steps are done."""

    def __init__(self, step: int):
        self.done = step
        self.in_flight: collections.deque = collections.deque()  # (step reached, its losses)

    def dispatched(self, step: int, losses) -> None:
        self.in_flight.append((step, losses))

    def count(self, wait: bool = False) -> int:
        while self.in_flight and (wait or self.in_flight[0][1].is_ready()):
            self.done = self.in_flight.popleft()[0]
        return self.done


def check_workdir(workdir: str) -> None:
    """Exit 2 with one line unless the workdir can be written (a local folder, or a bucket that
    exists and that the credentials can write), before anything is built."""
    from diffjax import storage

    storage.check_writable(workdir, "diffjax train", "--workdir")
    check_shared(workdir)


def check_shared(workdir: str) -> None:
    """Several processes must see one workdir (a bucket or a shared filesystem): each writes a
    probe, and each checks that it sees every other process's probe. A node-local path on a
    cluster is refused on every process at once (one line, exit 2), never a hang or a split run."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    from diffjax import storage

    token = int(multihost_utils.broadcast_one_to_all(np.int32(np.random.randint(1, 2**31 - 1))))
    probe = lambda i: storage.path(workdir) / f".shared_probe_{token}_{i}"  # noqa: E731
    probe(jax.process_index()).write_text("ok")
    multihost_utils.sync_global_devices("diffjax train: workdir probes written")
    seen = np.array([probe(i).exists() for i in range(jax.process_count())], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(seen)).reshape(jax.process_count(), -1)
    probe(jax.process_index()).unlink()
    blind = [i for i in range(jax.process_count()) if not everyone[i].all()]
    if blind:
        commandline.usage_error(
            "diffjax train",
            f"--workdir {workdir} is not shared: process(es) {', '.join(map(str, blind))} cannot see the files the "
            "other processes write there; use a gs:// bucket or a filesystem every node mounts",
        )


def is_remote(workdir: str) -> bool:
    return "://" in str(workdir)


class Logger:
    """JSONL metrics, TensorBoard event files and sample grids in workdir (process 0 only).

    A remote workdir (gs://...) cannot be appended to, and uploading inside the step loop would
    stall every host of a pod: files are written to a local staging directory, and a background
    thread ships the ones that changed every `upload_s` seconds (whole-file uploads; GCS objects
    are replaced atomically), and once more at close (end of run, preemption). A resume from step
    S drops the lines logged after S by the interrupted run: they are logged again.
    """

    def __init__(
        self, workdir: str, active: bool, *, remote: bool | None = None, resume_step: int = 0, upload_s: float = 30.0
    ):
        import threading

        self.active, self.workdir = active, workdir
        self.remote = is_remote(workdir) if remote is None else remote
        self._uploaded: dict[str, tuple[int, int]] = {}  # staged file -> (mtime, size) last copied
        self._lock = threading.Lock()  # one upload at a time (the thread's and close()'s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not active:
            return
        from etils import epath
        from tensorboardX import SummaryWriter

        self.local = tempfile.mkdtemp(prefix="diffjax-logs-") if self.remote else workdir
        jsonl = epath.Path(workdir) / "metrics.jsonl"
        if jsonl.exists():  # resume: keep what earlier runs logged up to the restored step
            kept = [line for line in jsonl.read_text().splitlines(keepends=True) if _logged_step(line) <= resume_step]
            epath.Path(self.local, "metrics.jsonl").write_text("".join(kept))
        self.jsonl = epath.Path(self.local, "metrics.jsonl").open("a")
        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))  # local: the staging directory
        if self.remote:
            self._thread = threading.Thread(target=self._ship_every, args=(upload_s,), name="log-upload", daemon=True)
            self._thread.start()

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, str):  # the data fingerprint: metrics.jsonl only
                continue
            self.tb.add_scalar(k, v, step)
        if not self.remote:
            self.tb.flush()

    def image(self, step: int, tag: str, path: str) -> None:
        if self.active:
            import numpy as np
            from PIL import Image

            self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            if not self.remote:
                self.tb.flush()

    def samples_dir(self) -> str:
        """Where sample grids are written first (the workdir itself unless it is remote)."""
        return self.local if self.active else self.workdir

    def _ship_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.upload()
            except Exception as err:  # noqa: BLE001 - a failed upload is retried at the next tick / close
                print(
                    f"warning: uploading logs to {self.workdir} failed ({type(err).__name__}: {err}); will retry", flush=True
                )

    def upload(self) -> None:
        """Copy the staged files that changed since the last upload to the remote workdir."""
        if not (self.active and self.remote):
            return
        from etils import epath

        with self._lock:
            self.tb.flush()
            for root, _, files in os.walk(self.local):
                for name in files:
                    src = os.path.join(root, name)  # local: the staging directory
                    stat = os.stat(src)
                    if self._uploaded.get(src) == (stat.st_mtime_ns, stat.st_size):
                        continue  # unchanged since the last copy (earlier sample grids, closed event files)
                    dst = epath.Path(self.workdir) / os.path.relpath(src, self.local)  # local: the staged file
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    epath.Path(src).copy(dst, overwrite=True)
                    self._uploaded[src] = (stat.st_mtime_ns, stat.st_size)

    def close(self):
        if self.active:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.jsonl.close()
            self.tb.close()
            self.upload()


def _logged_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line (kill -9 mid-write): dropped


def main(argv: list[str]) -> int:
    parser, args = parse_args(argv)
    distributed.initialize(args)
    from diffjax import compile_cache

    compile_cache.enable()
    import jax
    import numpy as np

    from diffjax import data, flops, learned_schedule, losses, snapshots, trainer
    from diffjax.denoiser import require_learned_variance

    config = parser.load_config(args.config, args.overrides)
    check_workdir(args.workdir)
    is_main = jax.process_index() == 0
    try:
        mesh = trainer.make_mesh(config)
        trainer.check_batch_size(config, mesh)
        trainer.check_model_parallel(config, mesh)
        trainer.check_augmentation(config)
        learned_schedule.check_loss(trainer.build_process(config), str(config.training.loss))
        learn_sigma = bool(config.model.get("learn_sigma", False))
        if config.training.loss == "hybrid":  # needs model.learn_sigma and the ddpm process
            losses.check_loss("hybrid", trainer.build_process(config), learn_sigma)
        if config.sampling.get("variance") == "learned":  # the snapshots' samples need the variance output
            require_learned_variance(learn_sigma)
    except ValueError as err:
        commandline.usage_error("diffjax train", str(err))
    if is_main:
        groups, _, slices = trainer.mesh_layout(config, jax.devices())
        across = f", data parallel across {groups} {'slices' if slices else 'processes'} (DCN)" if groups > 1 else ""
        axes = " x ".join(f"{k}={v}" for k, v in mesh.shape.items() if k != "model" or v > 1)  # model: when used
        print(f"mesh: {axes} over {mesh.devices.size} devices{across}")
    process = trainer.build_process(config)
    t = config.training

    state, shardings, graphdef, rest = trainer.init_state(config, mesh)
    manager = trainer.checkpoint_manager(args.workdir, keep=args.keep)
    abstract = jax.eval_shape(lambda s: s, state)
    restored, start = trainer.restore(manager, shardings, abstract)
    if restored is not None:
        state = restored
        print(f"resumed from step {start} in {args.workdir}", flush=True)
    step = int(start or 0)
    # Step k reads global batch k of an order that is a pure function of (seed, position): a resume
    # on any number of processes or devices continues the exact sequence.
    rows = trainer.batch_rows(config, mesh)
    train_iter = data.make_iterator(
        config, "train", seed=int(config.seed), worker_count=args.data_workers, start_batch=step, with_index=True, rows=rows
    )
    order = data.GlobalOrder(config, "train", seed=int(config.seed))  # the fingerprints in metrics.jsonl
    start_step = step
    if is_main:
        from etils import epath

        (epath.Path(args.workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

    train_step = trainer.make_train_step(config, graphdef, rest, process, shardings, mesh)
    evaluate = None  # snapshots.EvalLoss, built at the first evaluation and reused
    classifier = t.loss == "classifier"  # diffjax.guidance: held-out loss and accuracy, no sample grids
    from diffjax.guidance import ClassifierEval

    evaluator = ClassifierEval if classifier else snapshots.EvalLoss
    fid_freq = int(config.eval.get("fid_freq", 0))
    training_fid = None
    if fid_freq > 0:  # reference and extractor loaded before the first step: a missing file stops here
        from diffjax.evaluation.evaluate import TrainingFID

        try:
            training_fid = TrainingFID(config, graphdef, rest, process)
        except (OSError, ValueError) as err:
            print(f"diffjax train: {err}", file=sys.stderr, flush=True)
            return 2
    fused_sharding = trainer.batch_sharding(mesh, leading=1)
    k = max(1, int(t.n_jitted_steps))
    n_iters = int(t.n_iters)
    logger = Logger(args.workdir, is_main, resume_step=step, upload_s=args.log_upload_s)
    preempted = PreemptionAgreement()

    progress = None
    if is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=n_iters, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    finished = FinishedSteps(step)  # the bar counts steps whose losses are computed, not dispatched
    pending: list[tuple[int, object]] = []  # (first step, device losses) not yet checked
    last_log_time, last_log_step = time.perf_counter(), step
    last_fp_step = step  # "data" in a log line: the fingerprint of the global batches since the last one
    batch_size = int(t.batch_size)
    # TFLOP/s per device and MFU in the log lines: one device's FLOPs per step from XLA's cost
    # analysis of the first compiled program (per device: the program is SPMD-partitioned), then
    # arithmetic on the steps/s measured anyway. XLA counts the body of a rolled scan once.
    flops_per_step: float | None = None
    unrolled = bool(t.get("scan_unroll", True))
    peak = flops.device_peak(mesh.devices.flat[0].device_kind, str(config.model.get("dtype", "float32")))

    def check_finite() -> float | None:
        """Fetch pending losses; stop with the step number at the first non-finite one."""
        if not pending:
            return None
        values = [(s0, np.asarray(jax.device_get(loss))) for s0, loss in pending]
        pending.clear()
        for s0, arr in values:
            bad = np.flatnonzero(~np.isfinite(arr))
            if bad.size:
                raise FloatingPointError(
                    f"non-finite loss {arr[bad[0]]} at step {s0 + int(bad[0]) + 1}; "
                    f"training stopped, no checkpoint written after step {manager.latest_step()}"
                )
        return float(np.mean(np.concatenate([a for _, a in values])))

    def crossed(freq, before, after):
        return freq > 0 and after // freq > before // freq

    try:
        while step < n_iters and not preempted():
            n = min(k, n_iters - step)
            local = [next(train_iter) for _ in range(n)]
            read = local[-1].pop("index")  # which examples this process read for step `step + n`
            for b in local[:-1]:
                b.pop("index")
            batches = {key: np.stack([b[key] for b in local]) for key in local[0]}  # x, label (, augment)
            batches = jax.tree.map(lambda a: jax.make_array_from_process_local_data(fused_sharding, a), batches)
            if not config.model.get("num_classes", 0):
                batches.pop("label")
            if step == start_step:  # compiled here; the call below reuses the executable
                flops_per_step = flops.step_flops(train_step.lower(state, batches).compile(), n if unrolled else 1)
            state, step_losses = train_step(state, batches)
            pending.append((step, step_losses))
            before, step = step, step + n
            finished.dispatched(step, step_losses)
            if crossed(t.log_freq, before, step) or step == n_iters or before == start_step:
                order.check(step - 1, read, rows, jax.process_index())  # this process read its slice of the order
            if crossed(t.log_freq, before, step) or step == n_iters:
                loss = check_finite()
                now = time.perf_counter()
                rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                fp = data.fingerprint(order.indices(last_fp_step, step - last_fp_step)) if is_main else ""
                last_fp_step = step
                speed = flops.throughput_metrics(flops_per_step, rate, peak)
                logger.write(
                    step, {"loss": loss, "steps_per_sec": rate, "img_per_sec": rate * batch_size, **speed, "data": fp}
                )
                if progress is not None:
                    postfix = {"loss": f"{loss:.4f}", "img_s": f"{rate * batch_size:.0f}"}
                    if "tflops_per_device" in speed:
                        postfix["tflops"] = f"{speed['tflops_per_device']:.3g}"
                    if "mfu" in speed:
                        postfix["mfu"] = f"{speed['mfu']:.1%}"
                    progress.set_postfix(postfix)
            if progress is not None:
                progress.update(finished.count() - progress.n)
            if crossed(t.eval_freq, before, step):  # every process: the eval batch spans all devices
                evaluate = evaluate or evaluator(config, graphdef, rest, process)
                eval_loss = evaluate(state)
                logger.write(step, eval_loss if isinstance(eval_loss, dict) else {"eval_loss": eval_loss})
            if training_fid is not None and (crossed(fid_freq, before, step) or step == n_iters):
                logger.write(step, training_fid(state, step))
            if crossed(t.snapshot_freq, before, step) or step == n_iters:
                check_finite()
                trainer.save(manager, step, state)
                current = learned_schedule.restored_process(process, state.get(learned_schedule.KEY))  # VDM's learned one
                path = None
                if not classifier:
                    path = snapshots.sample_grid(config, graphdef, rest, current, state, logger.samples_dir(), step)
                if path:
                    logger.image(step, "samples", path)
        if preempted.stopping:
            check_finite()
            print(f"\nSIGTERM at step {step}: saving a checkpoint before exiting", flush=True)
            trainer.save(manager, step, state, force=True)
    except FloatingPointError as err:
        print(f"\ndiffjax train: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        manager.wait_until_finished()
        if progress is not None:
            progress.update(finished.count(wait=True) - progress.n)
            progress.close()
        logger.close()
    print(f"done: step {step}; checkpoints in {args.workdir}/checkpoints", flush=True)
    return 0
