# cython: language_level=3
"""The channel's :class:`Message`, :class:`Ticket` and the sealer's and opener's hot
fields (:class:`Endpoint`) in C, the reservation of tickets and the exposure of a
privately sealed message.

``pipellm/channel/endpoint.py`` (the sealer and opener) uses them; they are C because a
speculative hit builds and exposes a message on the request path (``Sealer.expose`` is
:func:`expose`), every sealed chunk is a message, and every predicted transfer reserves
its tickets when it is planned (``Sealer.reserve_run`` is :func:`reserve_run`, over
:func:`ticket_run`). ``_message.pxd`` is their C interface for the other extensions.
"""

from pipellm.errors import ArgumentError, ArgumentTypeError

#: Called as ``observer(msg, key_id, epoch, counter)`` whenever ciphertext is written into
#: shared (attacker-visible) memory; :class:`pipellm.testing.IVLedger` uses it.
shared_write_observers = []


cdef class Message:
    """One message as it sits in shared memory / crosses the link.

    ``direction`` is ``"h2d"`` or ``"d2h"``; ``iv`` the 12 IV bytes the sender used;
    ``aad`` the header (writable ``bytearray``); ``payload`` a writable memoryview of
    ciphertext + tag; ``dst`` the destination parsed from the header (settable, which
    rewrites the header). An adversary may change any of them; the receiver refuses.
    (Its fields are declared in ``_message.pxd``.)
    """

    def __init__(self, direction: str, iv: bytes, aad: bytearray, payload: memoryview, owner=None):
        self.direction, self.iv, self.aad, self.payload, self._owner = direction, iv, aad, payload, owner

    @property
    def dst(self):
        """(buffer, offset, length) from the header, a :class:`~pipellm.channel.Destination`."""
        from pipellm.channel.endpoint import Destination
        from pipellm.channel.protocol import unpack_header  # (here: the channel imports this module)
        header = unpack_header(self.aad)
        if header is None:
            raise ArgumentError("message header is malformed: not a version-2 header")
        return Destination(header.buffer, header.offset, header.length)

    @dst.setter
    def dst(self, value) -> None:
        from pipellm.channel.protocol import rewrite_destination
        buffer, offset, length = value
        rewrite_destination(self.aad, int(getattr(buffer, "id", buffer)), int(offset), int(length))

    def copy(self) -> Message:
        """A snapshot that owns its bytes (for an adversary that holds messages back)."""
        return Message(self.direction, bytes(self.iv), bytearray(self.aad),
                       memoryview(bytearray(self.payload)), self._owner)

    def __repr__(self) -> str:
        try:
            where = tuple(self.dst)
        except ValueError:
            where = "?"
        return f"<Message {self.direction} dst={where} payload={len(self.payload)}B>"


cdef class Ticket:
    """A reserved message index: the IV one message will carry. Sealed at most once.
    (Its fields are declared in ``_message.pxd``.)"""

    def __init__(self, long long index, long long epoch, long long counter, key):
        self._set(index, epoch, counter, key)

    cdef _set(self, long long index, long long epoch, long long counter, key):  # (__init__, and ticket_run)
        self.index, self.epoch, self.counter, self.key = index, epoch, counter, key
        self.used = False

    def __repr__(self) -> str:
        return f"<Ticket {self.index} (epoch {self.epoch}, counter {self.counter}){' used' if self.used else ''}>"


