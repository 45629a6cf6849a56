"""Traces: the strict reader, the writer, the recorder, generators and the replayer."""

import gzip
import json

import numpy as np
import pytest

import pipellm
from pipellm.traces import Record, Trace, TraceError, generate, read, replay, replay_many, write
from pipellm.traces.format import dumps, loads

HEADER = '{"format": "pipellm-trace", "version": 1, "workload": "t"}'
REGION = '{"op": "region", "id": "a", "nbytes": 100, "kind": "weight"}'

MALFORMED = [
    ("not json", HEADER + "\n{op: h2d}", 2, "not JSON"),
    ("no header", REGION, 1, "first line must be the header"),
    ("wrong format", '{"format": "other", "version": 1}', 1, "first line must be the header"),
    ("wrong version", '{"format": "pipellm-trace", "version": 2}', 1, "unsupported trace version 2"),
    ("array line", HEADER + "\n[1, 2]", 2, "JSON object"),
    ("unknown op", HEADER + '\n{"op": "teleport"}', 2, "unknown op 'teleport'"),
    ("undeclared region", HEADER + '\n{"op": "h2d", "region": "a", "offset": 0, "nbytes": 1}', 2, "not declared"),
    ("duplicate region", HEADER + "\n" + REGION + "\n" + REGION, 3, "declared twice"),
    ("bad kind", HEADER + '\n{"op": "region", "id": "a", "nbytes": 1, "kind": "dram"}', 2, "kind must be one of"),
    ("zero-size region", HEADER + '\n{"op": "region", "id": "a", "nbytes": 0, "kind": "kv"}', 2, ">= 1"),
    ("span outside", HEADER + "\n" + REGION + '\n{"op": "h2d", "region": "a", "offset": 90, "nbytes": 20}', 3,
     r"\[90, 110\) is outside"),
    ("float bytes", HEADER + "\n" + REGION + '\n{"op": "d2h", "region": "a", "offset": 0, "nbytes": 1.5}', 3,
     "must be an integer"),
    ("bool offset", HEADER + "\n" + REGION + '\n{"op": "write", "region": "a", "offset": true, "nbytes": 1}', 3,
     "must be an integer"),
    ("negative compute", HEADER + '\n{"op": "compute", "us": -1}', 2, "us"),
    ("use after free", HEADER + "\n" + REGION + '\n{"op": "free", "region": "a"}\n'
     '{"op": "h2d", "region": "a", "offset": 0, "nbytes": 1}', 4, "after it was freed"),
    ("bad t", HEADER + '\n{"op": "sync", "t": "now"}', 2, '"t" must be a number'),
]


