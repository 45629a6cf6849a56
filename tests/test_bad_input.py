"""Bad input gets a specific exception and message, and changes nothing."""

import re

import numpy as np
import pytest

import pipellm
from pipellm import ArgumentError, ArgumentTypeError, ChannelClosedError, DeviceUnavailableError, UnknownRegionError
from conftest import make_pipe
from pipellm.devices import cuda_unavailable_reason
from pipellm.traces import TraceError, read as read_trace


@pytest.fixture
def env(tmp_path):
    pipe = make_pipe()
    other = make_pipe()
    region = pipe.register(np.arange(1000, dtype=np.uint8), name="r")
    dbuf = pipe.to_device(region)
    pipe.synchronize()
    ns = dict(pipe=pipe, other=other, region=region, dbuf=dbuf,
              foreign_region=other.register(np.zeros(10, np.uint8)),
              foreign_buf=other.device.alloc(10), foreign_stream=other.stream(),
              readonly=pipe.register(np.frombuffer(b"read only bytes", dtype=np.uint8)),
              tmp=tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"format": "pipellm-trace", "version": 9}\n')
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04\x95cos\nsystem\n")  # a pickle, never run
    yield ns
    pipe.close()
    other.close()


CASES = [
    # (what, call, exception, message)
    ("list instead of array", lambda e: e["pipe"].register([1, 2, 3]), ArgumentTypeError, "numpy array or a buffer"),
    ("object dtype", lambda e: e["pipe"].register(np.array([object()])), ArgumentTypeError, "Python objects"),
    ("non-contiguous array", lambda e: e["pipe"].register(np.zeros((10, 10))[:, ::2]), ArgumentError, "C-contiguous"),
    ("empty array", lambda e: e["pipe"].register(np.zeros(0)), ArgumentError, "at least one byte"),
    ("name not a str", lambda e: e["pipe"].register(np.zeros(4), name=5), ArgumentTypeError, "name must be a str"),
    ("duplicate name", lambda e: e["pipe"].register(np.zeros(4), name="r"), ArgumentError, "already registered"),
    ("to_device of an array", lambda e: e["pipe"].to_device(np.zeros(4)), ArgumentTypeError, "expected a Region"),
    ("region of another pipeline", lambda e: e["pipe"].to_device(e["foreign_region"]), UnknownRegionError, "another pipeline"),
    ("negative offset", lambda e: e["pipe"].to_device(e["region"], -1), ArgumentError, "offset must be >= 0"),
    ("offset past the end", lambda e: e["pipe"].to_device(e["region"], 1000), ArgumentError, "offset 1000 is out of range"),
    ("span past the end", lambda e: e["pipe"].to_device(e["region"], 900, 200), ArgumentError, r"\[900, 1100\) is out of range"),
    ("zero bytes", lambda e: e["pipe"].to_device(e["region"], 0, 0), ArgumentError, "nbytes must be >= 1"),
    ("float offset", lambda e: e["pipe"].to_device(e["region"], 1.5), ArgumentTypeError, "offset must be an int"),
    ("bool nbytes", lambda e: e["pipe"].to_device(e["region"], 0, True), ArgumentTypeError, "nbytes must be an int"),
    ("dst too small", lambda e: e["pipe"].to_device(e["region"], dst=e["pipe"].device.alloc(10)), ArgumentError, "do not fit"),
    ("dst_offset without dst", lambda e: e["pipe"].to_device(e["region"], dst_offset=4), ArgumentError, "dst_offset needs dst"),
    ("dst of another device", lambda e: e["pipe"].to_device(e["region"], 0, 10, dst=e["foreign_buf"]), ArgumentError, "another device"),
    ("dst not a buffer", lambda e: e["pipe"].to_device(e["region"], dst=b"x"), ArgumentTypeError, "expected a DeviceBuffer"),
    ("stream of another device", lambda e: e["pipe"].to_device(e["region"], stream=e["foreign_stream"]), ArgumentError, "another device"),
    ("stream not a stream", lambda e: e["pipe"].to_device(e["region"], stream=1), ArgumentTypeError, "stream must come from"),
    ("to_host into read-only", lambda e: e["pipe"].to_host(e["dbuf"], e["readonly"]), ArgumentError, "read-only"),
    ("to_host src out of range", lambda e: e["pipe"].to_host(e["dbuf"], e["region"], src_offset=900), ArgumentError, "out of range"),
    ("to_host src not a buffer", lambda e: e["pipe"].to_host("buf", e["region"]), ArgumentTypeError, "expected a DeviceBuffer"),
    ("unknown region name", lambda e: e["pipe"].region("nope"), UnknownRegionError, "no region named 'nope'"),
    ("unknown mode", lambda e: pipellm.Pipeline(device="emulated", mode="fast"), ArgumentError, "unknown mode 'fast'"),
    ("mode not a str", lambda e: pipellm.Pipeline(device="emulated", mode=1), ArgumentTypeError, "mode must be a str"),
    ("predictor without pipellm mode", lambda e: pipellm.Pipeline(device="emulated", mode="cc", predictor="x"), ArgumentError, "only to mode 'pipellm'"),
    ("unknown predictor", lambda e: make_pipe("pipellm", predictor="psychic"), ArgumentError, "unknown predictor 'psychic'"),
    ("predictor not a name", lambda e: make_pipe("pipellm", predictor=3.5), ArgumentTypeError, "predictor must be a name or a Predictor"),
    ("malformed trace file", lambda e: read_trace(e["tmp"] / "bad.jsonl"), TraceError, "bad.jsonl:1: .*version"),
    ("predictor file that is a pickle", lambda e: make_pipe("pipellm", predictor=f"learned:{e['tmp'] / 'model.pkl'}"), ArgumentError, "cannot read"),
    ("unknown device", lambda e: pipellm.open_device("tpu"), ArgumentError, "unknown device 'tpu'"),
    ("device not a name", lambda e: pipellm.open_device(3), ArgumentTypeError, "device must be a name"),
    ("cuda without a driver", lambda e: pipellm.open_device("cuda"), DeviceUnavailableError, "cannot open the cuda device"),
    ("negative chunk size", lambda e: make_pipe(chunk_size=-1), ArgumentError, "chunk_size must be >= 1"),
    ("bounce smaller than 2 messages", lambda e: make_pipe(chunk_size=4096, bounce_bytes=5000), ArgumentError, "fewer than 2 messages"),
    ("zero timeout", lambda e: make_pipe(timeout=0), ArgumentError, "timeout must be a positive"),
    ("rotate_after zero", lambda e: make_pipe(rotate_after=0), ArgumentError, "rotate_after must be in"),
    ("chunk larger than the device takes", lambda e: make_pipe(chunk_size=1 << 30, bounce_bytes=1 << 31), ArgumentError, "larger than the device"),
    ("negative compute", lambda e: e["pipe"].compute(-5), ArgumentError, "compute time must be >= 0"),
    ("bad link model", lambda e: pipellm.LinkModel(h2d_bytes_per_s=0), ArgumentError, "must be positive"),
    ("adversary without on_message", lambda e: pipellm.open_device("emulated", adversary=object()), ArgumentError, "on_message"),
    ("alloc zero bytes", lambda e: e["pipe"].device.alloc(0), ArgumentError, "nbytes must be positive"),
    ("read past the end", lambda e: e["pipe"].device.read(e["dbuf"], 990, 20), ArgumentError, "outside"),
    # the low-level pieces a user can reach: errors of the library too, builtin-compatible
    ("copy into a smaller buffer", lambda e: pipellm._ext.copy_into(bytearray(1), b"ab"), ArgumentError,
     "destination holds 1 bytes, source has 2"),
    ("an AES-256 key of 16 bytes", lambda e: __import__("pipellm.kernels.tables").kernels.tables.expand_key(bytes(16)),
     ArgumentError, "needs a 32-byte key"),
    ("a malformed header's destination", lambda e: _tampered_message().dst, ArgumentError, "not a version-2 header"),
]


