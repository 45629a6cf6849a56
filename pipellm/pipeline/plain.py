"""``mode="plain"``: no confidential computing; copies go straight over the link."""

from __future__ import annotations

from ._request import Engine
from .transfer import Transfer


class PlainEngine(Engine):
    mode = "plain"
    session = None  # (no secure channel)
    failure_reported = False

    def __init__(self, device, *, timeout: float | None, **_):
        super().__init__((device,))  # what failure() reads
        self.device, self.timeout = device, timeout

    def to_device(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        region.outgoing = self.device.submit_copy_in(stream, region.view[offset:offset + nbytes], dst, dst_offset)
        self.transfers_h2d += 1
        self.bytes_h2d += nbytes

    def to_host(self, src, src_offset, region, offset, nbytes, stream) -> Transfer:
        op = self.device.submit_copy_out(stream, src, src_offset, region.view[offset:offset + nbytes])
        region.incoming = op
        self.transfers_d2h += 1
        self.bytes_d2h += nbytes
        timeout = self.timeout
        return Transfer(nbytes, lambda t=None: op.wait(timeout if t is None else t), op.done)

    def drain(self, timeout) -> None:
        pass

    def wait_speculation(self, timeout=None) -> bool:
        return True  # (nothing is encrypted ahead)

    def failure(self):
        return self.device.failure

    def adopt(self, region) -> None:
        """A region was registered."""

    def forget(self, region) -> None:
        """The region is being unregistered."""

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"transfers_h2d": self.transfers_h2d, "transfers_d2h": self.transfers_d2h,
                "bytes_h2d": self.bytes_h2d, "bytes_d2h": self.bytes_d2h,
                "messages_h2d": self.transfers_h2d, "messages_d2h": self.transfers_d2h}
