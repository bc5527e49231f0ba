"""Run a function in a warm worker process and get its result by a deadline, whatever the function does.

``DeadlinePool(size, warmup=...)`` keeps ``size`` persistent worker processes; ``pool.call(fn, args, timeout_s)``
runs ``fn(*args)`` in one of them and returns an ``Outcome`` (``status`` "ok" with the value, "timeout" or "error"
with a message) within ``timeout_s`` plus a few milliseconds, the wait for a free worker included. ``fn``, its
arguments and its result travel by pickle, so ``fn`` must be importable by name.

The deadline is enforced twice. The worker, in its own main thread, arms a one-shot ``SIGALRM`` for just before the
deadline, which interrupts Python-level work (sympy evaluating ``9^{9^{9^{9}}}``, a regex scan) and leaves the worker
alive and warm. The caller waits on the worker's pipe only until the deadline, and a worker that has not answered by
then (stuck in C code that never sees the signal) is SIGKILLed and replaced. A replacement takes as long to start as
the first workers did, and meanwhile the pool is one worker short, which is why interruptible work is stopped by the
worker's own alarm rather than by a kill.

Workers are plain ``subprocess`` children running ``python -c``, not ``multiprocessing`` ones: that works from
threads, from daemonic ``multiprocessing.Pool`` workers (which may not have ``multiprocessing`` children), after
``fork`` and under ``spawn``, and never re-imports the user's ``__main__``. A worker exits when its pipe closes or its
parent dies. ``warmup`` ("package.module:function") runs in each worker before it counts as ready, so that import and
first-use costs never count against a call's deadline; the first call of a fresh pool waits for that start-up (at most
``startup_timeout_s``) and still gets its full ``timeout_s`` afterwards.

``SharedPool`` is the process-wide pool of one kind of work: started on first use, closed at interpreter exit, and
forgotten by a forked child, which starts its own (the parent's pipes are shared after ``fork``).
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

ALARM_MARGIN_S = 0.05  # how long before the deadline a worker interrupts its own work


@dataclass
class Outcome:
    status: str  # "ok", "timeout", "error"
    value: object = None  # the result ("ok"), or why not


class _WorkerDeadline(BaseException):
    """Raised by the worker's own alarm. A BaseException, so that the work's ``except Exception`` handlers (sympy's,
    math-verify's) let it through."""


def _worker_main(read_fd: str, write_fd: str, parent_pid: str, warmup: str) -> None:
    """Worker loop: receive (request id, function, args, budget in s), send back (request id, status, value)."""
    import signal

    # Ctrl-C reaches the whole process group; the parent decides what happens to its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_alarm(signum, frame):
        raise _WorkerDeadline()

    signal.signal(signal.SIGALRM, on_alarm)
    inbox = Connection(int(read_fd), writable=False)
    outbox = Connection(int(write_fd), readable=False)

    # If the parent is SIGKILLed while this worker is busy, the pipe EOF is not seen until the work ends.
    def watch_parent():
        while os.getppid() == int(parent_pid):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()

    if warmup:
        module, function = warmup.split(":")
        getattr(importlib.import_module(module), function)()
    outbox.send(("ready", os.getpid()))
    while True:
        try:
            request = inbox.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        request_id, fn, args, budget_s = request
        # This process's main thread may use SIGALRM: a one-shot timer interrupts Python-level work just before the
        # parent's deadline, so the worker answers "timeout" and stays alive and warm. Work stuck in C code never
        # sees the signal; the parent kills that worker at the deadline.
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(budget_s, 0.001))
                value = fn(*args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            reply = (request_id, "ok", value)
        except _WorkerDeadline:
            reply = (request_id, "timeout", f"interrupted after {budget_s:.2f} s")
        except BaseException as e:  # noqa: BLE001 - anything the function does is reported, never fatal
            reply = (request_id, "error", f"{type(e).__name__}: {e}")
        try:
            outbox.send(reply)
        except (EOFError, OSError):
            return  # the parent is gone
        except Exception as e:  # noqa: BLE001 - an unpicklable result
            outbox.send((request_id, "error", f"unpicklable result: {type(e).__name__}: {e}"))


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from steering.deadline_pool import _worker_main; _worker_main(*sys.argv[2:])")


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self, warmup: str):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, _PACKAGE_ROOT, str(to_child_r), str(from_child_w),
                 str(os.getpid()), warmup],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, close_fds=True,
            )
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Send SIGKILL. Safe from any thread: a thread blocked on this worker's pipe then sees EOF."""
        try:
            self.proc.kill()
        except OSError:
            pass

    def reap(self) -> None:
        """Wait for the killed process and close the pipes; only by the thread that owns the worker."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("worker (pid %s) survived SIGKILL for 5 s", self.proc.pid)
        for conn in (self.outbox, self.inbox):
            conn.close()


class DeadlinePool:
    """A fixed number of worker processes, checked out one caller at a time, replaced when killed or dead.

    ``executor`` is a thread pool of the same size, for callers that want to run several ``call``s at once."""

    def __init__(self, size: int, warmup: str | None = None, startup_timeout_s: float = 60.0):
        if size < 1:
            raise ValueError(f"a DeadlinePool needs at least one worker, got {size}")
        self.size = size
        self.warmup = warmup or ""
        self.startup_timeout_s = startup_timeout_s
        self.owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()  # started, not yet discarded (idle, busy or starting)
        self._ids = itertools.count()
        self._ready_changed = threading.Condition(self._lock)
        self._ready: set[_Worker] = set()  # warmed up and not discarded (idle or busy)
        self._ever_ready = threading.Event()  # one worker has been ready: the pool's start-up is over
        self.startup_error: str | None = None  # why a worker failed to start before any was ever ready
        self._started_at = time.monotonic()
        self._closed = False
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="deadline-pool")
        self._top_up()

    def _top_up(self) -> None:
        """Start workers until there are ``size``; each is handed out once it reports ready."""
        with self._lock:
            # No retrying when no worker has ever started: the cause (say, a warm-up that cannot import) would only
            # repeat, one process per call.
            broken = self.startup_error is not None and not self._ever_ready.is_set()
            missing = 0 if self._closed or broken else self.size - len(self._workers)
            new = []
            for _ in range(missing):
                try:
                    worker = _Worker(self.warmup)
                except Exception:  # noqa: BLE001
                    logger.exception("deadline pool: could not start a worker process")
                    break
                self._workers.add(worker)
                new.append(worker)
        for worker in new:
            threading.Thread(target=self._await_ready, args=(worker,), daemon=True).start()

    def _await_ready(self, worker: _Worker) -> None:
        try:
            ok = worker.inbox.poll(self.startup_timeout_s) and worker.inbox.recv()[0] == "ready"
        except (EOFError, OSError):
            ok = False
        if ok:
            with self._lock:
                self._ready.add(worker)
                self._ready_changed.notify_all()
            self._ever_ready.set()
            self._idle.put(worker)
        else:
            if not self._closed:  # at shutdown, close() killing a starting worker is expected
                error = (f"worker (pid {worker.proc.pid}, warm-up {self.warmup or 'none'}) did not start (exit code "
                         f"{worker.proc.poll()}); see its stderr above")
                logger.error(error)
            self._discard(worker, replace=False)
            if not self._closed and not self._ever_ready.is_set():
                self.startup_error = error  # after the discard, so that callers see a consistent pool

    def _discard(self, worker: _Worker, replace: bool = True) -> None:
        """Kill a worker now; reap it and start its replacement off the caller's path (that takes ~10-30 ms)."""
        worker.kill()
        with self._lock:
            self._workers.discard(worker)
            self._ready.discard(worker)

        def reap_and_replace():
            worker.reap()
            if replace:
                self._top_up()

        threading.Thread(target=reap_and_replace, daemon=True).start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until all ``size`` workers are warmed up (replacing any that died), or ``timeout_s``."""
        self._top_up()
        with self._ready_changed:
            return self._ready_changed.wait_for(lambda: len(self._ready) >= self.size, timeout_s)

    def _acquire(self, deadline: float) -> _Worker | None:
        self._top_up()
        while True:
            wait = deadline - time.monotonic()
            starting = not self._ever_ready.is_set()
            if starting:  # the pool is still starting: that wait is not the call's fault
                if self.startup_error is not None:
                    return None
                # In short slices, to notice a failed start-up rather than wait it out.
                wait = min(max(wait, self._started_at + self.startup_timeout_s - time.monotonic()), 0.1)
            try:
                worker = self._idle.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if starting and time.monotonic() < self._started_at + self.startup_timeout_s:
                    continue
                return None
            if worker.alive():
                return worker
            self._discard(worker)  # died while idle (OOM killer...): replace it and take another

    def call(self, fn, args: tuple, timeout_s: float) -> Outcome:
        """Run ``fn(*args)`` in a worker; give up at ``timeout_s`` after the call (waiting for a worker included)."""
        deadline = time.monotonic() + timeout_s
        starting = not self._ever_ready.is_set()
        worker = self._acquire(deadline)
        if worker is None and self.startup_error is not None and not self._ever_ready.is_set():
            return Outcome("error", self.startup_error)
        if worker is None:
            return Outcome("timeout", "no free worker before the deadline")
        if starting:  # the wait was for the pool's start-up: the call still gets its full time
            deadline = time.monotonic() + timeout_s
        request_id = next(self._ids)
        healthy = False
        try:
            # The worker interrupts itself a little before the deadline (and survives); the kill below is for work
            # that ignores the signal.
            budget = deadline - time.monotonic() - ALARM_MARGIN_S
            worker.outbox.send((request_id, fn, args, budget))
            if not worker.inbox.poll(max(deadline - time.monotonic(), 0.0)):
                return Outcome("timeout", f"no answer within {timeout_s} s; worker killed")
            reply_id, status, value = worker.inbox.recv()
            if reply_id != request_id:
                return Outcome("error", f"worker replied to request {reply_id}, expected {request_id}")
            healthy = True
            return Outcome(status, value)
        except (EOFError, OSError) as e:
            return Outcome("error", f"worker pipe failed: {type(e).__name__}: {e}")
        finally:
            # Only a worker that answered this very request goes back; any other (timed out, broken, or interrupted
            # mid-request with a reply still in flight) is killed and replaced.
            if healthy:
                self._idle.put(worker)
            else:
                self._discard(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
        for worker in workers:
            worker.kill()
        for worker in workers:
            try:
                worker.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)


class SharedPool:
    """The process-wide ``DeadlinePool`` of one kind of work, started by the first ``get``.

    Its workers are killed at interpreter exit; a forked child forgets the parent's pool (it must not use or kill
    workers whose pipes it shares) and starts its own on first use. Hold ``lock`` to look at ``current`` and act on
    it atomically with respect to ``get``."""

    def __init__(self, warmup: str | None = None, startup_timeout_s: float = 60.0):
        self.warmup = warmup
        self.startup_timeout_s = startup_timeout_s
        self.lock = threading.Lock()
        self.current: DeadlinePool | None = None
        atexit.register(self._close_at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def get(self, size: int) -> DeadlinePool:
        """The running pool, or a new one of ``size`` workers."""
        with self.lock:
            if self.current is None:
                self.current = DeadlinePool(size, self.warmup, self.startup_timeout_s)
            return self.current

    def _close_at_exit(self) -> None:
        pool = self.current
        if pool is not None and pool.owner_pid == os.getpid():
            pool.close()

    def _forget(self) -> None:
        self.current = None
        self.lock = threading.Lock()  # another thread of the parent may have held it at the fork
