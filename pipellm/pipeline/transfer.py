"""The handle ``Pipeline.to_host`` returns."""

from __future__ import annotations

from typing import Callable


class Transfer:
    """Completion of one device-to-host transfer.

    ``wait()`` returns once the bytes are in the host region (decrypted and
    authenticated, where the mode encrypts), and raises what the transfer failed with.
    """

    __slots__ = ("nbytes", "_wait", "_done")

    def __init__(self, nbytes: int, wait: Callable[[float | None], None], done: Callable[[], bool]):
        self.nbytes, self._wait, self._done = nbytes, wait, done

    def wait(self, timeout: float | None = None) -> None:
        self._wait(timeout)

    def done(self) -> bool:
        return self._done()

    def __repr__(self) -> str:
        return f"<Transfer {self.nbytes}B {'done' if self.done() else 'pending'}>"
