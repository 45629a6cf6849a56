"""The pipellm command: info and quick benchmark runs produce well-formed results."""

import json
import shutil
import subprocess
import sys

import pytest

from pipellm.cli import main


def run(*args):
    out = subprocess.run([sys.executable, "-m", "pipellm.cli", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_info_json():
    info = json.loads(run("info", "--json"))
    assert info["cores"] >= 1
    assert "aes" in info["cpu_crypto_flags"]
    assert info["openssl_behind_cryptography"].startswith("OpenSSL")
    assert info["devices"]["emulated"].startswith("available")
    from pipellm.devices import cuda_unavailable_reason
    cuda = "available" if cuda_unavailable_reason() is None else "unavailable: "  # (a GPU machine, or not)
    assert info["devices"]["cuda"].startswith(cuda)


def test_bench_crypto_quick(tmp_path):
    out = tmp_path / "crypto.json"
    result = json.loads(run("bench", "crypto", "--quick", "--repeats", "1", "--workers", "2", "--json",
                            "--no-progress", "--out", str(out)))
    assert [r["size"] for r in result["rows"]] == [4096, 65536, 1 << 20]
    for row in result["rows"]:
        assert row["cryptography_GBps"] > 0 and set(row["library_GBps"]) == {"1", "2"}
    assert {"library_1_worker_vs_cryptography_min_at_1MiB_plus", "speedup_2_vs_1_workers_min_at_1MiB_plus",
            "speedup_2_vs_1_workers_at_1MiB"} == set(result["summary"])
    assert json.loads(out.read_text()) == result


def test_bench_transfer_quick_table():
    text = run("bench", "transfer", "--quick", "--repeats", "1", "--no-progress")
    assert "plain GB/s" in text and "h2d_4KiB_cc_library_share_us_per_copy" in text
    assert "emulation stall" in text and "memory: RSS grew" in text


def test_bench_tracking_quick(tmp_path):
    result = json.loads(run("bench", "tracking", "--quick", "--repeats", "1", "--json", "--no-progress"))
    assert [r["count"] for r in result["rows"]] == [0, 16, 128]
    for row in result["rows"]:
        assert row["fork_numpy_us"] > 0 and row["fork_library_us"] > 0 and row["notify_us"] > 0


@pytest.mark.parametrize("argv,message", [(["bench", "--repeats", "0"], "--repeats must be at least 1"),
                                          (["bench", "nope"], "invalid choice")])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_bench_offload_quick():
    result = json.loads(run("bench", "offload", "--quick", "--json", "--no-progress"))
    assert set(result["scenarios"]) == {"compute-bound", "transfer-bound", "always-wrong", "mispredict"}
    cb = result["scenarios"]["compute-bound"]["modes"]
    assert set(cb) == {"plain", "cc", "pipellm"} and cb["pipellm"]["hit_rate"] > 0.9
    # one repeat (--quick): its paired ratio is the ratio of its only runs
    aw = result["scenarios"]["always-wrong"]["modes"]
    assert aw["cc"]["runs_s"] == [aw["cc"]["time_s"]]
    assert result["summary"]["always_wrong_pipellm_over_cc_paired_median"] == pytest.approx(
        aw["pipellm"]["time_s"] / aw["cc"]["time_s"])
    assert result["summary"]["hit_path_us_per_message_1_chunk_gapped"] > 0 < result["summary"]["hit_path_us_per_message_1_chunk_tight"]
    assert result["summary"]["idle_gap_probe_back_to_back_us"] > 0 < result["summary"]["idle_gap_probe_after_1ms_idle_us"]
    assert 0 < result["summary"]["hit_path_fastest_us_per_message_1_chunk_tight"] <= result["summary"]["hit_path_us_per_message_1_chunk_tight"]
    assert result["summary"]["hit_path_us_per_message_1_chunk_tight"] <= result["summary"]["hit_path_median_pass_us_per_message_1_chunk_tight"]
    # the request path of all three modes, timed the same way in the same run
    hit = result["hit_path"][0]
    assert {hit[m]["messages_per_transfer"] for m in ("pipellm", "plain", "cc")} == {2, 1}
    for mode in ("pipellm", "plain", "cc"):
        for label in ("gapped", "tight"):
            row = hit[mode][label]
            assert result["summary"][f"request_us_per_transfer_1_chunk_{label}_{mode}"] == row["us_per_transfer"] > 0
            assert row["us_per_message"] == pytest.approx(row["us_per_transfer"] / hit[mode]["messages_per_transfer"])
    for label in ("gapped", "tight"):
        assert result["summary"][f"hit_path_{label}_us_per_message_over_plain_request"] == pytest.approx(
            hit["pipellm"][label]["us_per_message"] / hit["plain"][label]["us_per_message"])
        assert result["summary"][f"hit_path_{label}_us_per_message_over_plain_request_median"] == pytest.approx(
            hit["pipellm"][label]["median_us_per_message"] / hit["plain"][label]["median_us_per_message"])
    assert result["summary"]["hit_path_median_us_per_message_1_chunk_gapped"] == hit["pipellm"]["gapped"]["median_us_per_message"]


def test_bench_predictors_quick():
    """Hit rates and both costs (back to back, and cold: scratch memory written between
    transfers) for every row, in the JSON and in the table."""
    pytest.importorskip("sklearn")
    result = json.loads(run("bench", "predictors", "--quick", "--repeats", "1", "--json", "--no-progress"))
    rows = result["rows"]
    assert {(r["workload"], r["predictor"]) for r in rows} >= {("accelerate", "layerwise"), ("flexgen", "learned")}
    for r in rows:
        assert 0 <= r["hit_rate"] <= 1 and r["us_per_transfer"] > 0 and r["us_per_transfer_cold"] > 0
    assert result["summary"]["accelerate_layerwise_hit_rate_after_first_pass"] > 0.99
    assert {"max_us_per_transfer_cold_rules", "max_us_per_transfer_cold_learned"} <= set(result["summary"])
    table = run("bench", "predictors", "--quick", "--repeats", "1", "--no-progress")
    assert table.splitlines()[1].split()[-1] == "cold" and "MiB written between transfers" in table


def test_a_library_error_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "nope"}\n')
    assert main(["replay", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "bad.jsonl:1" in err
    assert main(["traces", "summary", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipellm traces: ") and "missing.jsonl" in err and err.count("\n") == 1


def test_every_exception_class_is_a_pipellm_error():
    import inspect

    import pipellm.errors as errors
    from pipellm.predictors.learned import NotFittedError
    from pipellm.traces.format import TraceError
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)   # (warnings apart)
               if issubclass(c, Exception) and not issubclass(c, Warning) and c.__module__ == errors.__name__]
    assert len(classes) >= 12 and all(issubclass(c, errors.PipellmError) for c in classes)
    assert issubclass(errors.DeviceUnavailableError, errors.DeviceError)
    assert TraceError is errors.TraceError and NotFittedError is errors.NotFittedError


def test_bench_hotpath_quick_json():
    result = json.loads(run("bench", "hotpath", "--quick", "--repeats", "1", "--json", "--no-progress"))
    assert [r["size"] for r in result["rows"]] == [4096, 65536]
    for row in result["rows"]:
        assert set(row["us_per_request"]) == {"plain", "cc", "pipellm hit"}
        assert all(v > 0 for v in row["us_per_request"].values())
    assert set(result["lock_round_trip_ns"]) == {"pipellm", "pythread"}
    assert all(v > 0 for v in result["lock_round_trip_ns"].values())


def test_bench_gpu_host_quick_json():
    """The driver path's host cost on the fake driver: every mode and case measured, one
    driver call per encrypted message, none for plain copies' messages."""
    result = json.loads(run("bench", "gpu-host", "--quick", "--repeats", "1", "--json", "--no-progress"))
    rows = {(r["case"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(c, m) for c in ("4 KiB transfers", "4 MiB chunks") for m in ("plain", "cc", "pipellm")}
    for (case, mode), row in rows.items():
        assert row["engine_us_per_message"] > 0 and row["host_us_per_message"] <= row["engine_us_per_message"]
        assert row["driver_calls_per_message"].get("message", 0) == (0 if mode == "plain" else 1)
    assert rows[("4 MiB chunks", "pipellm")]["hits"] >= 1
    key = result["key_setup"]
    assert key["tables_ms"] > 0 and key["powers_ms"] > 0 and key["message_bytes"] == 4 << 20


def test_hotpath_counted_child_makes_its_requests_and_they_hit():
    """The child that callgrind counts (bench hotpath --instructions): its passes make the
    requests it says, and every pipellm request of them hits (else nothing is counted)."""
    from pipellm.benchmarks.hotpath import _requests
    spec = _requests("pipellm", 4096, 4, 2)
    assert (spec["requests"], spec["hits"]) == (8, 8) and spec["plans"] > 0
    assert _requests("cc", 4096, 4, 3) == {"requests": 12, "hits": 0, "plans": 0}


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="counting instructions needs valgrind")
def test_hotpath_counts_instructions_that_grow_with_the_requests():
    """Under callgrind the requesting thread's count grows with the passes made, by a
    plausible number of instructions per plain request."""
    from pipellm.benchmarks.hotpath import _callgrind
    few, more = (_callgrind("plain", "*Requests*to_device*", 4096, 4, n) for n in (1, 3))
    per_request = (more - few) / (2 * 4)
    assert 1_000 < per_request < 200_000, per_request
    (few, a), (more, b) = (_callgrind("pipellm", "*5Queue__replenish", 4096, 4, n, per_plan=True)
                           for n in (1, 3))
    assert b > a and 1_000 < (more - few) / (b - a) < 1_000_000
