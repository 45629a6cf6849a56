# cython: language_level=3
"""The speculative engine's hot state in C: predicted transfers (items), their chunks,
the queue of them and its books, and what a hit does with them.

``pipeline/speculative.py`` is the engine; its class derives from :class:`Queue`, so the
request path reads the queue's fields and the items' as C struct members, and runs the
hit (check the head, claim it, expose its GO command, submit) without a Python frame.
The queue's fields are set by its own ``__init__``; the channel's order and lock are the
cc sender's (``_sender.pyx``), which it holds typed.
In Python, the same hit cost 3.3x a plain request on the requesting thread, all of it
glue around the AES (docs/figures.md).
"""

from collections import OrderedDict, deque
from time import perf_counter, thread_time

from pipellm.channel.protocol import GO_BODY, TAG_BYTES as _TAG_BYTES

from pipellm.channel import Kind
from pipellm import timeline
from pipellm.errors import ArgumentTypeError, UsageError
from pipellm._ext.bounce cimport BouncePool, Slot
from pipellm._ext.locks cimport Lock
from pipellm.pipeline._region cimport RegionBase
from pipellm.pipeline._request cimport Engine
from pipellm.pipeline._sender cimport Sender
from pipellm.pipeline._tasks cimport TaskBoard
from pipellm.pipeline._tasks import REPLENISH
from pipellm.channel._message cimport Endpoint, Message, Ticket, _expose, _expose_into, _exposed, _reserve_run
from pipellm.devices._clock cimport _perf_counter
from pipellm.devices._submission cimport Stream, Submitter
from pipellm._ext.writeguard cimport token as _token, unchanged as _unchanged
from pipellm.predictors.base import Prediction, TransferEvent, _new_tuple

PENDING, ENCRYPTING, READY, FAILED = range(4)
cdef int _READY = READY
cdef Py_ssize_t TAG_BYTES = _TAG_BYTES
GO_MESSAGE_BYTES = GO_BODY.size + _TAG_BYTES
cdef Py_ssize_t _GO_MESSAGE_BYTES = GO_MESSAGE_BYTES
#: adaptive speculation: a moving average of hits (weight of the newest request) and the
#: level below which speculation stops; a stopped pipeline keeps scoring what a plan would
#: queue against each request ("shadow" predictions, nothing encrypted) and resumes once
#: those guesses hit again
ACCURACY_ALPHA = 0.125
ACCURACY_FLOOR = 0.25
cdef double _ALPHA = ACCURACY_ALPHA, _FLOOR = ACCURACY_FLOOR
#: plan the next speculation on the requesting thread when fewer items than this are
#: queued; with fewer than STEAL_PLAN_BELOW queued, also when no worker has started the
#: plan asked for at the previous request (back-to-back requests would outrun a worker
#: that waits for the GIL). Otherwise a worker plans. (Taking the plan back at any depth
#: put a whole plan on every back-to-back request: a single-chunk hit then cost more
#: than a cc request, see docs/figures.md.)
INLINE_PLANNING_BELOW = 2
STEAL_PLAN_BELOW = 4
cdef Py_ssize_t _INLINE_BELOW = INLINE_PLANNING_BELOW, _STEAL_BELOW = STEAL_PLAN_BELOW
#: transfers are told to the predictor when it is next asked (by the planner, mostly on
#: a worker); past this many unheard ones the requesting thread tells it itself
MAX_UNHEARD_EVENTS = 256
cdef Py_ssize_t _MAX_UNHEARD = MAX_UNHEARD_EVENTS
#: items sent by hits and not yet freed by a worker, at most (past it, a hit frees them)
MAX_SPENT = 64
cdef Py_ssize_t _MAX_SPENT = MAX_SPENT
#: strict order: the fewest predicted transfers to queue, however inaccurate the predictor
STRICT_MIN_DEPTH = 2
#: plans in a row that may name transfers yet queue nothing (small or untracked ones)
#: before planning backs off, skipping up to MAX_PLAN_SKIP chances to plan
FRUITLESS_PLANS = 2
MAX_PLAN_SKIP = 16
cdef Py_ssize_t _STRICT_MIN_DEPTH = STRICT_MIN_DEPTH, _FRUITLESS = FRUITLESS_PLANS, _MAX_SKIP = MAX_PLAN_SKIP
cdef object _go_view(Chunk first):
    """Where an item's GO command goes: in its first chunk's slot, after the chunk."""
    cdef Py_ssize_t at = first.nbytes + TAG_BYTES
    return (<Slot?>first.slot)._view(at, at + _GO_MESSAGE_BYTES)


