"""The deadline pool (steering.deadline_pool): results by a deadline whatever the function does; workers interrupted
by their own alarm survive, stuck ones are killed and replaced, a pool that cannot start fails fast."""

import os
import signal
import time

import pytest

from steering import deadline_pool
from steering.deadline_pool import DeadlinePool

SLACK_S = 0.5  # scheduling on a loaded 2-core machine; the measured overhead past the deadline is a few ms


@pytest.fixture(scope="module")
def pool():
    pool = DeadlinePool(2)  # no warm-up: workers start in ~0.1 s
    assert pool.wait_ready(60)
    yield pool
    pool.close()


def test_results_and_errors(pool):
    assert pool.call(abs, (-3,), 5.0).__dict__ == {"status": "ok", "value": 3}
    outcome = pool.call(int, ("not a number",), 5.0)
    assert outcome.status == "error" and "ValueError" in outcome.value
    assert pool.call(abs, (-4,), 5.0).value == 4  # the worker that raised still serves


def test_slow_work_is_interrupted_and_the_worker_survives(pool):
    before = {w.proc.pid for w in pool._workers}
    start = time.monotonic()
    outcome = pool.call(time.sleep, (60,), 0.5)  # a stand-in for a comparison that never ends
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and 0.4 <= elapsed <= 0.5 + SLACK_S, (outcome, elapsed)
    assert {w.proc.pid for w in pool._workers} == before  # interrupted by the worker's own alarm, not killed
    assert pool.call(abs, (-1,), 5.0).value == 1


def test_work_stuck_in_c_is_killed_and_the_pool_recovers(pool):
    before = {w.proc.pid for w in pool._workers}
    start = time.monotonic()
    # Work that never lets the worker's alarm handler run (as C code that does not check for signals would):
    # block SIGALRM, then sleep.
    stuck = "(__import__('signal').pthread_sigmask(0, {14}), __import__('time').sleep(60))"
    assert signal.SIG_BLOCK == 0 and signal.SIGALRM == 14
    outcome = pool.call(eval, (stuck,), 0.5)
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and 0.5 <= elapsed <= 0.5 + SLACK_S, (outcome, elapsed)
    killed = before - {w.proc.pid for w in pool._workers}
    assert len(killed) == 1
    assert pool.call(abs, (-2,), 30).value == 2  # the other worker still serves
    deadline = time.monotonic() + 30
    pid = killed.pop()
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the timed-out worker is still running"
    assert pool.wait_ready(60)  # the replacement
    assert len(pool._ready) == pool.size


def test_warm_up_runs_before_ready():
    pool = DeadlinePool(1, warmup="os:getpid")  # any importable function; it runs once in each worker
    try:
        assert pool.wait_ready(60)
        assert pool.call(abs, (-5,), 5.0).value == 5
    finally:
        pool.close()


def test_workers_that_cannot_start_fail_fast(monkeypatch):
    monkeypatch.setattr(deadline_pool, "_WORKER_BOOT", "import sys; sys.exit(3)")  # as if the warm-up failed
    pool = DeadlinePool(1)
    try:
        start = time.monotonic()
        outcome = pool.call(abs, (1,), 2.0)
        assert outcome.status == "error" and "did not start" in outcome.value
        assert time.monotonic() - start < 10  # not the start-up timeout
        assert pool.call(abs, (1,), 2.0).status == "error"  # no new process per call
        assert not pool._workers
    finally:
        pool.close()


def test_shared_pool_is_one_per_process():
    shared = deadline_pool.SharedPool()
    try:
        first = shared.get(1)
        assert shared.get(3) is first and first.size == 1  # the running pool, whatever size is asked later
        assert shared.current is first
    finally:
        first.close()
