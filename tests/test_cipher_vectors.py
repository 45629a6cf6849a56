"""NIST CAVS AES-256-GCM vectors through the channel's cipher path (pipellm.channel.cipher)."""

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipellm.channel import cipher

pytest.importorskip("cryptography_vectors", reason="pip install cryptography_vectors")
from vectors import load  # noqa: E402 - after the skip


ENCRYPT = load("gcmEncryptExtIV256.rsp")
DECRYPT = load("gcmDecrypt256.rsp")


def test_vector_files_have_cases():
    assert len(ENCRYPT) >= 100 and len(DECRYPT) >= 100
    assert any(v["fail"] for v in DECRYPT) and any(not v["fail"] for v in DECRYPT)


@pytest.mark.parametrize("v", ENCRYPT, ids=lambda v: f"enc-pt{v['params']['PTlen']}-aad{v['params']['AADlen']}")
def test_seal_matches_nist(v):
    out = bytearray(len(v["PT"]) + 16)
    cipher.seal_into(AESGCM(v["Key"]), v["IV"], v["PT"], v["AAD"], out)
    assert bytes(out) == v["CT"] + v["Tag"]


@pytest.mark.parametrize("v", DECRYPT, ids=lambda v: f"dec-pt{v['params']['PTlen']}-{'fail' if v['fail'] else 'ok'}")
def test_open_matches_nist(v):
    out = bytearray(len(v["CT"]))
    ok = cipher.open_into(AESGCM(v["Key"]), v["IV"], v["CT"] + v["Tag"], v["AAD"], out)
    assert ok is not v["fail"]
    if ok:
        assert bytes(out) == v["PT"]
