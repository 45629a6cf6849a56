"""``mode="pipellm"``: speculative pipelined encryption.

After each request the predictor names the next transfers. Each predicted transfer (an
*item*) gets its message indices now: one for the GO command that will send it, one per
chunk. Worker threads encrypt the chunks ahead of time, straight into bounce slots, as
``Kind.SPEC`` messages that name no destination. When the application asks for exactly
that (region, offset, length) and the region is unchanged since (its write token), the
host seals a small GO command (where the data lands) and only the DMA remains.

Mispredictions (strict IV order): speculative ciphertext already sits in shared memory,
so its indices can never be used for other plaintext (a fresh NOP under them would be
GCM nonce reuse). Instead the host seals one SKIP command under the unexposed GO index of
the oldest item: the device's expected index jumps to the requested item (whose
ciphertext is then used), or past everything reserved (then the request is encrypted on
demand and speculation restarts). GO indices are only sealed at request time, so the
head of the queue always has an unexposed index for that command. With
``iv_order="window"`` the device accepts any unused index in a sliding window: a
misprediction costs only the wasted encryption, and items ahead stay usable.

Device to host: chunks are authenticated and decrypted by the workers in the background
as they arrive; waiting on the transfer, reading the region or synchronizing waits for
(or does) the rest.

The engine is parts with one job each. The queue, its items and chunks, its books and
the request path (``to_device`` and a hit) are C: the engine derives from
``_speculation.pyx``'s ``Queue``. What is not encrypted ahead goes as cc sends and
receives it: the cc engine is a member (``self.cc``: its secure channel, sender and
receiver). The workers are ``workers.py`` (their task board ``_tasks.pyx``), misses sealed
in pieces ``ondemand.py``, the payoff controller ``payoff.py``. This module holds the
rest: claims that are not a plain hit, relinquishing, the planner's policy, background
receiving.
"""

from __future__ import annotations

import os
import threading
import warnings
from time import perf_counter

from .. import timeline
from ..channel import Kind
from ..channel.protocol import FIRST, GO_BODY, LAST, SKIP_BODY, TAG_BYTES
from ..errors import ChannelClosedError, DepthWarning, PredictorWarning, TransferTimeoutError
from ..predictors import Predictor
from ._speculation import (  # noqa: F401 - the policy's constants, re-exported
    ACCURACY_ALPHA, ACCURACY_FLOOR, ENCRYPTING, FAILED, FRUITLESS_PLANS, GO_MESSAGE_BYTES,
    INLINE_PLANNING_BELOW, MAX_PLAN_SKIP, MAX_UNHEARD_EVENTS, PENDING, READY, STEAL_PLAN_BELOW, STRICT_MIN_DEPTH, Chunk,
    Item, Queue)
from . import ondemand
from .payoff import Payoff
from ._tasks import RECEIVE, REPLENISH
from .cc import CCEngine
from .secure import slot_bytes_for
from .workers import Workers


def _may_overlap(incoming, region, offset: int, nbytes: int) -> bool:
    """Whether device-to-host data still coming into ``region`` (its last pending chunk
    ``incoming``) may land in its bytes ``[offset, offset + nbytes)``: within the span of
    the transfers pending into the region (``_Landing.pending``; only known in the
    region's own offsets when it is the destination, so anything else may). A chunk
    encrypted beside landings elsewhere in the region stays valid (library writes are
    logged by range: one into its bytes makes it stale, and it is sent on demand; a stale
    head costs strict order every item queued behind it)."""
    landing = getattr(incoming, "landing", None)
    if landing is None or landing.region is not region:
        return True
    lo, hi = landing.pending
    return offset < hi and lo < offset + nbytes


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


