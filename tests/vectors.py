"""NIST CAVS AES-256-GCM vectors (from ``cryptography_vectors``), shared by the channel's
and the GPU kernels' tests."""

import os

import cryptography_vectors


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
