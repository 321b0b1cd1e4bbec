"""The training worker: claim a job, train it with the engine, record progress and the outcome.

A worker holds its job with a lease that a heartbeat thread renews; one that dies (SIGKILL)
leaves a job whose lease expires, and the next claim resumes it from its checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from types import FrameType
from typing import Any, Protocol

from tunery.domain import Snapshot, TuningJob
from tunery.engine.base_models import BaseModelRegistry
from tunery.engine.fast_train import FastGemma3Train, prepare_training
from tunery.engine.specs import LoraSpec, StepReport, StopReason, TrainSpec
from tunery.engine.train import prepare_optimizer, train
from tunery.settings import Settings
from tunery.store import Store
from tunery.store.jobs import JobRepository

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5  # how often a running job looks for a cancel request
IDLE_POLL_S = 0.2  # how long an idle worker waits between claims (one indexed SELECT)
ERROR_BACKOFF_S = 5.0
PRELOAD_WAIT_S = 60.0  # the longest a worker's preload waits for the API process's


class StopSignal(Protocol):
    """A threading.Event or multiprocessing.Event."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def run_worker(
    settings: Settings,
    stop_event: StopSignal | None = None,
    *,
    worker_id: str | None = None,
    idle_poll_s: float = IDLE_POLL_S,
    preload: Sequence[str] = (),
    preload_after: StopSignal | None = None,
    training_counter: Counter | None = None,
) -> None:
    """Claim and train jobs until `stop_event` is set or SIGTERM/SIGINT arrives.

    On a stop signal the running job finishes its step, checkpoints and goes back to the queue.
    `preload`: base models to load in the background at start; claiming does not wait for them.
    `preload_after`: an event to wait for (at most PRELOAD_WAIT_S) before preloading, so the API
    process, which serves the first requests, loads its copy first on shared cores.
    `training_counter`: a shared count (`new_training_counter()`) of jobs training right now,
    which the API process reads to leave cores to them.
    """
    worker = Worker(
        settings, stop_event, worker_id or default_worker_id(), training_counter=training_counter
    )
    restore = _stop_on_signals(worker) if _in_main_thread() else None
    try:
        worker.start_preload(preload, preload_after)
        worker.run(idle_poll_s)
    finally:
        if restore is not None:
            restore()
        worker.close()


def start_worker_process(
    settings: Settings,
    preload: Sequence[str] = (),
    preload_after: StopSignal | None = None,
    training_counter: Counter | None = None,
) -> BaseProcess:
    """A fresh (spawned) process running `run_worker(settings)`; stop it with terminate().
    `preload_after` must come from `new_process_event()`, `training_counter` from
    `new_training_counter()`."""
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_process_main,
        args=(settings, list(preload), preload_after, training_counter),
        name="tunery-worker",
        daemon=True,
    )
    process.start()
    # Set from here, at once: the child's imports already run below the API's start-up.
    if settings.worker_nice and process.pid is not None and hasattr(os, "setpriority"):
        try:
            nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + settings.worker_nice)
            os.setpriority(os.PRIO_PROCESS, process.pid, nice)
        except OSError:
            log.warning("could not lower worker %s's CPU priority", process.pid, exc_info=True)
    return process


def new_process_event() -> EventType:
    """An event a worker process started by `start_worker_process` can wait on."""
    return multiprocessing.get_context("spawn").Event()


def new_training_counter() -> Counter:
    """A count, shared with worker processes, of the jobs they are training right now."""
    return multiprocessing.get_context("spawn").Value("i", 0)


def _process_main(
    settings: Settings,
    preload: Sequence[str] = (),
    preload_after: StopSignal | None = None,
    training_counter: Counter | None = None,
) -> None:
    if not logging.getLogger().handlers:  # a spawned process starts with no logging config
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(processName)s %(name)s: %(message)s"
        )
    run_worker(
        settings, preload=preload, preload_after=preload_after, training_counter=training_counter
    )


class Worker:
    """One worker's loop and state; `shutdown()` is safe to call from a signal handler."""

    def __init__(
        self,
        settings: Settings,
        stop_event: StopSignal | None,
        worker_id: str,
        training_counter: Counter | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.store = Store(settings.database_url)
        self.registry = BaseModelRegistry(settings.models_dir, device=settings.device)
        self._stop_event = stop_event
        self._shutdown = False  # a plain flag: the one thing a signal handler may touch
        self.training_counter = training_counter  # jobs training now, for the API process

    def shutdown(self) -> None:
        self._shutdown = True

    @property
    def stopping(self) -> bool:
        return self._shutdown or (self._stop_event is not None and self._stop_event.is_set())

    def close(self) -> None:
        self.store.close()

    def start_preload(self, names: Sequence[str], after: StopSignal | None = None) -> None:
        """Load `names` in a daemon thread (once `after` is set, or PRELOAD_WAIT_S passed). The
        registry loads each name once, under a lock of its own: a job on a preloading base waits
        for that load (not a second one), a job on another base loads its own at once, a job
        claimed before the preload began loads its base itself, and claiming never waits."""
        self._set_threads()
        if names:
            threading.Thread(
                target=self._preload, args=(list(names), after), name="tunery-preload", daemon=True
            ).start()

    def _preload(self, names: list[str], after: StopSignal | None) -> None:
        if after is not None:
            after.wait(PRELOAD_WAIT_S)
        for name in names:
            started = time.monotonic()
            try:
                base = self.registry.load(name)
                if not FastGemma3Train.fits(base.config, LoraSpec()):
                    base.model  # noqa: B018 (training needs the transformers model: built now)
                prepare_training(base.config, base.weights, base.kernel_cache)
                prepare_optimizer()
            except Exception:  # it will be loaded (and fail visibly) with a job that needs it
                log.exception("worker %s: preloading %s failed", self.worker_id, name)
            else:
                took = time.monotonic() - started
                log.info("worker %s: preloaded %s in %.1f s", self.worker_id, name, took)

    def _set_threads(self) -> None:
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)

    def run(self, idle_poll_s: float) -> None:
        self._set_threads()
        log.info("worker %s started", self.worker_id)
        while not self.stopping:
            try:
                job = self.store.jobs.claim_next(
                    self.worker_id, self.settings.lease_seconds, self.settings.max_job_attempts
                )
                if job is None:
                    self._sleep(idle_poll_s)
                    continue
                JobRun(self, job).run()
            except Exception:  # the database was unreachable, say; keep the worker alive
                log.exception("worker %s: error outside a job; retrying", self.worker_id)
                self._sleep(ERROR_BACKOFF_S)
        log.info("worker %s stopped", self.worker_id)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            if self._stop_event is not None:
                self._stop_event.wait(min(left, 0.2))
            else:
                time.sleep(min(left, 0.2))


