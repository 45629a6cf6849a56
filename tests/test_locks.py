"""pipellm._ext.locks.Lock: the mutex the extensions take in C, used from Python as a
threading.Lock (with, acquire/release, Condition)."""

import signal
import sys
import threading
import time

import pytest

from pipellm._ext import locks
from pipellm._ext.locks import Lock


def test_it_excludes_other_threads():
    lock, state = Lock(), {"n": 0}

    def bump():
        for _ in range(300):
            with lock:
                n = state["n"]
                time.sleep(0)  # hand the GIL over between the read and the write
                state["n"] = n + 1

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["n"] == 1200 and not lock.locked()


def test_acquire_and_release_behave_as_threading_locks_do():
    lock = Lock()
    assert lock.acquire() and lock.locked()
    assert lock.acquire(blocking=False) is False
    start = time.monotonic()
    assert lock.acquire(timeout=0.05) is False
    assert time.monotonic() - start >= 0.04
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    for bad in (dict(blocking=False, timeout=1), dict(timeout=-2)):
        with pytest.raises(ValueError, match="timeout must be -1"):
            lock.acquire(**bad)
    assert not lock.locked()  # (a refused call takes nothing)


def test_a_waiter_gets_it_once_the_holder_lets_go():
    lock, got = Lock(), threading.Event()
    lock.acquire()
    t = threading.Thread(target=lambda: (lock.acquire(), got.set()))
    t.start()
    assert not got.wait(0.1)
    lock.release()  # (by its holder, while another thread waits for it)
    assert got.wait(5)
    t.join()
    assert lock.locked()


def test_only_its_holder_gives_it_back():
    """A mutex's rule: another thread's release() is refused and its exit() (a with block
    whose re-acquire a signal interrupted, as in Condition.wait) leaves the lock held;
    the holder's release works."""
    lock, taken, done = Lock(), threading.Event(), threading.Event()

    def hold():
        lock.acquire()
        taken.set()
        done.wait(5)
        lock.release()

    t = threading.Thread(target=hold)
    t.start()
    assert taken.wait(5)
    with pytest.raises(RuntimeError, match="another thread holds"):
        lock.release()
    lock.__exit__(None, None, None)
    assert lock.locked() and not lock.acquire(blocking=False)
    done.set()
    t.join()
    assert not lock.locked() and lock.acquire(blocking=False)
    lock.release()


def test_a_condition_works_over_it():
    cond, box = threading.Condition(Lock()), []

    def produce():
        time.sleep(0.05)
        with cond:
            box.append(1)
            cond.notify_all()

    threading.Thread(target=produce).start()
    with cond:
        assert cond.wait_for(lambda: box, timeout=5)
        assert cond.wait(0.01) is False  # (a timed-out wait gives the lock back, and takes it again)


def test_a_blocked_acquire_still_runs_signal_handlers():
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    lock = Lock()
    lock.acquire()
    old = signal.signal(signal.SIGUSR1, handler)
    try:
        main = threading.get_ident()
        threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            lock.acquire()  # held here: only the handler ends the wait
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert lock.locked()  # still the first holder's
    lock.release()
    assert lock.acquire(blocking=False)


def test_a_python_running_without_the_gil_is_refused(monkeypatch):
    """Free-threaded Python with the GIL forced off (PYTHON_GIL=0): the locks would not
    exclude anything, so pipellm refuses to load rather than risk an IV sealed twice."""
    locks._require_gil()  # this interpreter has it
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    with pytest.raises(ImportError, match="PYTHON_GIL=0"):
        locks._require_gil()