@pytest.mark.parametrize("what,text,line,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_reader_refuses_malformed_input_with_the_line_number(tmp_path, what, text, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(TraceError, match=f"bad.jsonl:{line}: .*{message}"):
        read(path)


def test_reader_skips_blank_and_comment_lines_and_ignores_unknown_fields(tmp_path):
    path = tmp_path / "ok.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("# a comment\n\n" + HEADER + "\n" + REGION[:-1] + ', "extra": 1}\n')
        f.write('{"op": "h2d", "region": "a", "offset": 0, "nbytes": 100, "stream": 2, "t": 1.5}\n{"op": "sync"}\n')
    trace = read(path)
    assert [r.op for r in trace.records] == ["region", "h2d", "sync"]
    assert trace.records[1] == Record("h2d", "a", 0, 100, 2, t=1.5)
    assert trace.records[2].stream is None


def test_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("# nothing\n")
    with pytest.raises(TraceError, match="empty trace"):
        read(tmp_path / "empty.jsonl")
    with pytest.raises(TraceError, match="cannot read"):
        read(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TraceError, match="UTF-8"):
        read(tmp_path / "bin.jsonl")


def test_writer_round_trip_exactly(tmp_path):
    trace = generate.accelerate("opt-13b", tokens=2, weight_budget=8 << 20)
    path = tmp_path / "t.jsonl.gz"
    write(path, trace.workload, trace.records, trace.meta)
    back = read(path)
    assert back.records == trace.records and back.meta == trace.meta
    assert loads(dumps(back)).records == trace.records
    first = json.loads(gzip.open(path, "rt").readline())
    assert first == {"format": "pipellm-trace", "version": 1, "workload": trace.workload, "meta": trace.meta}


@pytest.mark.parametrize("workload", ["accelerate", "flexgen", "lora", "moe", "vllm-swap", "mixed-accelerate"])
def test_generators_write_valid_traces(workload):
    small = {"accelerate": dict(tokens=2), "flexgen": dict(new_tokens=2, prompt=16), "lora": dict(steps=1),
             "moe": dict(tokens=2), "vllm-swap": dict(requests=4), "mixed-accelerate": dict(tokens=2)}[workload]
    trace = generate.generate(workload, **small, **({} if workload.startswith("vllm") else
                                                   {"weight_budget": 4 << 20}))
    assert loads(dumps(trace)).records == trace.records  # the strict reader accepts it
    assert trace.transfers("h2d")
    if workload.startswith("mixed"):
        assert any(r.op == "h2d" and r.region.startswith("small") for r in trace.records)


def test_unknown_workload_and_model():
    with pytest.raises(pipellm.ArgumentError, match="unknown workload"):
        generate.generate("bitcoin")
    with pytest.raises(pipellm.ArgumentError, match="unknown model"):
        generate.accelerate("gpt-9")
    with pytest.raises(pipellm.ArgumentError, match="not a mixture-of-experts"):
        generate.moe("opt-13b")


def tiny_trace():
    recs = [Record("region", f"w{i}", nbytes=64 << 10, kind="weight") for i in range(3)]
    recs.append(Record("region", "kv", nbytes=32 << 10, kind="kv"))
    for step in range(4):
        for i in range(3):
            recs += [Record("h2d", f"w{i}", 0, 64 << 10, 0), Record("compute", us=20.0, stream=0)]
        recs += [Record("d2h", "kv", 0, 4096, 1), Record("write", "w1", 100, 50), Record("sync"),
                 Record("h2d", "kv", 0, 8192, 1)]
    recs.append(Record("free", "kv"))
    return Trace("tiny", {}, recs, "tiny")


@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm"])
def test_replay_verifies_every_mode(mode):
    row = replay(tiny_trace(), mode, "layerwise" if mode == "pipellm" else None, min_speculative_bytes=0)
    assert row["verified"] and row["mode"] == mode and row["transfers_h2d"] == 16
    assert row["time_s"] > 0
    # at least one message per transfer (pipellm adds GO/SKIP commands); AES only if encrypted
    assert row["messages_h2d"] >= 16 and (row["encrypt_s"] > 0) == (mode != "plain")


def test_replay_many_reports_against_plain():
    rows = replay_many([tiny_trace()], ["plain", "cc", "pipellm"], ["layerwise", "oracle"])
    assert [(r["mode"], r["predictor"]) for r in rows] == [("plain", "-"), ("cc", "-"), ("pipellm", "layerwise"),
                                                            ("pipellm", "oracle")]
    assert rows[0]["overhead_vs_plain"] == 0
    for key in ("trace", "mode", "predictor", "time_s", "overhead_vs_plain", "hit_rate", "nops", "relinquishes",
                "reencrypted_bytes", "verified"):
        assert all(key in r for r in rows)
    assert all(r["verified"] for r in rows)
    cost = {r["mode"]: r["predictor_us_per_transfer"] for r in rows}
    assert cost["plain"] == cost["cc"] == 0 and cost["pipellm"] > 0   # only pipellm asks a predictor


@pytest.mark.parametrize("name", ["layerwise", "kvswap", "lru", "learned", "sequence", "none"])
def test_replay_predictor_options_reach_the_predictors_that_take_them(name):
    """``--predictor-option`` goes to a predictor's constructor where its signature takes
    the option (so every built-in's constructor must have one to inspect) and is left
    out elsewhere."""
    from pipellm.traces.replay import _predictor
    p = _predictor(name, tiny_trace(), {"order": 2, "width": 3, "capacity": 7, "no_such_option": 1})
    expected = {"layerwise": ("order", 2), "lru": ("capacity", 7), "learned": ("width", 3)}.get(name)
    if expected:
        assert getattr(p, expected[0]) == expected[1]
    assert p.name == name and not hasattr(p, "no_such_option")


def test_record_then_replay(tmp_path):
    path = tmp_path / "run.jsonl.gz"
    with pipellm.Pipeline(device="emulated", mode="pipellm") as pipe:
        layers = [pipe.register(pipellm.empty(1 << 16, np.uint8), name=f"w{i}", kind="weight") for i in range(3)]
        sink = pipe.register(np.zeros(4096, np.uint8), name="sink", kind="activation")
        with pipe.record(path, workload="recorded", meta={"by": "test"}) as rec:
            s = pipe.stream()
            for p in range(3):
                for r in layers:
                    pipe.to_device(r, stream=s)
                    pipe.compute(10, stream=s)
                pipe.to_host(layers[0].device_buffer, sink, nbytes=4096, stream=s).wait()
                pipe.synchronize()
                layers[1].array[3] = p + 1   # a CPU write: recorded before w1's next load
        assert rec.records > 0
    trace = read(path)
    ops = [r.op for r in trace.records]
    assert trace.workload == "recorded" and trace.meta == {"by": "test"}
    assert ops.count("region") == 4 and ops.count("h2d") == 9 and ops.count("d2h") == 3
    assert ops.count("write") == 2 and ops.count("compute") == 9
    assert trace.regions["w0"].kind == "weight" and trace.regions["sink"].kind == "activation"
    assert all(r.t is not None for r in trace.records)
    assert replay(trace, "pipellm", "layerwise")["verified"]


def test_recording_twice_is_refused():
    with pipellm.Pipeline(device="emulated", mode="cc") as pipe:
        import tempfile, os
        d = tempfile.mkdtemp()
        with pipe.record(os.path.join(d, "a.jsonl")):
            with pytest.raises(pipellm.ArgumentError, match="already recording"):
                pipe.record(os.path.join(d, "b.jsonl"))


def test_a_summary_says_what_a_trace_asks_and_its_regime(tmp_path):
    from pipellm.traces import Record, Trace, summarize

    records = [Record("region", "w", nbytes=4 << 20), Record("region", "kv", nbytes=1 << 20),
               Record("h2d", "w", 0, 4 << 20, stream=0), Record("compute", stream=0, us=50.0),
               Record("d2h", "kv", 0, 1 << 20, stream=0), Record("sync")]
    s = summarize(Trace("t", {}, records), aes_bytes_per_s=4e9)
    assert (s["h2d_transfers"], s["h2d_bytes"], s["d2h_transfers"], s["d2h_bytes"]) == (1, 4 << 20, 1, 1 << 20)
    assert s["link_s"] == pytest.approx((5 << 20) / 50e9 + 2 * 2e-6)
    assert s["compute_s"] == pytest.approx(50e-6) and s["regime"] == "transfer-bound"
    assert s["encrypt_1_core_s"] == pytest.approx((4 << 20) / 4e9)
    longer = summarize(Trace("t", {}, records[:3] + [Record("compute", stream=0, us=500.0)]))
    assert longer["regime"] == "compute-bound" and "encrypt_1_core_s" not in longer


def test_traces_summary_command(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "acc.jsonl.gz"
    subprocess.run([sys.executable, "-m", "pipellm.cli", "traces", "generate", "accelerate", "-o", str(path)],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "pipellm.cli", "traces", "summary", str(path), "--json"],
                         check=True, capture_output=True, text=True, timeout=300)
    (row,) = json.loads(out.stdout)
    assert row["workload"].startswith("accelerate") and row["h2d_transfers"] > 0 and row["regime"] in (
        "transfer-bound", "compute-bound")
