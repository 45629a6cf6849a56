"""The interface a :class:`~pipellm.Pipeline` drives: one engine per mode
(``plain.py``, ``cc.py``, ``speculative.py``), each deriving from the C ``Engine``
(``_request.pyx``), whose request path calls the engine's ``to_device``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .transfer import Transfer


@runtime_checkable
class ModeEngine(Protocol):
    """What every mode's engine provides. Requests arrive checked (the pipeline's
    ``Requests``); ``stream`` is the device's, ``region`` a registered one."""

    #: the mode's name, as ``Pipeline(mode=...)`` takes it
    mode: str
    #: has a caller seen the error that closed the engine's channel raised?
    failure_reported: bool

    @property
    def session(self) -> int | None:
        """The secure channel's session id (None where there is no channel)."""

    def to_device(self, region, offset: int, nbytes: int, dst, dst_offset: int, stream) -> None:
        """Send ``region[offset:offset+nbytes]`` to ``dst`` at ``dst_offset``."""

    def to_host(self, src, src_offset: int, region, offset: int, nbytes: int, stream) -> Transfer:
        """Copy ``src[src_offset:src_offset+nbytes]`` back into the region; the transfer."""

    def wait_speculation(self, timeout: float | None = None) -> bool:
        """Wait until nothing is left to encrypt ahead (True at once where nothing is);
        False on timeout."""

    def drain(self, timeout: float | None) -> None:
        """Receive every device-to-host transfer still expected."""

    def failure(self) -> BaseException | None:
        """The error that closed the engine's channel (or failed its device), if any."""

    def adopt(self, region) -> None:
        """A region was registered."""

    def forget(self, region) -> None:
        """The region is being unregistered."""

    def close(self) -> None:
        """Stop, and free what the engine holds."""

    def stats(self) -> dict:
        """The engine's counters (``Pipeline.stats()`` reports them)."""