cdef class Chunk:
    """One chunk of an item: sealed by a worker into its bounce slot under its ticket."""

    cdef public Ticket ticket
    cdef public object slot, msg
    cdef public Py_ssize_t offset, nbytes
    cdef public int state
    cdef public long long lib_seq  # the region's library-write count when it was encrypted

    def __init__(self, Ticket ticket, slot, Py_ssize_t offset, Py_ssize_t nbytes):
        self._set(ticket, slot, offset, nbytes)

    cdef _set(self, Ticket ticket, slot, Py_ssize_t offset, Py_ssize_t nbytes):  # (__init__, and C without its call)
        self.ticket, self.slot, self.offset, self.nbytes = ticket, slot, offset, nbytes
        self.state = PENDING
        self.msg = None
        self.lib_seq = -1


cdef class Item:
    """One predicted transfer in the pipeline."""

    cdef public object key, region, token, chunks
    cdef public Ticket go             # the GO command's (the item's first index)
    cdef public list slots            # the chunks' bounce slots, in order
    cdef public Message go_private    # the GO sealed ahead, in private memory (None: not yet)
    cdef public Message go_public     # what it is once exposed into the first chunk's slot
    cdef long long _go_dst_id         # (go_dst's fields; -1: no GO to seal ahead)
    cdef Py_ssize_t _go_dst_offset
    cdef public Py_ssize_t offset, nbytes
    cdef public Py_ssize_t ready  # chunks sealed
    cdef public bint dead         # dropped: its chunks are released once no worker is on them
    cdef public bint claimed      # requested: being sent
    cdef public bint failed       # a chunk could not be sealed (stale region, worker error)
    cdef public bint go_busy      # a worker is sealing the GO ahead

    def __init__(self, key, region, Py_ssize_t offset, Py_ssize_t nbytes, token, Ticket go, list chunks, go_dst):
        self._set(key, region, offset, nbytes, token, go, chunks, go_dst)

    cdef _set(self, key, region, Py_ssize_t offset, Py_ssize_t nbytes, token, Ticket go, list chunks, go_dst):
        cdef Chunk c
        self.key, self.region, self.offset, self.nbytes = key, region, offset, nbytes
        self.token, self.go, self.chunks = token, go, chunks
        self.slots = [c.slot for c in chunks]
        # The GO command for the likely destination (the region's own device copy),
        # sealed ahead by a worker into private memory, where it may still be replaced
        # (strict order only: in window order a GO carries its request's number)
        self._go_dst_id, self._go_dst_offset = go_dst if go_dst is not None else (-1, 0)

    @property
    def go_dst(self):
        """(device buffer id, offset) the GO is sealed ahead for, or None."""
        return None if self._go_dst_id < 0 else (self._go_dst_id, self._go_dst_offset)

    cdef bint _goes_to(self, dst, Py_ssize_t dst_offset) except -1:
        """The GO sealed ahead is for ``dst`` at ``dst_offset``."""
        return self._go_dst_offset == dst_offset and self._go_dst_id >= 0 and self._go_dst_id == dst.id


#: the engine's counts (``stats()``): what happened to requests and to speculation
COUNTS = ("misses", "stale", "nops", "skipped_messages", "relinquishes", "reencrypted_bytes", "wasted_bytes",
          "speculative_bytes", "stolen_chunks", "worker_errors", "async_decrypted_bytes", "expired", "shadow_hits",
          "held_places", "evicted", "plans", "inline_plans", "stolen_plans", "skipped_plans", "idle_plans",
          "helped_pieces",
          "predictor_errors", "oversized_predictions")


