"""``mode="plain"``: no confidential computing; copies go straight over the link."""

from __future__ import annotations

from .transfer import Transfer


class PlainEngine:
    mode = "plain"

    failure_reported = False

    def __init__(self, device, *, timeout: float | None, **_):
        self.device, self.timeout = device, timeout
        self.failure_sources = (device,)  # what failure() reads (see CCEngine's)
        self.transfers = [0, 0]
        self.bytes = [0, 0]

    def to_device(self, region, offset, nbytes, dst, dst_offset, stream) -> None:
        region.outgoing = self.device.submit_copy_in(stream, region.view[offset:offset + nbytes], dst, dst_offset)
        self.transfers[0] += 1
        self.bytes[0] += nbytes

    def to_host(self, src, src_offset, region, offset, nbytes, stream) -> Transfer:
        op = self.device.submit_copy_out(stream, src, src_offset, region.view[offset:offset + nbytes])
        region.incoming = op
        self.transfers[1] += 1
        self.bytes[1] += nbytes
        timeout = self.timeout
        return Transfer(nbytes, lambda t=None: op.wait(timeout if t is None else t), op.done)

    def drain(self, timeout) -> None:
        pass

    def failure(self):
        return self.device.failure

    def adopt(self, region) -> None:
        """A region was registered."""

    def forget(self, region) -> None:
        """The region is being unregistered."""

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"transfers_h2d": self.transfers[0], "transfers_d2h": self.transfers[1],
                "bytes_h2d": self.bytes[0], "bytes_d2h": self.bytes[1],
                "messages_h2d": self.transfers[0], "messages_d2h": self.transfers[1]}