class Counter(Protocol):
    """A `multiprocessing.Value("i")`: an int shared between processes, with its lock."""

    value: int

    def get_lock(self) -> Any: ...


def _add(counter: Counter | None, delta: int) -> None:
    if counter is not None:
        with counter.get_lock():
            counter.value += delta


class JobRun:
    """Training one claimed job: heartbeat, progress, cancellation, and the final state."""

    def __init__(self, worker: Worker, job: TuningJob) -> None:
        self.worker = worker
        self.job = job
        self.jobs: JobRepository = worker.store.jobs
        self.work_dir = worker.settings.adapters_dir / job.tuned_model_id
        self.cancelled = threading.Event()  # cancel requested, or the model was deleted
        self.lost = threading.Event()  # another worker holds the job now
        self._last_poll = 0.0

    def run(self) -> None:
        job, wid = self.job, self.worker.worker_id
        log.info("job %s (tunedModels/%s): claimed by %s", job.id, job.tuned_model_id, wid)
        heartbeat = Heartbeat(self.jobs, job.id, wid, self.worker.settings.lease_seconds, self.lost)
        heartbeat.start()
        try:
            result = self._train()
        except Exception as e:
            log.exception("job %s failed", job.id)
            if not self.lost.is_set():
                self.jobs.fail(job.id, f"{type(e).__name__}: {e}", worker_id=wid)
            return
        finally:
            heartbeat.stop()
        if result is None or self.lost.is_set():
            log.warning("job %s: no longer ours (deleted or re-claimed); leaving it", job.id)
            self._clean_up_if_deleted()
        elif result is StopReason.COMPLETED:
            self.jobs.finish(job.id, worker_id=wid)
            log.info("job %s succeeded", job.id)
        elif self.cancelled.is_set():
            self.jobs.cancel(job.id, worker_id=wid)
            log.info("job %s cancelled", job.id)
            self._clean_up_if_deleted()
        else:  # the worker is shutting down: hand the job back, it resumes from its checkpoint
            self.jobs.release(job.id, wid)
            log.info("job %s released back to the queue", job.id)

    def _train(self) -> StopReason | None:
        data = self.jobs.training_input(self.job.id)
        if data is None:
            return None
        hp = data.hyperparameters
        spec = TrainSpec(
            epoch_count=hp.epoch_count,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            learning_rate_multiplier=hp.learning_rate_multiplier,
        )
        base = self.worker.registry.load(data.base_model)
        counter = self.worker.training_counter
        _add(counter, 1)
        try:
            result = train(
                base,
                data.examples,
                spec,
                work_dir=self.work_dir,
                on_step=self.on_step,
                should_stop=self.should_stop,
            )
        finally:
            _add(counter, -1)
        return result.stop_reason

    def on_step(self, report: StepReport) -> None:
        snapshot = Snapshot(
            step=report.step,
            epoch=report.epoch,
            mean_loss=report.mean_loss,
            compute_time=datetime.fromtimestamp(report.compute_time, UTC),
            validation_loss=report.validation_loss,
        )
        if not self.jobs.record_snapshot(self.job.id, snapshot):
            self.cancelled.set()  # the tuned model was deleted
        wid, lease = self.worker.worker_id, self.worker.settings.lease_seconds
        if not self.jobs.renew_lease(self.job.id, wid, lease):
            self.lost.set()

    def should_stop(self) -> bool:
        if self.worker.stopping or self.lost.is_set() or self.cancelled.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            if self.jobs.is_cancel_requested(self.job.id):
                self.cancelled.set()
        return self.cancelled.is_set()

    def _clean_up_if_deleted(self) -> None:
        """A model deleted mid-training: its folder may have been rewritten by our checkpoint."""
        if self.jobs.get(self.job.id) is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)


class Heartbeat:
    """Renews a job's lease every lease/3 seconds, even while one step takes long."""

    def __init__(
        self,
        jobs: JobRepository,
        job_id: str,
        worker_id: str,
        lease_seconds: float,
        lost: threading.Event,
    ) -> None:
        self._jobs = jobs
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease = lease_seconds
        self._lost = lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                if not self._jobs.renew_lease(self._job_id, self._worker_id, self._lease):
                    self._lost.set()
                    return
            except Exception:  # a locked or unreachable database: try again next beat
                log.exception("job %s: lease renewal failed", self._job_id)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop_on_signals(worker: Worker) -> Callable[[], None]:
    """SIGTERM/SIGINT → graceful stop; a second SIGINT interrupts at once. Returns a restorer."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    received: list[int] = []

    def handle(signum: int, _frame: FrameType | None) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        worker.shutdown()

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