cdef class Queue(Engine):
    """The queue of items, in index order, and its books: the channel position it depends
    on, the predictor's state, the counts. ``SpeculativeEngine`` derives from it; the
    fields are the queue's, set here."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is Queue:
            raise ArgumentTypeError("Queue is the C base of the pipellm mode's engine: "
                                    "Pipeline(mode=\"pipellm\") makes it")

    def __init__(self, failure_sources, Sender sender not None, spec_pool, *, predictor, dict regions,
                 Py_ssize_t depth_messages, Py_ssize_t lookahead, Py_ssize_t min_speculative_bytes):
        Engine.__init__(self, failure_sources)
        self.sender, self.spec_pool, self.depth_messages = sender, spec_pool, depth_messages
        self.predictor, self._regions = predictor, regions
        self.lookahead, self.min_speculative_bytes = lookahead, min_speculative_bytes
        self._lock = Lock()
        self.board = TaskBoard(self._lock)
        self._items, self._by_key, self._go_tickets = deque(), {}, {}
        self._queued_messages = 0
        self._expect, self._high = 0, -1
        self._events = deque()
        self._dropped = OrderedDict()
        self._spent = []
        self._replenish_pending = False
        self.counts = dict.fromkeys(COUNTS, 0)
        self.hits = 0
        self._fruitless = self._plan_skip = 0
        self._accuracy, self._throttle, self._shadow = 1.0, False, None
        self.predictor_s = 0.0

    cdef public object _items           # deque of Items, in index order
    cdef public dict _by_key            # key -> Item
    cdef public dict _go_tickets        # GO indices reserved, never sealed
    cdef public dict counts
    cdef public long long hits          # (a count of its own: every hit adds to it in C)
    cdef public Lock _lock              # the engine's lock
    cdef public Py_ssize_t _queued_messages
    cdef public long long _expect       # strict: the index the device expects next
    cdef public long long _high         # highest h2d index sent
    cdef public bint _throttle          # the predictor is wrong lately: speculate nothing
    cdef public double _accuracy        # recent hit ratio of requests that met queued speculation
    cdef public TaskBoard board         # what the workers do next (see _tasks.pyx)
    cdef public bint _replenish_pending # a planning task is queued
    cdef public Py_ssize_t _plan_skip   # chances to plan still to skip (see _note_plan)
    cdef public object _events          # deque: transfers the predictor has not heard of yet
    cdef public object _shadow          # throttled: the keys a plan would queue for the next request
    cdef public Py_ssize_t lookahead
    cdef public object _dropped         # OrderedDict: keys whose speculation was lost -> their bytes
    cdef public list _spent             # items sent by hits, freed by a worker (see _hit)
    cdef public object predictor
    cdef public dict _regions           # name -> Region, the pipeline's live table
    cdef public Py_ssize_t min_speculative_bytes
    cdef public Py_ssize_t _fruitless   # plans in a row that named transfers but queued nothing
    # CPU seconds in the predictor's observe and predict (thread time: waiting for the
    # GIL or for a core on a busy machine is not the predictor's cost)
    cdef public double predictor_s
    cdef public Sender sender           # the host-to-device channel (the cc engine's): order, lock
    cdef public BouncePool spec_pool    # the bounce slots speculation seals into
    cdef public Py_ssize_t depth_messages

    def to_device(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset, stream) -> None:
        """Send ``region[offset:offset+nbytes]`` to ``dst`` at ``dst_offset`` on ``stream``:
        a hit here, anything else in the engine's ``_request``; then plan what comes next."""
        self._to_device(region, offset, nbytes, dst, dst_offset, stream)

    cdef int _to_device(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset,
                        stream) except -1:
        cdef Py_ssize_t queued
        cdef bint claimed, throttled, due
        name = (<RegionBase?>region).name
        self.sender.lock.enter()
        try:
            self.sender.order += 1
            self._queue_event((name, offset, nbytes, "h2d", (<Stream?>stream).id, _perf_counter()))
            claimed = self._shadow is None and self._hit(region, offset, nbytes, dst, dst_offset, stream)
            if claimed:
                throttled = False
            else:
                key = (name, offset, nbytes)  # the same tuple as the predictor's Prediction
                claimed, throttled = self._request(key, region, offset, nbytes, dst, dst_offset, stream)
            self.transfers_h2d += 1
            self.bytes_h2d += nbytes
            queued = len(self._items)
            if not throttled and (queued < _INLINE_BELOW or (
                    queued < _STEAL_BELOW and self._replenish_pending and self._take_pending_plan())):
                self._lock.enter()
                try:
                    due = self._plan_due()
                finally:
                    self._lock.exit()
                if due:
                    self.counts["inline_plans"] += 1
                    self._replenish()  # the queue runs dry, or the workers lag (bursts): plan now
                return 0
        finally:
            self.sender.lock.exit()
        # otherwise planning is a worker's job, off the requesting thread, and only once
        # the queue has drained to half the lookahead: planning in batches costs less.
        # (Planning only at half of what the last plan left woke the worker less often,
        # but the far end of a batch is predicted from older context: LoRA's replay lost
        # 1.2 points of hits at the forward/backward turns, below its 99% target.)
        if not claimed or queued <= self.lookahead // 2:
            self._plan_later()
        return 0

    def _tell(self, tuple event) -> None:
        """Queue a transfer (TransferEvent's fields) for the predictor, which hears of it
        when it is next asked (mostly by a worker planning); past MAX_UNHEARD_EVENTS it is
        told now (h2d lock held)."""
        self._queue_event(event)

    cdef _queue_event(self, tuple event):  # (_tell, without a Python call on the request path)
        self._events.append(event)
        if len(self._events) > _MAX_UNHEARD:
            self._feed()

    cdef bint _hit(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset,
                   stream) except -1:
        """Send the request if it is the head of the queue, ready to go as is: True if
        it was sent, False (nothing changed) for every other case."""
        item = self._take_ready_head(region, offset, nbytes, dst, dst_offset)
        if item is None:
            return False
        self._score(True)
        try:
            self._send_go(item, (<Item>item).go_private, dst, dst_offset, stream, None)
        except BaseException:
            self._lock.enter()
            try:
                self._discard(item)
            finally:
                self._lock.exit()
            raise
        # the item's objects (chunks, tickets, slots, its private GO) are freed by the
        # worker that plans next, not on the requesting thread
        self._spent.append(item)
        if len(self._spent) > _MAX_SPENT:
            self._spent.clear()
        return True

    cdef _take_ready_head(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset):
        """The hit path: claim the head of the queue if it is this request, ready to go as is
        (strict order with no SKIP before it, every chunk sealed, its GO sealed ahead for
        this destination, nothing written since), else change nothing and return None
        (``_claim`` and ``_send_item`` then handle every case, this one included)."""
        cdef Item item
        self._lock.enter()
        try:
            if not self._items or self._throttle:
                return None
            item = self._items[0]
            # (a GO sealed ahead means strict order and chunks to send)
            if (item.go_public is None or item.go_busy or item.ready != len(item.chunks)
                    or item.region is not region or item.offset != offset or item.nbytes != nbytes
                    or item.go.index != self._expect or not item._goes_to(dst, dst_offset)):
                return None
            if not self._current(item):
                return None
            self._remove(item)
            item.claimed = True
            return item
        finally:
            self._lock.exit()

    cpdef bint _current(self, Item item):
        """Nothing was written to the item's bytes since they were encrypted: no
        application write (page protection / explicit reports) since its token, no
        library write (device-to-host commit) into its span since its first chunk was."""
        cdef Chunk c
        cdef RegionBase region
        cdef long long since = -1
        chunks = item.chunks
        if not chunks:  # a place held, sealed on demand: always current
            return True
        region = item.region
        if not _unchanged(region.guard, item.token):  # (region.unchanged_since)
            return False
        if len(chunks) == 1 and (<Chunk>chunks[0]).lib_seq == region.lib_seq:
            return True  # the common case: no library write since it was sealed
        for c in chunks:
            if c.state == _READY and (since < 0 or c.lib_seq < since):
                since = c.lib_seq
        return since < 0 or not region.library_changed(since, item.offset, item.nbytes)

    cpdef _remove(self, Item item):
        """Take an item out of the queue (engine lock held)."""
        if self._items[0] is item:  # the common case (a claim in order): no search
            self._items.popleft()
        else:
            self._items.remove(item)
        other = self._by_key.pop(item.key, None)  # (it is the item's: one lookup, not two)
        if other is not None and other is not item:
            self._by_key[item.key] = other
        self._queued_messages -= len(item.chunks) + 1

    cpdef _score(self, bint hit):
        self._accuracy += _ALPHA * (hit - self._accuracy)
        self._throttle = self._accuracy < _FLOOR

    cpdef _sent(self, long long last):
        """Messages up to index ``last`` are on their way."""
        if last > self._high:
            self._high = last
        if not self.sender.window:
            self._expect = last + 1

    cpdef _send_go(self, Item item, Message private, dst, Py_ssize_t dst_offset, stream, tuple lead):
        """Send a claimed item whose chunks are sealed: its GO command (exposed from
        ``private``, sealed ahead for this destination, or sealed now), then the chunks.
        The GO goes into the first chunk's slot, after the chunk's message (room taken
        with the slot): no slot of its own to take and retire on the request path.
        ``lead``: a sealed SKIP (ticket, slot, message) that goes first, or None."""
        cdef Chunk c
        cdef Ticket go
        cdef Message public
        cdef list chunks = item.chunks
        cdef Py_ssize_t at = 0 if lead is None else 1  # the GO's place in the submission
        if not chunks:  # (no bounds checks here: a held place has no chunk to carry its GO)
            raise UsageError(f"{item.key} holds a place only: it has no chunks to send")
        go = self._go_tickets.pop(item.go.index)
        msgs = [None] if lead is None else [lead[2], None]
        for c in chunks:
            msgs.append(c.msg)
        device = self.sender.device
        try:
            if private is not None:
                public = item.go_public  # (made by the worker that sealed it: see _go_sealed)
                if public is None:
                    public = _exposed(<Endpoint?>self.sender.sealer, private, _go_view(chunks[0]))
                _expose_into(<Endpoint?>self.sender.sealer, go, private, public)  # (Sealer.expose)
                msgs[at] = public
            else:
                body = GO_BODY.pack(dst.id, dst_offset, len(chunks), item.nbytes)
                msgs[at] = self.sender.sealer.seal_into(go, Kind.GO, 0, 0, body, _go_view(chunks[0]),
                                                        order=self.sender.order, flags=self.sender.abandon)
            if isinstance(device, Submitter):  # (every device of ours: in C)
                op = (<Submitter>device).submit_messages(stream, self.sender.session, msgs)
            else:
                op = device.submit_messages(stream, self.sender.session, msgs)
        except BaseException:
            self._keep_or_fail(go)  # (the slots go back with the item, discarded by the caller)
            if lead is not None:
                self._drop_lead(lead)
            raise
        (<BouncePool?>self.spec_pool)._retire(item.slots, op)
        if lead is not None:
            self._lead_sent(lead, op)
        if private is None and self.sender.window:
            self.sender.abandon = 0  # (said by the GO now on its way, if it was owed)
        self._sent((<Chunk>chunks[len(chunks) - 1]).ticket.index)  # (no wraparound here)
        self.hits += 1

    def _go_sealed(self, Item item, Message private):
        """A worker sealed the item's GO ahead into ``private`` (engine lock held): the
        message it becomes once exposed is made now, off the request path."""
        item.go_private, item.go_busy = private, False
        if private is not None and not item.dead:
            item.go_public = _exposed(<Endpoint?>self.sender.sealer, private, _go_view(item.chunks[0]))

    cpdef _count_reencrypted(self, key):
        """A transfer whose speculation was lost is encrypted again: count its bytes."""
        if key in self._dropped:
            self.counts["reencrypted_bytes"] += self._dropped.pop(key)

    # -- planning (h2d lock held): the predictor is told and asked, what it names admitted.
    # In C: a plan runs on the requesting thread whenever requests outrun the workers, and
    # on a worker it holds the GIL the requests need.
    cpdef _feed(self):
        """Tell the predictor every transfer since it was last asked, in order."""
        events, observe = self._events, self.predictor.observe
        start, wall = thread_time(), perf_counter()
        while events:
            event = _new_tuple(TransferEvent, events.popleft())  # built here, off the request path
            try:
                observe(event)
            except Exception as exc:  # noqa: BLE001 - as in _ask
                self._predictor_failed(exc)
        self.predictor_s += thread_time() - start
        if timeline.recording:
            timeline.span("predictor", wall, perf_counter())

    cpdef _ask(self, Py_ssize_t k):
        """The predictor's next ``k`` transfers; its bugs cost only speculation."""
        start, wall = thread_time(), perf_counter()
        try:
            return self.predictor.predict(k)[:k]
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not fail a transfer
            self._predictor_failed(exc)
            return []
        finally:
            self.predictor_s += thread_time() - start
            if timeline.recording:
                timeline.span("predictor", wall, perf_counter())

    cpdef _replenish(self):
        """Admit predicted transfers: reserve their indices and slots, queue their chunks."""
        cdef Py_ssize_t limit, offset, nbytes, chunk_size = self.sender.chunk_size
        cdef Py_ssize_t small_below = self.min_speculative_bytes
        cdef bint small, ahead, beside = False
        cdef list plan = []  # (key, region, encrypt ahead?) of the valid predictions
        cdef set wanted = set()  # their keys (what a full depth may not evict)
        self._feed()
        if self._throttle:
            # the predictor has been wrong lately: keep the workers (and the CPU) free for
            # on-demand work; shadow guesses tell when it is right again
            return
        # each request consumes about one queued item: look a little past the queue
        limit = min(self.lookahead, len(self._items) + 4)
        if not self.sender.window:
            # strict order loses everything queued before a request that skips it, so
            # speculate about as far as the predictor's run of hits is expected to last
            # (1 / miss rate): a 70% predictor gets ~3 items, not the whole lookahead
            limit = min(limit, max(_STRICT_MIN_DEPTH, <Py_ssize_t>(1.0 / max(1e-3, 1.0 - self._accuracy))))
        predictions = self._ask(limit)
        regions, by_key = self._regions, self._by_key
        for p in predictions:
            try:
                if type(p) is Prediction:
                    # queued already (a NamedTuple hashes and compares as its fields'
                    # tuple): kept from eviction, nothing else to check
                    item = by_key.get(p)
                    if item is not None:
                        wanted.add((<Item>item).key)
                        continue
                name, offset, nbytes = p.region, p.offset, p.nbytes  # (integers, or a TypeError)
                region = regions.get(name)
            except (AttributeError, TypeError, OverflowError) as exc:  # not a Prediction: a bug
                self._predictor_failed(exc)
                continue
            if region is None or nbytes <= 0 or offset < 0 or offset + nbytes > (<RegionBase?>region).nbytes:
                continue  # a wrong guess, not a bug
            small = nbytes < small_below and nbytes <= chunk_size
            ahead = not small
            if small or (<RegionBase?>region).guard is not None:  # untracked memory is never encrypted ahead
                key = (name, offset, nbytes)
                plan.append((key, region, ahead))
                wanted.add(key)
                beside = beside or ahead
        # a small transfer holds its place only beside speculation (strict order: sent on
        # demand it would drop everything queued); alone, a held place saves nothing on a
        # hit and costs a SKIP on a miss, so all-small traffic runs as cc does
        if not beside:
            for item in self._items:
                if (<Item>item).chunks:
                    beside = True
                    break
        for key, region, ahead in plan:
            if key in by_key:
                continue
            if not ahead:
                if beside:
                    self._hold_place(key, region)
                continue
            if not self._admit(key, region, key[1], key[2], wanted):
                break
        self._note_plan(len(predictions) > 0)

    cdef _note_plan(self, bint predicted):
        """Back off from plans that name transfers but queue nothing (all of them small
        or untracked): each asked the predictor and, after a swap-out, woke a worker for
        nothing. The next 1, 2, 4... (at most MAX_PLAN_SKIP) chances to plan are skipped;
        a plan that queues something ends it."""
        self._lock.enter()
        if self._items:
            self._fruitless = self._plan_skip = 0
        elif predicted:
            self._fruitless += 1
            if self._fruitless > _FRUITLESS:
                self._plan_skip = min(_MAX_SKIP, 1 << min(self._fruitless - _FRUITLESS - 1, 8))
        self._lock.exit()

    cpdef bint _admit(self, key, region, Py_ssize_t offset, Py_ssize_t nbytes, set wanted) except -1:
        """Queue one predicted transfer to be encrypted ahead (h2d lock held): its slots
        (evicting what the predictor no longer names, ``wanted``, when the depth is
        full), its indices (the GO's first), its chunks as worker tasks. False, with
        nothing taken, if there is no room. (In C: a plan admits an item for each
        request, and a plan on the requesting thread costs it as much as a hit.)"""
        cdef Py_ssize_t chunk_size = self.sender.chunk_size, n, i
        cdef list sizes, chunks
        cdef Chunk c
        cdef Item item
        cdef RegionBase r = region
        cdef BouncePool pool = self.spec_pool
        n = (nbytes + chunk_size - 1) // chunk_size
        sizes = [min(chunk_size, nbytes - i * chunk_size) + TAG_BYTES for i in range(n)]
        sizes[0] += _GO_MESSAGE_BYTES  # the GO command rides in the first chunk's slot
        if n + 1 > self.depth_messages or not pool.could_hold(sizes):
            self._oversized(key, nbytes)  # it never fits: evicting the queue for it would only lose work
            return False
        while True:
            if self._queued_messages + n + 1 <= self.depth_messages:
                slots = pool.try_acquire_many(sizes)
                if slots is not None:
                    break
            if not self._evict(wanted):
                return False
        try:
            token = _token(r.guard, r.tracking)  # (region.token())
            tickets = _reserve_run(<Endpoint?>self.sender.sealer, n + 1)  # (Sealer.reserve_run)
        except BaseException:
            for slot in slots:
                pool.release(slot)
            raise
        go = tickets[0]
        self._go_tickets[go.index] = go
        chunks = []
        for i in range(n):
            c = Chunk.__new__(Chunk)
            c._set(tickets[i + 1], slots[i], i * chunk_size, min(chunk_size, nbytes - i * chunk_size))
            chunks.append(c)
        dbuf = r.device_buffer
        item = Item.__new__(Item)
        # the GO command for the likely destination is sealed ahead (strict order only)
        item._set(key, region, offset, nbytes, token, go, chunks,
                  None if dbuf is None or dbuf.freed or self.sender.window else (dbuf.id, offset))
        self._count_reencrypted(key)
        self._lock.enter()
        try:
            self._items.append(item)
            self._by_key[key] = item
            self._queued_messages += n + 1
            tasks = self.board.tasks
            for c in chunks:
                tasks.append((item, c))
            if item.go_dst is not None:
                tasks.append((item, None))
            self.board.wake(n + 1)
        finally:
            self._lock.exit()
        return True

    cpdef _plan_later(self):
        """Have a worker plan the next speculation (it takes the h2d lock, so it runs
        after the current request, and its on-demand data)."""
        if self._throttle or self._replenish_pending:
            return  # nothing to plan until the shadow guesses hit again, or a plan is pending
        self._lock.enter()
        try:
            if not self._replenish_pending and self._plan_due():
                self._replenish_pending = True
                self.board.tasks.appendleft(REPLENISH)
                self.board.wake(1)
        finally:
            self._lock.exit()

    cpdef bint _plan_due(self):
        """False while backing off from fruitless plans (see _note_plan; engine lock held)."""
        if self._plan_skip:
            self._plan_skip -= 1
            self.counts["skipped_plans"] += 1
            return False
        return True
