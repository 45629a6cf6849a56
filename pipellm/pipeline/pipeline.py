"""The public ``Pipeline``: register host memory, move it to and from a device."""

from __future__ import annotations

import bisect
import itertools
import threading
import warnings
import weakref
from time import perf_counter

from .. import _fork
from ._request import Requests
from ..channel.protocol import DEFAULT_ROTATE_AFTER, check_rotate_after
from ..devices import Device, DeviceBuffer, Stream, open_device
from ..errors import ArgumentError, ArgumentTypeError, ChannelClosedError, DeviceError, IntegrityError, TransferTimeoutError
from .cc import CCEngine
from .plain import PlainEngine
from .speculative import SpeculativeEngine, default_workers
from .region import Region, as_host_array, check_int, check_region, tracking_for

MODES = ("plain", "cc", "pipellm")
#: 4 MiB chunks (one IV each): AES-GCM through the library runs at the same rate per
#: core from 256 KiB to 16 MiB messages, while each message has a fixed cost on each
#: side, which 4 MiB messages amortize better than 1 MiB (figures: docs/figures.md,
#: `pipellm bench crypto` and `bench offload`).
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_BOUNCE_BYTES = 32 << 20
DEFAULT_TIMEOUT = 60.0
#: speculation depth: bounce memory for ciphertext encrypted ahead (about two layers of
#: a scaled-down model; size it to 2-3 of your transfers), and messages queued
DEFAULT_DEPTH_BYTES = 64 << 20
DEFAULT_DEPTH_MESSAGES = 256
#: predicted transfers asked for after each request
DEFAULT_LOOKAHEAD = 16
#: iv_order="window": how far behind the newest index an unused one is still accepted
DEFAULT_IV_WINDOW = 4096
#: predicted transfers smaller than this are not encrypted ahead, only given their place
#: in the channel's order when speculation follows them: their AES costs less than
#: speculating on them (a worker task, a GO command). "auto": the size where the two meet
#: on this machine, measured once per process (pipellm/pipeline/threshold.py). For the
#: same reason device-to-host messages smaller than this are decrypted when needed, not
#: handed to a worker
DEFAULT_MIN_SPECULATIVE_BYTES = "auto"


def _release(engine, regions: dict, device, owns_device: bool) -> None:
    """Close the engine, unregister the regions (their device copies freed), close the
    device if the pipeline opened it: what closing a pipeline releases."""
    engine.close()
    for region in regions.values():
        if region.device_buffer is not None and not region.device_buffer.freed and not device.closed:
            device.free(region.device_buffer)
        region.registered = False
        region.release()
    regions.clear()
    if owns_device:
        device.close()


def _abandoned(engine, regions: dict, device, owns_device: bool) -> None:
    """A pipeline collected, or still open at exit, without close(): warn (as an unclosed
    file does) and release what it held, without waiting for its transfers. On a thread
    of its own: the collection may run on a thread that holds the engine's locks (a
    worker); the main thread waits for it (at exit, before the interpreter goes)."""
    warnings.warn("a pipellm Pipeline was never closed: its threads, session and memory are released now "
                  "(use close() or a with block)", ResourceWarning, stacklevel=2)

    def release():
        try:
            _release(engine, regions, device, owns_device)
        except Exception:  # noqa: BLE001 - nobody is left to raise it to
            pass

    closer = threading.Thread(target=release, name="pipellm-closer", daemon=True)
    closer.start()
    if threading.current_thread() is threading.main_thread():
        closer.join(60)


