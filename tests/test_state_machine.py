"""Random interleavings of writes, transfers both ways, mispredictions and async
decryption in the pipellm mode: the device always holds the plaintext that was current
at each transfer (checked after every step), and no IV is ever written into shared
memory with two plaintexts."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pipellm
from pipellm.testing import IVLedger
from conftest import TIMEOUT

CHUNK = 1024
SIZES = [CHUNK, 3 * CHUNK + 17, 2 * CHUNK]
SPANS = [(0, None), (0, CHUNK), (CHUNK + 5, CHUNK + 100)]


class Speculation(RuleBasedStateMachine):
    @initialize(iv_order=st.sampled_from(["strict", "window"]), workers=st.integers(1, 2))
    def start(self, iv_order, workers):
        self.ledger = IVLedger()
        self.watching = self.ledger.watch()
        self.watching.__enter__()
        self.pipe = pipellm.Pipeline(device="emulated", mode="pipellm", chunk_size=CHUNK, workers=workers,
                                     bounce_bytes=32 * 8192, depth_bytes=24 * 8192, depth_messages=20,
                                     iv_order=iv_order, iv_window=64, rotate_after=11, timeout=TIMEOUT,
                                     min_speculative_bytes=2 * CHUNK)  # both paths: ahead and held
        rng = np.random.default_rng(0)
        self.regions = []
        for i, n in enumerate(SIZES):
            data = rng.integers(0, 256, n, dtype=np.uint8)
            self.regions.append(self.pipe.register(pipellm.array(data), name=f"p{i}"))   # protected
        self.regions.append(self.pipe.register(rng.integers(0, 256, 2 * CHUNK, dtype=np.uint8),
                                               name="explicit", tracking="explicit"))
        self.model = {r.name: np.zeros(r.nbytes, np.uint8) for r in self.regions}  # device copies
        self.sink = self.pipe.register(np.zeros(4 * CHUNK, np.uint8), name="sink")
        self.sink_model = np.zeros(4 * CHUNK, np.uint8)
        self.pending = []
        self.turn = -1  # the last region to_device_next sent
        # the same memory registered again: part of each region in this pipeline (untracked
        # or explicit) and in a second pipeline on the same device. Writes the library
        # makes through those must reach the speculation on the whole (issue 26)
        self.other = pipellm.Pipeline(device=self.pipe.device, mode="cc", chunk_size=CHUNK, timeout=TIMEOUT)
        tracking = ["none", "explicit"][workers - 1]
        self.parts, self.other_parts = [], []
        for r in self.regions:
            part = r._array[7:7 + min(CHUNK + 5, r.nbytes - 7)]
            self.parts.append(self.pipe.register(part, name=f"part-{r.name}", tracking=tracking))
            self.other_parts.append(self.other.register(part, name=f"part-{r.name}", tracking="explicit"))
        self.donors = [self.pipe.to_device(self.pipe.register(rng.integers(0, 256, 4 * CHUNK, dtype=np.uint8)))
                       for _ in range(2)]
        self.other_donors = [self.other.to_device(self.other.register(rng.integers(0, 256, 4 * CHUNK, dtype=np.uint8)))
                             for _ in range(2)]

    def region(self, i):
        return self.regions[i % len(self.regions)]

    @rule(i=st.integers(0, 3), at=st.integers(0, 10_000), value=st.integers(0, 255))
    def write(self, i, at, value):
        r = self.region(i)
        at %= r.nbytes
        if r.tracking == "explicit":
            with r.writing() as a:
                a[at] = value
        else:
            r._array[at] = value  # a plain numpy write: the fault handler must notice

    @rule(at=st.integers(0, 10_000), value=st.integers(0, 255))
    def write_next(self, at, value):
        # into the region the cycle sends next: likely encrypted ahead already (stale)
        self.write((self.turn + 1) % len(self.regions), at, value)

    @rule(i=st.integers(0, 3), span=st.sampled_from(SPANS))
    def to_device(self, i, span):
        r = self.region(i)
        offset, nbytes = span
        offset %= r.nbytes
        nbytes = r.nbytes - offset if nbytes is None else min(nbytes, r.nbytes - offset)
        self.pipe.to_device(r, offset, nbytes)
        self.model[r.name][offset:offset + nbytes] = r._array[offset:offset + nbytes]

    @rule()
    def to_device_next(self):
        # the regions in a fixed cycle, as layers are loaded: the predictor learns it, so
        # hits, and writes into data already encrypted ahead (stale), interleave with the rest
        self.turn = (self.turn + 1) % len(self.regions)
        self.to_device(self.turn, (0, None))

    @rule(i=st.integers(0, 3), nbytes=st.integers(1, 2 * CHUNK))
    def to_host(self, i, nbytes):
        r = self.region(i)
        if r.device_buffer is None:
            return
        nbytes = min(nbytes, r.nbytes)
        self.pending.append(self.pipe.to_host(r.device_buffer, self.sink, nbytes=nbytes))
        self.sink_model[:nbytes] = self.model[r.name][:nbytes]

    @rule(k=st.integers(0, 1), next_one=st.booleans(), other=st.booleans())
    def to_host_overlapping(self, k, next_one, other):
        # the library writes part of a region through another registration of its bytes,
        # in this pipeline or another (mostly the one the cycle sends next: encrypted ahead)
        i = (self.turn + 1) % len(self.regions) if next_one else k
        pipe, part, donor = ((self.other, self.other_parts[i], self.other_donors[k]) if other
                             else (self.pipe, self.parts[i], self.donors[k]))
        pipe.to_host(donor, part, nbytes=part.nbytes).wait(TIMEOUT)

    @precondition(lambda self: self.pending)
    @rule()
    def read_sink(self):
        assert np.array_equal(self.sink.array, self.sink_model)  # waits for async decryption
        for t in self.pending:
            t.wait(TIMEOUT)
        self.pending.clear()

    @rule()
    def synchronize(self):
        self.pipe.synchronize()
        self.device_holds_what_was_current_at_each_transfer()

    @invariant()
    def device_holds_what_was_current_at_each_transfer(self):
        # (the device's read waits only for the messages already submitted: speculation
        # and asynchronous decryption on the host go on between steps)
        for r in getattr(self, "regions", ()):
            if r.device_buffer is not None:
                assert np.array_equal(self.pipe.device.read(r.device_buffer), self.model[r.name]), r.name

    @invariant()
    def no_iv_reuse(self):
        if hasattr(self, "ledger"):
            self.ledger.check()

    def teardown(self):
        if hasattr(self, "pipe"):
            self.synchronize()
            stats = self.pipe.stats()
            assert stats["transfers_h2d"] >= stats["hits"]
            self.other.close()
            self.pipe.close()
            self.watching.__exit__(None, None, None)
            self.ledger.check()


Speculation.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestSpeculation = Speculation.TestCase
