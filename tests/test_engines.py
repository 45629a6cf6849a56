"""Every mode's engine provides the interface a Pipeline drives (ModeEngine), and the
parts the interface promises behave alike across modes."""
import inspect

import numpy as np
import pytest

import pipellm
from pipellm.pipeline.engines import ModeEngine


def members():
    return [name for name in ModeEngine.__dict__ if not name.startswith("_")] + \
        list(ModeEngine.__annotations__)


@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm"])
def test_every_engine_provides_the_interface(mode):
    with pipellm.Pipeline(device="emulated", mode=mode) as pipe:
        engine = pipe._engine
        assert isinstance(engine, ModeEngine)
        for name in members():
            assert hasattr(engine, name), f"{type(engine).__name__} lacks {name}"
        for name, member in vars(ModeEngine).items():
            if inspect.isfunction(member) and not name.startswith("_"):
                ours = inspect.signature(getattr(type(engine), name))
                assert list(ours.parameters)[:len(inspect.signature(member).parameters)] == \
                    list(inspect.signature(member).parameters), (type(engine).__name__, name)
        assert engine.mode == mode
        assert (engine.session is None) == (mode == "plain")
        region = pipe.register(pipellm.array(np.arange(300_000, dtype=np.uint8)))
        pipe.to_device(region)
        assert engine.wait_speculation(5.0) is True
        pipe.synchronize()
        assert engine.failure() is None and engine.failure_reported is False
        stats = engine.stats()
        assert stats["transfers_h2d"] == 1 and stats["bytes_h2d"] == 300_000


def test_an_object_without_the_interface_is_not_an_engine():
    class Half:
        mode = "half"

        def to_device(self, *args):
            pass
    assert not isinstance(Half(), ModeEngine)