def _tampered_message():
    from pipellm.channel.endpoint import Message
    return Message("h2d", bytes(12), bytearray(b"not a header"), memoryview(bytearray(16)))


@pytest.mark.parametrize("what,call,exc,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, what, call, exc, message):
    if what == "cuda without a driver" and cuda_unavailable_reason() is None:
        pytest.skip("a CUDA GPU is here: the cuda device opens")
    before = env["pipe"].stats()
    device_before = env["pipe"].device.read(env["dbuf"])
    with pytest.raises(exc, match=message):
        call(env)
    assert issubclass(exc, pipellm.PipellmError)
    after = env["pipe"].stats()
    for key in ("transfers_h2d", "transfers_d2h", "messages_h2d", "messages_d2h"):
        assert after[key] == before[key], f"{what} changed {key}"
    assert np.array_equal(env["pipe"].device.read(env["dbuf"]), device_before)
    # the pipeline still works afterwards
    env["pipe"].to_device(env["region"])
    env["pipe"].synchronize()


def test_closed_pipeline_refuses_everything():
    pipe = make_pipe()
    region = pipe.register(np.ones(10, np.uint8))
    dbuf = pipe.to_device(region)
    pipe.close()
    for call in (lambda: pipe.register(np.ones(3)), lambda: pipe.to_device(region),
                 lambda: pipe.to_host(dbuf, region), pipe.synchronize, lambda: pipe.compute(1), pipe.stream):
        with pytest.raises(ChannelClosedError, match="closed"):
            call()


def test_freed_buffer_is_refused(device):
    with make_pipe(device=device) as pipe:
        region = pipe.register(np.ones(10, np.uint8))
        dst = device.alloc(10)
        device.free(dst)
        with pytest.raises(ArgumentError, match="was freed"):
            pipe.to_device(region, dst=dst)


@pytest.mark.parametrize("path, name, factory", [
    ("pipellm.channel._message", "Endpoint", "Sealer and Opener"),
    ("pipellm.pipeline._speculation", "Queue", "Pipeline(mode="),
    ("pipellm.devices._submission", "SessionBase", "open_session"),
    ("pipellm.devices._submission", "Submitter", "open_device"),
    ("pipellm.pipeline._request", "Engine", "a Pipeline makes"),
    ("pipellm.pipeline._request", "Requests", "pipellm.Pipeline"),
    ("pipellm.pipeline._region", "RegionBase", "Pipeline.register"),
])
def test_the_c_bases_are_not_made_on_their_own(path, name, factory):
    """The C halves of the library's objects hold fields their Python classes set: made
    alone, they would be half an object. Refused, naming what makes the real one."""
    import importlib
    cls = getattr(importlib.import_module(path), name)
    with pytest.raises(pipellm.ArgumentTypeError, match=f"{name} is the C base .*{re.escape(factory)}"):
        cls()


def test_an_unknown_session_is_refused_as_such():
    """A device asked for a session it never opened (or closed): UnknownSessionError, a
    ChannelClosedError, naming the session; nothing is submitted."""
    with pipellm.open_device("emulated") as dev:
        stream = dev.default_stream
        with pytest.raises(pipellm.UnknownSessionError, match="no open session 12345") as info:
            dev.submit_messages(stream, 12345, [])
        assert isinstance(info.value, ChannelClosedError)
        assert not stream._pending or all(op.finished for op in stream._pending)