class Pipeline(Requests):
    """Moves registered host memory to and from a device, in one of three modes.

    ``mode="plain"``: no encryption (the non-CC baseline). ``mode="cc"``: every transfer
    is encrypted on demand on the calling thread, as the vanilla CC driver does.
    ``mode="pipellm"`` (the default): speculative pipelined encryption; ``predictor``
    (a name or a :class:`pipellm.predictors.Predictor`, default ``"sequence"``) names the
    next transfers and ``workers`` threads encrypt them ahead, up to ``depth_bytes`` /
    ``depth_messages``; ``iv_order="window"`` lets the device accept unused IVs within
    ``iv_window`` so mispredictions cost only wasted encryption.

    >>> import numpy as np, pipellm
    >>> with pipellm.Pipeline(device="emulated", mode="cc") as pipe:
    ...     region = pipe.register(np.arange(1024, dtype=np.float16), name="layer0.w")
    ...     dbuf = pipe.to_device(region)
    ...     back = np.zeros(1024, dtype=np.float16)
    ...     pipe.to_host(dbuf, pipe.register(back)).wait()
    ...     bool((back == region.array).all())
    True

    Predicted transfers under ``min_speculative_bytes`` only keep their place in the
    channel's order ("auto": the size where speculating costs what it saves on this
    machine, measured once per process; see :mod:`pipellm.pipeline.threshold`).

    ``adaptive`` keeps speculation on only while it measurably pays on this machine (it
    can lose to on-demand encryption where the workers have no spare cores and the
    workload leaves no time to hide under; see :mod:`pipellm.pipeline.payoff`).

    A transfer encrypted on demand (a miss) is sealed in pieces by up to
    ``on_demand_helpers`` idle workers beside the requesting thread ("auto": the cores
    this process may run on less two, the requesting thread's and the device's copy
    engine's: none on two cores, where a helper only slows the other two down; see
    :mod:`pipellm.pipeline.ondemand`).

    ``chunk_size`` bytes travel per message (one IV each); ``bounce_bytes`` caps the
    bounce buffers; every wait gives up after ``timeout`` seconds with
    :class:`~pipellm.TransferTimeoutError`; keys rotate every ``rotate_after`` messages
    per direction.
    """

    def __init__(self, device: str | Device = "auto", mode: str = "pipellm", predictor=None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, bounce_bytes: int = DEFAULT_BOUNCE_BYTES,
                 timeout: float | None = DEFAULT_TIMEOUT, rotate_after: int = DEFAULT_ROTATE_AFTER,
                 workers: int | None = None, depth_bytes: int = DEFAULT_DEPTH_BYTES,
                 depth_messages: int = DEFAULT_DEPTH_MESSAGES, lookahead: int = DEFAULT_LOOKAHEAD,
                 iv_order: str = "strict", iv_window: int = DEFAULT_IV_WINDOW,
                 min_speculative_bytes: int | str = DEFAULT_MIN_SPECULATIVE_BYTES, adaptive: bool = True,
                 on_demand_helpers: int | str = "auto"):
        if not isinstance(mode, str):
            raise ArgumentTypeError(f"mode must be a str, got {type(mode).__name__}")
        if mode not in MODES:
            raise ArgumentError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode != "pipellm" and predictor is not None:
            raise ArgumentError(f"a predictor applies only to mode 'pipellm', not {mode!r}")
        if iv_order not in ("strict", "window"):
            raise ArgumentError(f"iv_order must be 'strict' or 'window', got {iv_order!r}")
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        bounce_bytes = check_int("bounce_bytes", bounce_bytes, minimum=1)
        workers = default_workers() if workers is None else check_int("workers", workers, minimum=1)
        depth_bytes = check_int("depth_bytes", depth_bytes, minimum=1)
        depth_messages = check_int("depth_messages", depth_messages, minimum=2)
        lookahead = check_int("lookahead", lookahead, minimum=1)
        iv_window = check_int("iv_window", iv_window, minimum=2)
        if isinstance(min_speculative_bytes, str):
            if min_speculative_bytes != "auto":
                raise ArgumentError(f"min_speculative_bytes must be an int >= 0 or 'auto', got {min_speculative_bytes!r}")
        else:
            min_speculative_bytes = check_int("min_speculative_bytes", min_speculative_bytes)
        if isinstance(on_demand_helpers, str):
            if on_demand_helpers != "auto":
                raise ArgumentError(f"on_demand_helpers must be an int >= 0 or 'auto', got {on_demand_helpers!r}")
            from .ondemand import spare_cores
            on_demand_helpers = spare_cores()
        else:
            on_demand_helpers = check_int("on_demand_helpers", on_demand_helpers)
        if not isinstance(adaptive, bool):
            raise ArgumentTypeError(f"adaptive must be True or False, got {type(adaptive).__name__}")
        if iv_order == "window" and iv_window <= depth_messages:
            raise ArgumentError(f"iv_window ({iv_window}) must exceed depth_messages ({depth_messages}): "
                                f"queued speculation would fall out of the window")
        check_rotate_after(rotate_after)
        if mode == "pipellm":
            from ..predictors import get as get_predictor
            predictor = get_predictor("sequence" if predictor is None else predictor)
            predictor.prepare()  # (a predictor that can't be used is refused here, not on a request)
            if min_speculative_bytes == "auto":
                from .threshold import speculation_threshold
                min_speculative_bytes = speculation_threshold()
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ArgumentError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self._owns_device = not isinstance(device, Device)
        super().__init__(open_device(device))
        limit = self.device.max_message_bytes
        if limit is not None and chunk_size > limit:
            if self._owns_device:
                self.device.close()
            raise ArgumentError(f"chunk_size {chunk_size} is larger than the device takes in one message ({limit})")
        self.mode = mode
        self.predictor = predictor
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._regions: dict[int, Region] = {}
        self._spans: list[tuple[int, int]] = []  # (address, region id), sorted: see _link_overlaps
        self._longest = 0
        self._names: dict[str, Region] = {}
        self._region_ids = itertools.count(1)
        self._lock = threading.Lock()
        try:
            if mode == "plain":
                self._engine = PlainEngine(self.device, timeout=timeout)
            elif mode == "cc":
                self._engine = CCEngine(self.device, timeout=timeout, chunk_size=chunk_size,
                                        bounce_bytes=bounce_bytes, rotate_after=rotate_after)
            else:
                self._engine = SpeculativeEngine(
                    self.device, timeout=timeout, chunk_size=chunk_size, bounce_bytes=bounce_bytes,
                    rotate_after=rotate_after, predictor=predictor, regions=self._names, workers=workers,
                    depth_bytes=depth_bytes, depth_messages=depth_messages, iv_order=iv_order,
                    iv_window=iv_window, lookahead=lookahead, min_speculative_bytes=min_speculative_bytes,
                    adaptive=adaptive, on_demand_helpers=on_demand_helpers)
        except BaseException:
            if self._owns_device:
                self.device.close()
            raise
        # a pipeline dropped without close() (collected, or still open at exit) releases
        # what it holds all the same (its arguments hold nothing that holds the pipeline)
        self._finalizer = weakref.finalize(self, _abandoned, self._engine, self._regions, self.device,
                                           self._owns_device)
        self._started = perf_counter()

    # -- regions ---------------------------------------------------------------------------------
    def register(self, array, name: str | None = None, *, tracking: str = "auto", kind: str = "other") -> Region:
        """Wrap host memory (a C-contiguous numpy array or buffer) for transfers, without
        copying it. ``name`` must be unique in this pipeline. ``tracking`` says how writes
        are caught (see :class:`Region`): ``"auto"`` protects library-owned memory
        (:func:`pipellm.empty`) and leaves other memory untracked (never speculated on).
        ``kind`` (weight, kv, activation, other) labels the region in recorded traces."""
        self._check()
        host = as_host_array(array)
        if name is not None and not isinstance(name, str):
            raise ArgumentTypeError(f"name must be a str, got {type(name).__name__}")
        tracking = tracking_for(host, tracking)
        with self._lock:
            region_id = next(self._region_ids)
            name = f"region{region_id}" if name is None else name
            if name in self._names:
                raise ArgumentError(f"a region named {name!r} is already registered")
            region = Region(self, region_id, name, host, tracking)
            self._regions[region_id] = region
            self._names[name] = region
            self._link_overlaps(region)
        pending = [o.incoming for o in region.overlaps if o.incoming is not None]
        if len(pending) == 1:  # a device-to-host transfer into these bytes is on its way
            region.incoming = pending[0]
        elif pending:  # (several, into several registrations: let them land first)
            for other in list(region.overlaps):
                other.wait()
        region.kind = kind
        self._engine.adopt(region)
        if self._recorder is not None:
            self._recorder.region(region)
        return region

    def unregister(self, region: Region) -> None:
        """Forget a region; its device copy (if the pipeline made one) is freed."""
        check_region(self, region)
        self.synchronize()
        if self._recorder is not None:
            self._recorder.free(region)
        with self._lock:
            region.registered = False
            self._regions.pop(region.id, None)
            self._names.pop(region.name, None)
            for other in region.overlaps:
                other.overlaps.remove(region)
            region.overlaps = []
            self._spans.remove((region.view_address(), region.id))
        self._engine.forget(region)
        region.release()
        if region.device_buffer is not None and not region.device_buffer.freed:
            self.device.free(region.device_buffer)

    def _link_overlaps(self, region: Region) -> None:
        """Record ``region`` and the registrations of this pipeline it shares bytes with
        (lock held). Registrations sorted by address: a new one is compared only with
        those that start less than the longest one before its end."""
        start = region.view_address()
        end = start + region.nbytes
        spans = self._spans
        self._longest = max(self._longest, region.nbytes)
        first = bisect.bisect_left(spans, (start - self._longest, -1))
        for at, rid in spans[first:bisect.bisect_left(spans, (end, -1))]:
            other = self._regions[rid]
            if at + other.nbytes > start:
                other.overlaps.append(region)
                region.overlaps.append(other)
        bisect.insort(spans, (start, region.id))

    def region(self, name: str) -> Region:
        """The registered region called ``name``."""
        try:
            return self._names[name]
        except KeyError:
            from ..errors import UnknownRegionError
            raise UnknownRegionError(f"no region named {name!r} is registered") from None

    # -- transfers ---------------------------------------------------------------------------------
    # the transfers' checks are C (pipellm/pipeline/_request.pyx): every request starts there
    to_device = Requests.to_device
    to_host = Requests.to_host

    def compute(self, us: float, *, stream: Stream | None = None) -> None:
        """Device work of ``us`` microseconds on ``stream`` (modelled on the emulated device)."""
        self._check()
        stream = self.device.check_stream(stream)
        if self._recorder is not None:
            self._recorder.compute(us, stream)
        self.device.compute(us, stream=stream)

    def wait_speculation(self, timeout: float | None = None) -> None:
        """``pipellm`` mode: block until the workers have planned and encrypted everything
        the predictor named so far (for tests and benchmarks; requests never need it)."""
        self._check()
        if not self._engine.wait_speculation(self.timeout if timeout is None else timeout):
            raise TransferTimeoutError(f"speculation did not settle within {timeout} s")

    def record(self, path, *, workload: str = "", meta: dict | None = None):
        """Record this pipeline's traffic from now on as a trace file (version 1; ``.gz``
        for gzip): ``with pipe.record("run.jsonl.gz"): ...``. Returns the recorder."""
        self._check()
        from ..traces.record import TraceRecorder

        if self._recorder is not None:
            raise ArgumentError("this pipeline is already recording; close that recorder first")
        self._recorder = TraceRecorder(self, path, workload, meta)
        return self._recorder

    def stream(self) -> Stream:
        """A new device stream."""
        self._check()
        return self.device.create_stream()

    def synchronize(self, stream: Stream | None = None) -> None:
        """Wait until every transfer submitted so far (on ``stream``, or all) has landed;
        raise :class:`~pipellm.IntegrityError` if any failed authentication, or
        :class:`~pipellm.DeviceError` if the device failed."""
        self._check()
        if self._recorder is not None:
            self._recorder.sync(stream)
        try:
            self.device.synchronize(stream, timeout=self.timeout, session=self._engine.session)
            self._engine.drain(self.timeout)
        except (IntegrityError, DeviceError):
            self._engine.failure_reported = True
            raise
        self._check()

    def _device_copy(self, region: Region) -> DeviceBuffer:
        if region.device_buffer is not None:
            return region.device_buffer
        with self._lock:
            if region.device_buffer is None:
                region.device_buffer = self.device.alloc(region.nbytes, dtype=region.dtype, shape=region.shape)
            return region.device_buffer

    # -- state ----------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._fork_generation != _fork.generation:
            _fork.check(self._fork_generation, "pipeline")
        if self._closed:
            raise ChannelClosedError("the pipeline is closed")
        failure = self._engine.failure()
        if failure is not None:
            if not self._engine.failure_reported:
                self._engine.failure_reported = True
                raise failure
            raise ChannelClosedError(f"the channel was closed by an earlier failure: {failure}") from failure

    def stats(self) -> dict:
        """Counters of this pipeline (and its device's, where it has some)."""
        out = {"mode": self.mode, "device": self.device.kind, "chunk_size": self.chunk_size,
               "uptime_s": perf_counter() - self._started}
        out.update(self._engine.stats())
        out.update(self.device.stats())
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish outstanding transfers, end the session, free what the pipeline made.

        Idempotent. Raises the channel's integrity failure if nobody has seen it yet: an
        authentication failure is never dropped silently."""
        if self._closed:
            return
        if self._fork_generation != _fork.generation:  # a forked child: the threads are the parent's
            self._closed = True
            self._finalizer.detach()
            return
        try:
            self.device.synchronize(timeout=self.timeout, session=self._engine.session)
            self._engine.drain(self.timeout)
        except Exception:
            pass  # reported below if it was an integrity failure; close goes on regardless
        finally:
            self._closed = True
            self._finalizer.detach()
            if self._recorder is not None:
                self._recorder.close()
            failure = self._engine.failure()
            _release(self._engine, self._regions, self.device, self._owns_device)
            self._names.clear()
        if failure is not None and not self._engine.failure_reported:
            self._engine.failure_reported = True
            raise failure

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass  # don't mask the exception already propagating

    def __repr__(self) -> str:
        return f"<Pipeline mode={self.mode} device={self.device.kind}{' closed' if self._closed else ''}>"
