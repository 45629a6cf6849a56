"""The replay's explanation (``pipellm replay --explain``), its bounds, the timeline it
is built from, and the many-core model (``--cores``)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipellm import timeline
from pipellm.cli import main
from pipellm.traces import Record, Trace, replay_many, write
from pipellm.traces.explain import CAUSES, bound, breakdown
from pipellm.traces.intervals import Union
from pipellm.traces.model import simulate
from pipellm.traces.replay import ALWAYS

MiB = 1 << 20


def layers(passes=4, n=4, nbytes=2 * MiB, us=100.0, sync_each=False) -> Trace:
    recs = [Record("region", f"layer{i}", nbytes=nbytes, kind="weight") for i in range(n)]
    recs.append(Record("region", "kv", nbytes=256 << 10, kind="kv"))
    for _ in range(passes):
        for i in range(n):
            recs += [Record("h2d", f"layer{i}", 0, nbytes, 0), Record("compute", us=us, stream=0)]
            if sync_each:  # the host waits for each layer (a blocking load)
                recs.append(Record("sync"))
        recs += [Record("d2h", "kv", 0, 256 << 10, 0), Record("sync")]
    return Trace("layers", {}, recs, "<layers>")


COSTS = {"seal_bytes_per_s": 10e9, "seal_fixed_s": 1e-6, "open_bytes_per_s": 10e9, "open_fixed_s": 1e-6,
         "library_per_transfer_s": 2e-6, "cc_library_per_transfer_s": 5e-6}


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 20)), max_size=12), st.floats(0, 120), st.floats(0, 40))
def test_union_overlap_is_the_measure_of_the_intersection(spans, a, width):
    intervals = [(s, s + w) for s, w in spans]
    u = Union(intervals)
    b = a + width
    # brute force on a fine grid (interval ends are multiples of nothing: allow the grid's error)
    step = 0.01
    grid = [a + (k + 0.5) * step for k in range(int(width / step))]
    covered = sum(step for x in grid if any(s <= x < e for s, e in intervals))
    assert u.overlap(a, b) == pytest.approx(covered, abs=step * (2 * len(intervals) + 2))
    assert u.overlap(a, b) <= width + 1e-9
    assert u.total == pytest.approx(u.before(float("inf")))


def test_recording_is_off_outside_and_one_at_a_time():
    assert not timeline.recording
    with timeline.recorded() as spans:
        with pytest.raises(RuntimeError, match="already being recorded"):
            with timeline.recorded():
                pass
        timeline.span("x", 0.0, 1.0)
    assert not timeline.recording and spans[0][1:4] == ("x", 0.0, 1.0)


def test_bound_takes_the_largest_of_the_floor_the_host_threads_and_the_cores():
    assert bound(1.0, host=0.5, device=0.0, cores=2, threads=2) == 1.0
    assert bound(0.1, host=4.0, device=0.0, cores=2, threads=1) == 4.0   # one thread does it all
    assert bound(0.1, host=4.0, device=0.0, cores=2, threads=4) == 2.0   # the cores do
    assert bound(0.1, host=2.0, device=3.0, cores=2, threads=4) == 2.5   # the device shares them
    assert bound(0.1, host=2.0, device=0.0, cores=2, threads=4, machine=3.0) == 3.0  # the memory bandwidth


def test_only_the_device_work_the_modelled_clock_saw_shares_the_cores():
    # one device op of 1 s wall and 0.8 s CPU, the clock stopped for its second half (a
    # host thread waiting on the emulator): half its CPU was inside modelled time
    spans = [(7, "device:open", 0.0, 1.0, 0.8), (1, "stall", 0.5, 1.0, 0.0), (7, "device:copy", 1.5, 1.5, 0.0)]
    ex = breakdown(spans, 1, {}, {}, (0.0, 2.0))
    assert ex["run_device_cpu_s"] == pytest.approx(0.8)
    assert ex["run_device_cpu_modelled_s"] == pytest.approx(0.4)
    assert ex["clock_stopped_s"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def explained():
    # pipellm with speculation always on: under the controller a loaded machine may turn it
    # off, and the pass drawn would have no worker in it
    return replay_many([layers()], ["plain", "cc", ALWAYS], ["layerwise"], explain=True, model_cores=16,
                       timeline_of=0)


def test_explain_attributes_the_modelled_time_to_its_causes(explained):
    for row in explained:
        ex = row["explain"]
        assert set(ex["causes_s"]) == set(CAUSES)
        assert all(v >= 0 for v in ex["causes_s"].values())
        # every part of the requesting thread's modelled time has one cause (the loop
        # between records is the only thing outside them)
        assert sum(ex["causes_s"].values()) == pytest.approx(row["time_s"], rel=0.25, abs=2e-3)
    plain, cc, spec = explained
    assert plain["explain"]["causes_s"]["encrypting"] == 0
    # cc has no thread but the requesting one to receive device-to-host data: its own
    # receiving is the library's, never a wait for another thread
    assert cc["explain"]["causes_s"]["waiting_receive"] == 0 and cc["explain"]["causes_s"]["waiting_worker"] == 0
    assert cc["explain"]["causes_s"]["encrypting"] > 0          # cc encrypts on the requesting thread
    assert cc["explain"]["causes_s"]["compute"] > 0             # and waits for the modelled compute
    assert any("worker" in name for name in spec["explain"]["thread_cpu_s"])
    assert spec["explain"]["thread_cpu_s"]["requesting (replay)"] > 0


def test_bounds_are_at_least_plain_and_price_the_runs_work(explained):
    plain = explained[0]["time_s"]
    for row in explained:
        b = row["bounds"]
        assert b["bound_alone_s"] >= plain and b["bound_run_s"] >= plain
        assert b["hardware_bound_s"]["16"] >= plain
        assert b["work_alone_s"]["host"] > 0 and b["work_alone_s"]["device"] > 0
        assert 0 <= b["work_run_s"]["device_modelled"] <= b["work_run_s"]["device"]
        assert 0 <= b["device_share_modelled"] <= 1
    cc = explained[1]["bounds"]
    # cc's host work is at least its bytes at the measured AES rate
    assert cc["work_alone_s"]["host"] >= explained[1]["encrypt_bytes"] / explained[1]["costs_alone"]["seal_bytes_per_s"]


def test_timeline_keeps_one_pass_on_the_modelled_clock(explained):
    for row in explained:
        lanes = {s[0] for s in row["timeline"]}
        assert "requesting" in lanes and "link h2d" in lanes
        assert all(s[3] >= s[2] for s in row["timeline"])
    # the pass's encryption is on a worker's lane, unless the requests took the chunks no
    # worker had started (a loaded machine may leave the worker unscheduled for a pass)
    spec = explained[2]
    assert any("worker" in s[0] for s in spec["timeline"]) or spec["stolen_chunks"] > 0


def test_model_misses_share_the_aes_with_idle_workers_and_more_cores_never_hurt():
    trace = layers(passes=6, us=400.0, sync_each=True)
    n = sum(r.op == "h2d" for r in trace.records)
    cc = simulate(trace, "cc", COSTS, cores=16)
    misses = [simulate(trace, "pipellm", COSTS, cores=c, hits=[False] * n) for c in (2, 16)]
    # every 2 MiB miss in pieces on 16 cores: 8 hands (256 KiB each); on 2 cores no helper
    # (the requesting thread and the copy engine have the two cores), sealed as cc does
    assert misses[1] < misses[0] == pytest.approx(cc)
    hits = [False] * 4 + [True] * (n - 4)
    times = [simulate(trace, "pipellm", COSTS, cores=c, hits=hits) for c in (1, 2, 4, 16)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(times, times[1:]))
    plain = simulate(trace, "plain", COSTS, cores=16)
    assert plain < times[-1] < cc


def test_model_charges_the_encryption_thrown_away_to_the_workers():
    # a fan-out's unrequested candidates (or dropped speculation) cost the workers their
    # AES: on two cores the requests wait for it, on sixteen the workers absorb it
    trace = layers(passes=6, us=50.0, sync_each=True)
    n = sum(r.op == "h2d" for r in trace.records)
    hits = [False] * 4 + [True] * (n - 4)
    layer_bytes = next(r.nbytes for r in trace.records if r.op == "h2d")

    def t(cores, wasted):
        return simulate(trace, "pipellm", COSTS, cores=cores, hits=hits, wasted_bytes=wasted)
    wasted = 3 * layer_bytes * (n - 4)  # three unrequested candidates per hit
    assert t(2, wasted) > 1.5 * t(2, 0)
    assert t(16, wasted) - t(16, 0) < 0.25 * (t(2, wasted) - t(2, 0))
    assert simulate(trace, "cc", COSTS, cores=2, wasted_bytes=10 * layer_bytes) == simulate(trace, "cc", COSTS, cores=2)
    # the SKIPs a strict-order run sent past candidates cost the requesting thread
    skipped = simulate(trace, "pipellm", COSTS, cores=16, hits=hits, skips=[0] * 4 + [2] * (n - 4))
    assert skipped > t(16, 0) + 2 * (n - 4) * COSTS["cc_library_per_transfer_s"] * 0.5


def test_model_hides_encryption_under_compute_once_predicted():
    # compute (1 ms per 2 MiB layer) is far longer than the layer's AES (0.2 ms), and the
    # host waits for each layer (cc pays the AES every time): after the first pass
    # pipellm hides all of it, so its overhead is the first pass's
    trace = layers(passes=20, us=1000.0, sync_each=True)
    n = sum(r.op == "h2d" for r in trace.records)
    hits = [False] * 4 + [True] * (n - 4)
    plain = simulate(trace, "plain", COSTS, cores=2)
    spec = simulate(trace, "pipellm", COSTS, cores=2, hits=hits)
    cc = simulate(trace, "cc", COSTS, cores=2)
    assert spec - plain < 0.1 * (cc - plain)


def test_cli_explain_cores_plot_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the timeline plot needs matplotlib (the 'plot' extra)")
    path = tmp_path / "t.jsonl"
    write(path, "layers", layers(passes=3).records)
    png, out = tmp_path / "t.png", tmp_path / "rows.json"
    assert main(["replay", str(path), "--modes", "plain,cc,pipellm,pipellm-always", "--cores", "16", "--plot", str(png),
                 "--out", str(out), "--no-progress", "--repeat", "2"]) == 0
    text = capsys.readouterr().out
    assert "where the requesting thread's modelled time goes" in text
    assert "bound, H100 device, 16 cores" in text and "modelled (not run)" in text
    assert png.stat().st_size > 10_000
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["plain", "cc", "pipellm", "pipellm-always"]
    assert all("16" in r["modelled"] and "bound_run_s" in r["bounds"] and len(r["runs_s"]) == 2 for r in rows)
    assert all(r["time_s"] in r["runs_s"] for r in rows)  # the median run's row
    assert rows[3]["payoff_switches"] == 0 and rows[3]["hits"] > 0  # speculation always on


def test_cli_refuses_zero_cores(tmp_path):
    path = tmp_path / "t.jsonl"
    write(path, "layers", layers(passes=1).records)
    with pytest.raises(SystemExit, match="--cores must be >= 1"):
        main(["replay", str(path), "--cores", "0", "--no-progress"])


def test_cli_pipeline_options_reach_every_mode_and_unknown_ones_are_refused(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write(path, "layers", layers(passes=1).records)
    messages = {}
    for option in ([], ["--pipeline-option", "chunk_size=65536"]):
        assert main(["replay", str(path), "--modes", "cc,pipellm", "--json", "--no-progress", *option]) == 0
        messages[bool(option)] = [r["messages_h2d"] for r in json.loads(capsys.readouterr().out)]
    # 2 MiB layers: one 4 MiB chunk each by default, 32 of 64 KiB with the option
    assert all(small >= 16 * big for big, small in zip(messages[False], messages[True]))
    with pytest.raises(SystemExit, match="Pipeline has no option 'bogus'"):
        main(["replay", str(path), "--pipeline-option", "bogus=3", "--no-progress"])
