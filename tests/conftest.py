import os

import numpy as np
import pytest

import pipellm
import pipellm.predictors._history
import pipellm.predictors._layerwise
import pipellm.predictors.learned
import pipellm.predictors.rules
import pipellm.predictors.simple


def pytest_sessionstart(session):
    """Compiled modules win the import over their sources: the predictors' .py files and
    the datapath's .pyx files (setup.py). An edit runs only after a rebuild, so tests of
    a stale build would test the old code."""
    import pipellm._ext.fence
    import pipellm._ext.intmap
    import pipellm._ext.locks
    import pipellm._ext.writeguard
    import pipellm.channel._message
    import pipellm.devices._clock
    import pipellm.devices._submission
    import pipellm.pipeline._region
    import pipellm.pipeline._request
    import pipellm.pipeline._sender
    import pipellm.pipeline._speculation
    import pipellm.pipeline._tasks
    for module in (pipellm.predictors._layerwise, pipellm.predictors._history, pipellm.predictors.rules, pipellm.predictors.learned,
                   pipellm.predictors.simple, pipellm._ext.bounce, pipellm._ext.fence, pipellm._ext.intmap, pipellm._ext.locks,
                   pipellm._ext.writeguard, pipellm.channel._message, pipellm.devices._clock, pipellm.devices._submission,
                   pipellm.pipeline._region, pipellm.pipeline._request, pipellm.pipeline._sender, pipellm.pipeline._speculation,
                   pipellm.pipeline._tasks):
        stem = os.path.join(os.path.dirname(module.__file__), module.__name__.rsplit(".", 1)[1])
        source = stem + ".pyx" if os.path.exists(stem + ".pyx") else stem + ".py"
        if not module.__file__.endswith(".py") and os.path.getmtime(source) > os.path.getmtime(module.__file__):
            raise pytest.UsageError(f"{source} is newer than its compiled module {module.__file__}: rebuild it "
                                    "(pip install -e . --no-build-isolation) or delete the .so")

#: tests never wait long: a lost message must show up as a clear error, not a hang
#: (the CUDA simulator runs GPU threads as Python threads: far slower, so it gets longer;
#: on a GPU the kernels' first compile takes seconds)
TIMEOUT = 60.0 if (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
                   or os.environ.get("PIPELLM_TEST_DEVICE") in ("cuda", "cuda-fake", "cuda-driver")) else 5.0


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
