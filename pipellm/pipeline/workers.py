"""The speculative engine's worker threads.

Each takes the next task from the engine's task board (``engine.board``, see
``_tasks.pyx``: filled by plans and by the request path in C) and runs it: seal a
predicted chunk into its bounce slot, seal an item's GO command ahead into private
memory, plan (``REPLENISH``), receive device-to-host data (``RECEIVE``), or seal a piece
of a transfer encrypted on demand (``ondemand.Piece``). An idle worker naps, then blocks
on the board until it has news.

``Workers`` owns the threads, whether they are stopping, how many tasks run now, and
what the tasks cost (wall and CPU seconds). What a task does is the engine's.
"""

from __future__ import annotations

import threading
from time import perf_counter, thread_time

from .. import timeline
from ..channel import Kind
from ..channel.protocol import GO_BODY, TAG_BYTES
from ..errors import ChannelClosedError
from . import ondemand
from ._speculation import ENCRYPTING, PENDING
from ._tasks import RECEIVE, REPLENISH

#: a worker pays back emulated-clock time its tasks ran during emulation stall (see
#: EmulatedDevice.hold) once it owes this much: shorter sleeps are mostly the OS's
#: overshoot
HOLD_MIN_S = 2e-4


class Workers:
    """``n`` worker threads for ``engine`` (a ``SpeculativeEngine``); ``start()`` starts
    them (once the engine holds this object: their first look at the queue reads it)."""

    def __init__(self, engine, n: int):
        self.engine = engine
        self.stopping = False   # close(): each thread returns at its next look at the queue
        self.active = 0         # tasks running now (engine lock): wait_idle() waits for them
        self.busy_s = 0.0       # wall seconds of the tasks run
        # the CPU seconds of the same tasks (busy time less waits for the GIL or a core):
        # the least time the workers could have done this work in, on this machine as
        # loaded (cores shared with the emulated device's decryption, for one)
        self.cpu_s = 0.0
        self.threads = [threading.Thread(target=self._run, name=f"pipellm-worker-{i}", daemon=True)
                        for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def __len__(self) -> int:
        return len(self.threads)

    def _next(self, took: bool, busy: float, cpu: float):
        """The next task to run (engine lock held), or None once stopping. ``took``: this
        worker skipped the last task it took; ``busy``, ``cpu``: what the last task it ran
        cost."""
        engine, board = self.engine, self.engine.board
        self.busy_s += busy
        self.cpu_s += cpu
        if took and not board.tasks:
            # this worker skipped the last task: wake wait_idle() (after a task it ran,
            # the notify at its end did)
            engine._notify()
        if not board.tasks and engine._extend_due():
            # idle, and the last plan queued more: plan further ahead now, while the
            # cores are free (a request would plan only a few items past it)
            engine._replenish_pending = True
            board.tasks.append(REPLENISH)
            engine.counts["idle_plans"] += 1
        nap_until = board.nap_until()
        while not board.tasks and not self.stopping:
            if not board.nap(nap_until):  # (True: news, or the nap is over: look again)
                board.block()
        if self.stopping:
            return None
        return board.tasks.popleft()

    def _claim(self, task) -> bool:
        """Mark the task taken (engine lock held); False if it needs doing no more."""
        engine = self.engine
        if task is REPLENISH:
            engine._replenish_pending = False
        elif type(task) is ondemand.Piece:
            if task.state != PENDING:
                return False  # the requesting thread sealed it itself
            task.state, task.helped = ENCRYPTING, True
        elif task is not RECEIVE:
            item, chunk = task
            if chunk is None:  # the GO command, ahead, into private memory
                if item.dead or item.claimed:
                    return False
                item.go_busy = True
            elif chunk.state != PENDING:
                return False
            elif item.dead:
                engine._release(chunk)
                return False
            else:
                chunk.state = ENCRYPTING
        self.active += 1
        return True

    def _do(self, task) -> str:
        """Run a claimed task (no lock held); what it was, for the timeline."""
        engine = self.engine
        if task is REPLENISH:
            engine._spent.clear()  # (off the request path: see Queue._hit)
            with engine.sender.lock:
                try:
                    engine._replenish()
                except ChannelClosedError:  # the channel or pool closed under the plan:
                    pass                    # the next request raises it (never a worker)
            return "plan"
        if task is RECEIVE:
            engine._receive_async()
            return "receive"
        if type(task) is ondemand.Piece:
            ondemand.seal(engine, task)
            return "encrypt"
        item, chunk = task
        if chunk is None:
            self._seal_go_ahead(item)
            return "seal-go"
        engine._encrypt(item, chunk)
        return "encrypt"

    def _run(self) -> None:
        engine = self.engine
        device = engine.device
        gate = device.gate
        busy, cpu, took = 0.0, 0.0, False
        owed = 0.0  # emulated clock time this worker's tasks ran while it stood still, not yet waited
        while True:
            if not gate.is_set():  # no progress while the emulated device's clock stands still
                gated = perf_counter()
                gate.wait()
                if timeline.recording:
                    timeline.span("gated", gated, perf_counter())
            with engine._lock:
                task = self._next(took, busy, cpu)
                busy = cpu = 0.0
                if task is None:
                    return
                took = True
                if not self._claim(task):
                    continue
            frozen = device.frozen_s()
            start, cpu_start = perf_counter(), thread_time()
            try:
                what = self._do(task)
            finally:
                with engine._lock:
                    self.active -= 1
                    if not self.active:
                        engine._notify()
            took = False
            end = perf_counter()
            busy, cpu = end - start, thread_time() - cpu_start
            if timeline.recording:
                timeline.span("task:" + what, start, end, cpu)
            owed += device.frozen_s() - frozen  # the emulated clock stood still under this task
            if owed > HOLD_MIN_S:  # pay it back on the clock; a sleep's overshoot is credited
                held_from = device.now()
                if timeline.recording:
                    wall = perf_counter()
                    device.hold(owed)
                    timeline.span("gated", wall, perf_counter())
                else:
                    device.hold(owed)
                owed -= device.now() - held_from

    def _seal_go_ahead(self, item) -> None:
        engine = self.engine
        msg = None
        try:
            body = GO_BODY.pack(*item.go_dst, len(item.chunks), item.nbytes)
            msg = engine.channel.sealer.seal_into(item.go, Kind.GO, 0, 0, body,
                                                  memoryview(bytearray(len(body) + TAG_BYTES)), shared=False)
        except Exception:  # noqa: BLE001 - counted; the GO is then sealed at request time
            with engine._lock:
                engine.counts["worker_errors"] += 1
        with engine._lock:
            engine._go_sealed(item, msg)
            engine._notify()

    def wait_idle(self, timeout=None) -> bool:
        """Block until the workers have nothing left to do (planning and encryption)."""
        engine = self.engine
        with engine._cond:
            return engine._wait_for(
                lambda: not engine.board.tasks and not engine._replenish_pending and not self.active
                and not any(c.state == ENCRYPTING for i in engine._items for c in i.chunks), timeout)

    def stop(self) -> None:
        """Stop every thread and wait for it (at most 30 s each)."""
        engine = self.engine
        with engine._cond:
            self.stopping = True
            engine._cond.notify_all()
            engine.board.wake(len(self.threads))
        for t in self.threads:
            t.join(timeout=30)
