"""The seeded soak (``pipellm soak``): a short run in CI, and proof that it catches what
it is meant to catch."""

import pytest

from pipellm import ArgumentError
from pipellm.cli import main
from pipellm.pipeline import speculative
from pipellm.soak import soak


@pytest.mark.parametrize("iv_order", ["strict", "window"])
def test_a_short_soak_delivers_nothing_stale_and_reuses_no_iv(iv_order):
    report = soak(3000, seed=7, iv_order=iv_order, check_every=500)
    assert report.ok
    assert report.transfers_h2d == 3000 and report.transfers_d2h > 50 and report.host_writes > 100
    assert report.checks == 6 and report.key_rotations > 10 and report.ciphertexts > 3000
    assert report.hits > 500 and report.misses > 300  # both paths ran, many times


def test_the_same_seed_draws_the_same_run():
    a, b = soak(500, seed=3), soak(500, seed=3)
    assert (a.transfers_d2h, a.host_writes) == (b.transfers_d2h, b.host_writes)


def test_the_soak_catches_stale_ciphertext(monkeypatch):
    # a pipeline that no longer validates speculation before sending must be caught
    monkeypatch.setattr(speculative.SpeculativeEngine, "_current", staticmethod(lambda item: True))
    report = soak(3000, seed=7)
    assert not report.ok and report.stale_bytes > 0


def test_bad_soak_arguments_are_refused():
    with pytest.raises(ArgumentError, match="transfers must be an int >= 1"):
        soak(0)
    with pytest.raises(ArgumentError, match="seed must be an int >= 0"):
        soak(10, seed=-1)


def test_the_soak_command(capsys, tmp_path):
    out = tmp_path / "soak.json"
    assert main(["soak", "--transfers", "400", "--iv-order", "both", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("stale bytes 0") == 2 and "IV reuse 0" in text and out.exists()