cdef class Endpoint:
    """The fields of a sealer or opener that the request path reads, in C
    (``channel/endpoint.py``'s endpoints derive from it; declared in ``_message.pxd``):
    ``label`` (the direction's), ``failure`` (why the channel closed, or None), ``_lock``,
    ``messages`` (sent or received), ``_next`` (the sealer's next index; the opener's next
    expected), ``rotate_after`` (messages per key epoch), ``_run_key`` (see ``ticket_run``)."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is Endpoint:
            raise ArgumentTypeError("Endpoint is the C base of the channel's Sealer and Opener: a Pipeline or a device makes them")

    def __init__(self, label, long long rotate_after):
        self.label, self.rotate_after = label, rotate_after
        self.failure, self._lock, self.messages, self._next = None, Lock(), 0, 0
        self._run_key = [None]


def ticket_run(long long first, Py_ssize_t count, long long rotate_after, key_at, list cache) -> list:
    """The tickets of indices ``first .. first + count - 1``: ``key_at(index)`` gives
    (epoch, counter, key) where the run enters an epoch other than the one in
    ``cache``, the caller's ``[(epoch, key)]`` of its last run (updated here, one item
    read or written at a time, so threads sharing it see a whole pair); within it the
    counter is ``index % rotate_after``, ``protocol.position``'s rule. (In C, with no
    Python call within an epoch: every predicted transfer reserves a run, often on the
    requesting thread.)"""
    return _ticket_run(first, count, rotate_after, key_at, cache)


cdef list _ticket_run(long long first, Py_ssize_t count, long long rotate_after, key_at, list cache):
    cdef list run = []
    cdef Ticket ticket
    cdef long long index, epoch = first // rotate_after, counter = first % rotate_after
    cdef tuple last = cache[0]
    if last is not None and <long long>last[0] == epoch:
        key = last[1]
    else:
        epoch, counter, key = key_at(first)
        cache[0] = (epoch, key)
    for index in range(first, first + count):
        if counter == rotate_after:
            epoch, counter, key = key_at(index)
            cache[0] = (epoch, key)
        ticket = Ticket.__new__(Ticket)
        ticket._set(index, epoch, counter, key)
        run.append(ticket)
        counter += 1
    return run


cdef list _reserve_run(Endpoint sealer, Py_ssize_t count):
    """``Sealer.reserve_run(count)``: ``count`` consecutive tickets. (In C: a plan
    reserves a run per predicted transfer, often on the requesting thread.)"""
    cdef long long first
    if count < 1:
        raise ArgumentError(f"a run holds at least one ticket, asked for {count}")
    sealer._lock.enter()
    try:
        if sealer.failure is not None:
            sealer._check_open()  # (it raises)
        first = sealer._next
        sealer._next += count
    finally:
        sealer._lock.exit()
    return _ticket_run(first, count, sealer.rotate_after, sealer._key_at, sealer._run_key)


def reserve_run(Endpoint sealer not None, Py_ssize_t count) -> list:
    """``Sealer.reserve_run(count)``: ``count`` consecutive tickets."""
    return _reserve_run(sealer, count)


def publish(msg: Message, key_id: bytes, epoch: int, counter: int) -> None:
    """Record that ``msg``'s ciphertext now sits in shared memory (for observers)."""
    for observer in shared_write_observers:
        observer(msg, key_id, epoch, counter)


def expose(Endpoint sealer not None, Ticket ticket not None, Message private not None, out) -> Message:
    """``Sealer.expose(ticket, private, out)``: copy a message sealed privately under
    ``ticket`` into shared memory ``out`` (exactly its size). From now on the ticket is
    used, and the message returned owns ``private``'s header (``aad``): ``private`` is
    spent."""
    return _expose(sealer, ticket, private, out)


cdef Message _expose(Endpoint sealer, Ticket ticket, Message private, out):
    """``expose``, in C."""
    cdef Message msg = _exposed(sealer, private, out)
    _expose_into(sealer, ticket, private, msg)
    return msg


cdef Message _exposed(Endpoint sealer, Message private, out):
    """The message ``private`` becomes once exposed into ``out``, made ahead of its
    exposure (a speculative GO's, by the worker that seals it): nothing is in shared
    memory until :func:`_expose_into`."""
    cdef Message msg = Message.__new__(Message)
    # (the header is the private message's own: once exposed its ticket is used, so it
    # is never exposed again, and nothing else holds it)
    msg.direction, msg.iv, msg.aad, msg.payload = sealer.label, private.iv, private.aad, out
    return msg


cdef int _expose_into(Endpoint sealer, Ticket ticket, Message private, Message public) except -1:
    """Copy ``private``'s bytes into ``public.payload`` (shared memory), ``public`` made
    by :func:`_exposed`. (In C: a speculative hit exposes its GO on the request path.)"""
    payload, out = private.payload, public.payload
    if ticket.used:
        raise ArgumentError(f"{ticket!r} was already sealed: an IV is never used twice")
    if len(out) != len(payload):
        raise ArgumentError(f"output must be exactly {len(payload)} bytes, got {len(out)}")
    if sealer.failure is not None:
        sealer._check_open()  # (it raises)
    ticket.used = True
    out[:] = payload  # small: a copy under the GIL beats handing the GIL away
    sealer._lock.enter()
    sealer.messages += 1
    sealer._lock.exit()
    if shared_write_observers:
        publish(public, ticket.key.key_id, ticket.epoch, ticket.counter)
    return 0
