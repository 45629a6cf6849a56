import os

import numpy as np
import pytest

import pipellm

#: tests never wait long: a lost message must show up as a clear error, not a hang
#: (the CUDA simulator runs GPU threads as Python threads: far slower, so it gets longer)
TIMEOUT = 60.0 if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 5.0


@pytest.fixture
def device():
    dev = pipellm.open_device("emulated")
    yield dev
    dev.close()


def make_pipe(mode="cc", *, device="emulated", chunk_size=4096, bounce_bytes=1 << 20, timeout=TIMEOUT, **kw):
    return pipellm.Pipeline(device=device, mode=mode, chunk_size=chunk_size, bounce_bytes=bounce_bytes,
                            timeout=timeout, **kw)


def random_bytes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