class SpeculativeEngine(Queue):
    """The pipellm engine: the queue (its C base, with the request path), the cc engine
    as a member (its secure channel, sender and receiver: what is not encrypted ahead is
    sent and received as cc does), the planner's policy and the workers (``workers.py``)."""

    mode = "pipellm"
    #: an idle worker plans further ahead while plans keep queueing more (see _extend_due)
    plan_when_idle = True

    def __init__(self, device, *, timeout, chunk_size, bounce_bytes, rotate_after, predictor: Predictor,
                 regions: dict, workers: int, depth_bytes: int, depth_messages: int, iv_order: str,
                 iv_window: int, lookahead: int, min_speculative_bytes: int, adaptive: bool = True,
                 on_demand_helpers: int = 0):
        window = iv_window if iv_order == "window" else 0
        self.cc = CCEngine(device, timeout=timeout, chunk_size=chunk_size, bounce_bytes=bounce_bytes,
                           rotate_after=rotate_after, window=window)
        channel = self.channel = self.cc.channel
        self.device, self.timeout, self.chunk_size = device, timeout, chunk_size
        spec_pool = channel.pinned_pool("depth_bytes", depth_bytes, chunk_size + TAG_BYTES + GO_MESSAGE_BYTES,
                                        minimum=1)
        super().__init__(channel.sources, self.cc.sender, spec_pool, predictor=predictor, regions=regions,
                         depth_messages=depth_messages, lookahead=lookahead,
                         min_speculative_bytes=min_speculative_bytes)
        # SKIP commands (GO commands ride in their item's first slot)
        self.cmd_pool = channel.pinned_pool("command slots", 16 * slot_bytes_for(GO_BODY.size),
                                            GO_BODY.size + TAG_BYTES)
        # sections of the engine's lock that neither wait nor notify take it directly (a
        # Condition's __enter__ and __exit__ are Python frames, the lock's are not)
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # threads in _wait_for: a notification with none is skipped
        self.receiver = self.cc.receiver
        self.receiver.on_delivered = self._delivered
        self._receive_pending = False
        self._grew = False     # the last plan queued something (an idle worker may plan on)
        self._payoff = Payoff() if adaptive else None  # speculation on only while it pays
        self.on_demand_helpers = on_demand_helpers  # idle workers that may seal pieces of a miss
        self.hit_wait_s = 0.0  # requests waiting for a worker to finish their chunks
        self.workers = Workers(self, workers)
        self.workers.start()

    # (both read the engine's channel, as the cc engine's do)
    session = CCEngine.session
    failure_reported = CCEngine.failure_reported

    # -- host to device ----------------------------------------------------------------------
    # the request path is the queue's (to_device, in C: a hit is sent without a Python
    # frame); it calls _request below for everything but a hit

    def _request(self, key, region, offset, nbytes, dst, dst_offset, stream) -> tuple[bool, bool]:
        """A request that is not a plain hit (h2d lock held): claim what speculation has
        for it, or relinquish and send on demand. Returns (claimed, throttled)."""
        self._adapt()
        speculating = bool(self._items)
        item = self._claim(key)
        if item is None and self._shadow is not None:
            # throttled: score the shadow guesses (items left in the queue from before
            # the throttle say nothing about the predictor now)
            guessed = key in self._shadow
            self.counts["shadow_hits"] += guessed
            self._score(guessed)
        elif speculating:
            self._score(item is not None)
        throttled = self._throttle
        self._shadow = self._shadow_guess() if throttled else None
        if item is not None:
            self._send_item(item, dst, dst_offset, stream)
        else:
            self.counts["misses"] += 1
            self._count_reencrypted(key)
            self._send_on_demand(region, offset, nbytes, dst, dst_offset, stream)
        return item is not None, throttled

    def _shadow_guess(self):
        """The keys a plan would queue now, scored against the next request: a hit if the
        queue would have held it (a fan-out predictor names several candidates for one
        request; costs one predict per request, no encryption, no slots)."""
        self._feed()
        guesses = self._ask(self.lookahead)
        if not guesses:
            return None
        return frozenset((p.region, p.offset, p.nbytes) for p in guesses)

    def _claim(self, key) -> Item | None:
        """The queued item for ``key`` if it can be sent; drops what the request makes useless."""
        with self._lock:
            if self.sender.window:
                self._expire()
            item = self._by_key.get(key)
            if item is None:
                return None
            if item.failed or not self._current(item):
                self.counts["stale"] += 1
                self._drop(item)
                return None
            if not self.sender.window:  # strict order: everything queued before it is lost
                while self._items[0] is not item:
                    self._drop(self._items[0])
            self._remove(item)
            item.claimed = True
            return item

    def _skip_to(self, target: int) -> None:
        """Strict order: make the device expect ``target`` next with one SKIP command, sealed
        under the index it expects now (always an unexposed GO index: GO commands are
        sealed only when their transfer is requested), sent now."""
        if self.sender.window or self._expect >= target:
            return
        self._send_lead(self._seal_skip(target), self.device.default_stream)

    def _seal_skip(self, target: int) -> tuple:
        """Strict order: the SKIP command to ``target`` (see ``_skip_to``) sealed into a
        command slot, not sent: a claimed item sends it first in its own submission (one
        submission, not two). Returns (ticket, slot, message): the lead of a submission.
        From here the device is taken to expect ``target``; a lead never sent closes the
        channel (``_drop_lead``): its index was exposed."""
        ticket = self._go_tickets.pop(self._expect)
        body = SKIP_BODY.pack(target)
        try:
            slot = self.cmd_pool.acquire(len(body) + TAG_BYTES, self.timeout)
        except BaseException:
            self._keep_or_fail(ticket)
            raise
        try:
            msg = self.channel.sealer.seal_into(ticket, Kind.SKIP, 0, 0, body, slot.view(len(body) + TAG_BYTES))
        except BaseException:
            self.cmd_pool.release(slot)
            self._keep_or_fail(ticket)
            raise
        self.counts["nops"] += 1
        self.counts["skipped_messages"] += target - self._expect - 1
        self._expect = target
        for index in [i for i in self._go_tickets if i < target]:
            del self._go_tickets[index]
        return ticket, slot, msg

    def _send_lead(self, lead: tuple, stream) -> None:
        """Submit a sealed SKIP on its own (the item it led falls back to on demand)."""
        ticket, slot, msg = lead
        try:
            op = self.device.submit_messages(stream, self.sender.session, (msg,))
        except BaseException:
            self._drop_lead(lead)
            raise
        self._lead_sent(lead, op)

    def _lead_sent(self, lead: tuple, op) -> None:
        """A lead's submission is on its way: its slot back once the device has read it."""
        self.cmd_pool.retire(lead[1], op)
        self._high = max(self._high, lead[0].index)

    def _drop_lead(self, lead: tuple) -> None:
        """A sealed lead that will not be sent: its slot back; its index was exposed, so
        strict order closes the channel (``_keep_or_fail``)."""
        self.cmd_pool.release(lead[1])
        self._keep_or_fail(lead[0])

    def _send_on_demand(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        if not self.sender.window:
            with self._cond:
                if self._items:
                    self.counts["relinquishes"] += 1
                while self._items:
                    self._drop(self._items[0])
            self._skip_to(self.channel.sealer.next_index)
        try:
            self.send_data(region, offset, nbytes, dst, dst_offset, stream)
        finally:  # also after a failure part-way: whatever was sealed is on its way
            self._sent(self.channel.sealer.next_index - 1)

    def send_data(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        """Encrypt on demand (h2d lock held): with idle workers' help where the transfer
        is large enough to share (see ondemand.py), else chunk by chunk as cc does."""
        helpers = 0
        if nbytes >= 2 * ondemand.MIN_PIECE and self.on_demand_helpers and self.speculating:
            with self._lock:
                if not self.board.tasks:
                    helpers = min(self.board.idle + self.board.napping, len(self.workers), self.on_demand_helpers)
        if helpers:
            ondemand.send(self, region, offset, nbytes, dst, dst_offset, stream, helpers)
        else:
            self.sender.send_data(region, offset, nbytes, dst, dst_offset, stream)

    def _keep_or_fail(self, ticket) -> None:
        """A send under ``ticket`` failed. Unused, the ticket stays available (strict order
        skips with it). Used, its message was exposed but never reached the device: in
        strict order nothing can ever stand in for that index, so the channel closes
        (fail closed, and no index is ever sealed twice); in window order it is just an
        index never delivered."""
        if not ticket.used:
            self._go_tickets[ticket.index] = ticket
        elif not self.sender.window and self.channel.sealer.failure is None:  # (else closed, with its cause)
            self.channel.fail(ChannelClosedError(f"h2d message {ticket.index} was sealed but could not be sent: "
                                                 f"strict order cannot pass it, the channel is closed"))

    def _send_item(self, item: Item, dst, dst_offset, stream) -> None:
        try:
            lead = None
            if not self.sender.window and self._expect < item.go.index:
                if item.chunks:  # the SKIP goes first in the item's own submission
                    lead = self._seal_skip(item.go.index)
                else:
                    self._skip_to(item.go.index)
            if not item.chunks:  # a held place: seal the data now, under the index kept for it
                ticket = self._go_tickets.pop(item.go.index)
                sender, data = self.sender, item.region.view[item.offset:item.offset + item.nbytes]
                try:
                    sender.send_sealed(sender.pool, item.nbytes, stream, lambda out: sender.sealer.seal_into(
                        ticket, Kind.DATA, dst.id, dst_offset, data, out, order=sender.order,
                        flags=FIRST | LAST | sender.abandon))
                except BaseException:
                    self._keep_or_fail(ticket)
                    raise
                self.sender.abandon = 0
                self._sent(ticket.index)
                self.hits += 1
                self.counts["held_places"] += 1
                return
            self._send_speculated(item, dst, dst_offset, stream, lead)
        except BaseException:
            with self._cond:
                self._discard(item)
            raise

    def _send_speculated(self, item: Item, dst, dst_offset, stream, lead=None) -> None:
        chunks = item.chunks
        try:
            with self._cond:
                waiting = [c for c in chunks if c.state != READY]
                if item.go_busy:  # a worker is sealing the GO ahead: it takes microseconds
                    self._wait_for(lambda: not item.go_busy)
                private = item.go_private if item.go_dst == (dst.id, dst_offset) else None
            if waiting:
                for chunk in waiting:
                    self._ensure_ready(item, chunk)
                if any(c.state != READY for c in waiting) or not self._current(item):
                    # a worker failed on it, or its bytes changed while it was finished: fall back
                    with self._cond:
                        self.counts["stale"] += 1
                        self._discard(item)
                    self.counts["misses"] += 1
                    if lead is not None:  # it goes alone (_send_lead drops it if that fails)
                        lead, sent = None, lead
                        self._send_lead(sent, self.device.default_stream)
                    self._send_on_demand(item.region, item.offset, item.nbytes, dst, dst_offset, stream)
                    return
        except BaseException:
            if lead is not None:
                self._drop_lead(lead)
            raise
        self._send_go(item, private, dst, dst_offset, stream, lead)

    def _ensure_ready(self, item: Item, chunk: Chunk) -> None:
        """The chunk encrypted: by a worker (wait for it) or, if none took it yet, here."""
        with self._cond:
            if chunk.state == PENDING:
                chunk.state = ENCRYPTING
                mine = True
                self.counts["stolen_chunks"] += 1
            else:
                mine = False
                start = perf_counter()
                if not self._wait_for(lambda: chunk.state in (READY, FAILED), self.timeout):
                    raise TransferTimeoutError(f"a worker did not finish encrypting a chunk within {self.timeout} s")
                end = perf_counter()
                self.hit_wait_s += end - start
                if timeline.recording:
                    timeline.span("wait-worker", start, end)
        if mine:
            self._encrypt(item, chunk)

    def to_host(self, src, src_offset, region, offset, nbytes, stream):
        transfer = self.receiver.to_host(src, src_offset, region, offset, nbytes, stream)
        self.transfers_d2h += 1
        self.bytes_d2h += nbytes
        if getattr(self.predictor, "uses_d2h", True):
            with self.sender.lock:  # the predictor is told every transfer, in order
                self._tell((region.name, offset, nbytes, "d2h", stream.id, perf_counter()))
            self._plan_later()
        return transfer

    def _take_pending_plan(self) -> bool:
        """Take back a planning task no worker has started (requests come faster than the
        workers plan): True if there was one, and the caller plans now instead."""
        with self._cond:
            if not self._replenish_pending:
                return False
            self._replenish_pending = False
            self.board.tasks.remove(REPLENISH)
            self.counts["stolen_plans"] += 1
            return True

    def _predictor_failed(self, exc: Exception) -> None:
        self.counts["predictor_errors"] += 1
        if self.counts["predictor_errors"] == 1:
            warnings.warn(f"predictor {self.predictor!r} raised {exc!r}; the transfers it planned for are "
                          f"encrypted on demand (counted in stats()['predictor_errors'])", PredictorWarning,
                          stacklevel=2)

    def _oversized(self, key, nbytes: int) -> None:
        """A predicted transfer larger than the depth: never encrypted ahead (counted;
        said once, with the depth that would take it)."""
        self.counts["oversized_predictions"] += 1
        if self.counts["oversized_predictions"] == 1:
            warnings.warn(f"a predicted transfer of {nbytes} bytes (region {key[0]!r}) is larger than the "
                          f"speculation depth (depth_bytes={self.spec_pool.cap_bytes}, at most {self.depth_messages}"
                          f" messages): transfers that large are encrypted on demand; a Pipeline with "
                          f"depth_bytes >= {2 * nbytes} encrypts them ahead", DepthWarning, stacklevel=2)

    def _evict(self, wanted: set) -> bool:
        """Make room for what the predictor names now: drop the oldest queued item it no
        longer names (window order keeps mispredicted items, which would otherwise fill
        the depth). False if there is none."""
        with self._cond:
            for item in self._items:
                if item.key not in wanted:
                    self.counts["evicted"] += 1
                    self._drop(item)
                    return True
        return False

    def _hold_place(self, key, region) -> None:
        """A small predicted transfer is not encrypted ahead (its AES costs less than the
        speculation would): it only keeps its place in the channel's order, an index it
        will be sealed under, on demand, when requested. Strict order then needs no SKIP
        for it, and nothing of it is exposed before the request."""
        if self._queued_messages + 1 > self.depth_messages:
            return
        (ticket,) = self.channel.sealer.reserve_run(1)
        self._go_tickets[ticket.index] = ticket
        item = Item(key, region, key[1], key[2], None, ticket, [], None)
        with self._cond:
            self._items.append(item)
            self._by_key[key] = item
            self._queued_messages += 1

    def _drop(self, item: Item) -> None:
        """Give up on a queued item (engine lock held): its indices will be skipped or expire."""
        if item.dead:
            return
        self._remove(item)
        self._discard(item)

    def _discard(self, item: Item) -> None:
        """An item out of the queue is given up (engine lock held): slots back, no longer
        usable; its GO index stays available for a SKIP in strict order."""
        if item.dead:
            return
        item.dead = True
        if self.sender.window:  # nothing will ever skip past it: forget its GO index now
            self._go_tickets.pop(item.go.index, None)
        self._dropped[item.key] = item.nbytes
        while len(self._dropped) > 4096:
            self._dropped.popitem(last=False)
        for chunk in item.chunks:
            if chunk.state != ENCRYPTING:  # a worker on it releases the slot when done
                self._release(chunk)

    def _release(self, chunk: Chunk) -> None:
        if chunk.state == READY:
            self.counts["wasted_bytes"] += chunk.nbytes
        if chunk.slot is not None and chunk.slot.live:  # (not once sent: retired with its op)
            self.spec_pool.release(chunk.slot)
            chunk.slot = None

    def _expire(self) -> None:
        """Window order: drop items whose indices fell out of the receiver's window."""
        if not self.sender.window:
            return
        floor = self._high - self.sender.window + 1
        while self._items and self._items[0].go.index < floor:
            self.counts["expired"] += 1
            self._drop(self._items[0])

    def _replenish(self):
        # (every plan, the requesting thread's too: whether it queued more is what lets an
        # idle worker plan on)
        if not self._adapt():
            self._grew = False
            return
        before = len(self._items)
        self.counts["plans"] += 1
        Queue._replenish(self)
        self._grew = len(self._items) > before

    def _plan_later(self):
        if self.speculating:
            Queue._plan_later(self)

    @property
    def speculating(self) -> bool:
        """Whether speculation is on now (the controller's last word; always, without one).
        Off, the workers stand aside: no plans, no help, no background receiving."""
        return self._payoff is None or self._payoff.speculating

    def _adapt(self) -> bool:
        """Whether to speculate now (h2d lock held): see payoff.py."""
        if self._payoff is None:
            return True
        return self._payoff.update(self.transfers_h2d, self.bytes_h2d, self.device.now())

    def _extend_due(self) -> bool:
        """An idle worker plans further ahead (engine lock held) while the last plan grew
        the queue, the queue is short of the lookahead, and nothing else is pending."""
        return (self.plan_when_idle and self._grew and not self._replenish_pending and not self._throttle
                and not self.workers.stopping and len(self._items) < self.lookahead)

    def _encrypt(self, item: Item, chunk: Chunk) -> None:
        """Seal one speculative chunk into its slot, unless the region changed since its token."""
        state, msg = FAILED, None
        region = item.region
        try:
            incoming = region.incoming
            if incoming is not None and _may_overlap(incoming, region, item.offset + chunk.offset, chunk.nbytes):
                region.wait(self.timeout)  # device-to-host data still coming into these bytes lands first
            chunk.lib_seq = region.lib_seq
            if region.unchanged_since(item.token):
                start = item.offset + chunk.offset
                msg = self.channel.sealer.seal_into(chunk.ticket, Kind.SPEC, 0, chunk.offset,
                                                    region.view[start:start + chunk.nbytes],
                                                    chunk.slot.view(chunk.nbytes + TAG_BYTES), recoverable=True)
                state = READY
        except Exception:  # noqa: BLE001 - counted; the request falls back to on-demand
            with self._lock:
                self.counts["worker_errors"] += 1
        with self._lock:
            chunk.msg, chunk.state = msg, state
            if state == FAILED:
                item.failed = True
            if state == READY:
                item.ready += 1
                self.counts["speculative_bytes"] += chunk.nbytes
            if item.dead:
                self._release(chunk)
            self._notify()

    def _wait_for(self, predicate, timeout=None) -> bool:
        """``self._cond.wait_for`` (engine lock held), counted: see _notify."""
        self._waiting += 1
        try:
            return self._cond.wait_for(predicate, timeout)
        finally:
            self._waiting -= 1

    def _notify(self) -> None:
        """Wake the threads in _wait_for (engine lock held). Most tasks end with none
        waiting, and a Condition's notify_all is several Python frames."""
        if self._waiting:
            self._cond.notify_all()

    def wait_speculation(self, timeout=None) -> bool:
        """Block until the workers have nothing left to do (planning and encryption)."""
        return self.workers.wait_idle(timeout)

    # -- device to host: decrypted in the background --------------------------------------------
    def _delivered(self, msg) -> None:
        """The receiver's hook: the link delivered ``msg`` (device thread)."""
        if len(msg.payload) - TAG_BYTES < self.min_speculative_bytes or not self.speculating:
            # small: its AES costs less than handing it to a worker; it is received when
            # needed (a wait, a read of the region, a bounce slot to reuse) or by the
            # next large message's task, in order
            return
        self._schedule_receive()

    def _schedule_receive(self) -> None:
        """Have a worker receive what has been delivered (one task at a time is queued)."""
        with self._cond:
            if not self._receive_pending:
                self._receive_pending = True
                self.board.tasks.appendleft(RECEIVE)
                self.board.wake(1)

    def _receive_async(self) -> None:
        """Receive what has been delivered, chunk by chunk: claim the next one, hand what
        is left to another worker (so several decrypt at once), decrypt, commit in channel
        order. Stops when a thread comes to wait for a chunk: it claims the next ones
        itself (on a small machine the waiting thread has the core)."""
        receiver = self.receiver
        with self._cond:
            self._receive_pending = False
        while not receiver.waiters:
            with receiver.lock:
                if not (receiver.expected and receiver.inbox):
                    return
                if not receiver.expected[0].op.finished:
                    # never hold the receive lock across a wait for the device: a thread
                    # that comes to wait would wait behind it (the next delivery's task,
                    # or that thread, receives it)
                    return
                chunk = receiver.claim_head(self.timeout)
                if chunk is None:
                    return
                more = bool(receiver.expected and receiver.inbox)
            if more:
                self._schedule_receive()
            with receiver.lock:
                receiver.decrypt_claimed(chunk)
                if chunk.outcome is True:
                    self.counts["async_decrypted_bytes"] += chunk.nbytes

    # -- lifetime -------------------------------------------------------------------------------
    def failure(self) -> BaseException | None:
        """The error that closed the channel, on either side, if any."""
        return self.channel.failure()

    def drain(self, timeout) -> None:
        """Receive every expected device-to-host chunk."""
        self.receiver.drain(timeout)

    def adopt(self, region) -> None:
        """Write-protect library-owned regions now (mprotect's cost grows with the
        region), not on the first speculation, which would put that cost on a request."""
        if region.tracking == "protect":
            region.token()

    def forget(self, region) -> None:
        with self._cond:
            for item in [i for i in self._items if i.region is region]:
                self._drop(item)

    def close(self) -> None:
        self.workers.stop()
        with self._cond:
            for item in list(self._items):
                self._drop(item)
            self._spent.clear()  # (their messages' views of the pools: the pools unmap now)
        self.cc.close()
        self.spec_pool.close()
        self.cmd_pool.close()

    def stats(self) -> dict:
        out = self.cc.stats()  # (the channel's and the bounce pool's; the requests were this engine's)
        out.update(transfers_h2d=self.transfers_h2d, transfers_d2h=self.transfers_d2h, bytes_h2d=self.bytes_h2d,
                   bytes_d2h=self.bytes_d2h)
        counts = {"hits": self.hits, **self.counts}
        requests = counts["hits"] + counts["misses"]
        counts["hit_rate"] = counts["hits"] / requests if requests else 0.0
        counts["worker_busy_s"] = self.workers.busy_s
        counts["worker_cpu_s"] = self.workers.cpu_s
        counts["hit_wait_s"] = self.hit_wait_s
        counts["predictor_s"] = self.predictor_s
        counts["min_speculative_bytes"] = self.min_speculative_bytes
        counts["on_demand_helpers"] = self.on_demand_helpers
        if self._payoff is not None:
            counts["speculating"] = self._payoff.speculating
            counts["payoff_switches"] = self._payoff.switches
            counts["payoff_rates"] = dict(on=self._payoff.rates[True], off=self._payoff.rates[False])
        counts["workers"] = len(self.workers)
        counts["iv_order"] = "window" if self.sender.window else "strict"
        counts["queued_items"] = len(self._items)
        counts["prediction_accuracy"] = self._accuracy
        out.update(counts)
        out["speculation_pool"] = {"cap_bytes": self.spec_pool.cap_bytes, "in_use_bytes": self.spec_pool.in_use,
                                   "high_water_bytes": self.spec_pool.high_water}
        return out
