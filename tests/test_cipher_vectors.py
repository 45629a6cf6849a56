"""NIST CAVS AES-256-GCM vectors through the channel's cipher path (pipellm.channel.cipher)."""

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipellm.channel import cipher

cryptography_vectors = pytest.importorskip("cryptography_vectors", reason="pip install cryptography_vectors")


def load(name):
    """Vectors with the channel's parameters: 256-bit keys, 96-bit IVs, 128-bit tags."""
    path = os.path.join(os.path.dirname(cryptography_vectors.__file__), "ciphers", "AES", "GCM", name)
    vectors, params, current = [], {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                k, v = line.strip("[]").split(" = ")
                params[k] = int(v)
            elif line.startswith("Count = "):
                current = {"params": dict(params), "fail": False}
                vectors.append(current)
            elif line == "FAIL":
                current["fail"] = True
            elif " = " in line and current is not None:
                k, v = line.split(" = ")
                current[k] = bytes.fromhex(v)
            elif line.endswith(" =") and current is not None:
                current[line[:-2]] = b""
    return [v for v in vectors if v["params"]["IVlen"] == 96 and v["params"]["Taglen"] == 128]


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
