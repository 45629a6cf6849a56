"""Tools for testing code that uses pipellm, and pipellm itself.

:class:`Adversary` sits on the emulated device's untrusted link and may change, drop,
replay or reorder messages. :class:`IVLedger` watches every ciphertext written into
shared memory and fails if a (key, counter) ever appears with two different ciphertexts.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager

from .channel.endpoint import Destination, Message, shared_write_observers

__all__ = ["Adversary", "Destination", "IVLedger", "IVReuseError", "Message"]


class Adversary:
    """Base class of link adversaries. ``on_message`` sees each message on the link
    (device thread) and returns the messages to deliver now, in order: ``[msg]`` passes
    it on, ``[]`` drops it, ``[msg, msg]`` replays it, and returning a message held from
    an earlier call reorders. ``msg.copy()`` keeps a snapshot that owns its bytes.

    >>> class FlipBit(Adversary):
    ...     def on_message(self, msg):
    ...         msg.payload[0] ^= 1
    ...         return [msg]
    """

    def on_message(self, msg: Message) -> list[Message]:
        return [msg]


class IVReuseError(AssertionError):
    """A (key, counter) was written into shared memory with two different ciphertexts."""


class IVLedger:
    """Records every ciphertext written into shared memory, by (key id, epoch, counter).

    >>> ledger = IVLedger()
    >>> with ledger.watch():
    ...     pass  # run transfers here
    >>> ledger.check()  # raises IVReuseError on any reuse
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[bytes, int, int], bytes] = {}
        self.writes = 0
        self.violations: list[tuple[bytes, int, int]] = []
        self._lock = threading.Lock()

    def _observe(self, msg: Message, key_id: bytes, epoch: int, counter: int) -> None:
        digest = hashlib.sha256(bytes(msg.payload)).digest()
        key = (key_id, epoch, counter)
        with self._lock:
            self.writes += 1
            seen = self.entries.setdefault(key, digest)
            if seen != digest:
                self.violations.append(key)

    @contextmanager
    def watch(self):
        shared_write_observers.append(self._observe)
        try:
            yield self
        finally:
            shared_write_observers.remove(self._observe)

    def check(self) -> None:
        if self.violations:
            raise IVReuseError(f"{len(self.violations)} (key, counter) pairs carried two different "
                               f"ciphertexts, first {self.violations[0]!r}")
