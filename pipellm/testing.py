"""Tools for testing code that uses pipellm, and pipellm itself.

:class:`Adversary` sits on the emulated device's untrusted link and may change, drop,
replay or reorder messages. :class:`IVLedger` watches every ciphertext written into
shared memory and fails if a (key, counter) ever appears with two different ciphertexts.
:func:`check_predictor` is the conformance battery every predictor passes (the built-ins
in pipellm's tests; call it in a plugin's).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from contextlib import contextmanager

from .channel.endpoint import Destination, Message, shared_write_observers

__all__ = ["Adversary", "Destination", "IVLedger", "IVReuseError", "Message", "check_predictor"]


class Adversary:
    """Base class of link adversaries. ``on_message`` sees each message on the link
    (device thread) and returns the messages to deliver now, in order: ``[msg]`` passes
    it on, ``[]`` drops it, ``[msg, msg]`` replays it, and returning a message held from
    an earlier call reorders. ``msg.copy()`` keeps a snapshot that owns its bytes.

    >>> class FlipBit(Adversary):
    ...     def on_message(self, msg):
    ...         msg.payload[0] ^= 1
    ...         return [msg]
    """

    def on_message(self, msg: Message) -> list[Message]:
        return [msg]


class IVReuseError(AssertionError):
    """A (key, counter) was written into shared memory with two different ciphertexts."""


class IVLedger:
    """Records every ciphertext written into shared memory, by (key id, epoch, counter).

    >>> ledger = IVLedger()
    >>> with ledger.watch():
    ...     pass  # run transfers here
    >>> ledger.check()  # raises IVReuseError on any reuse
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[bytes, int, int], bytes] = {}
        self.writes = 0
        self.violations: list[tuple[bytes, int, int]] = []
        self._lock = threading.Lock()

    def _observe(self, msg: Message, key_id: bytes, epoch: int, counter: int) -> None:
        digest = hashlib.sha256(bytes(msg.payload)).digest()
        key = (key_id, epoch, counter)
        with self._lock:
            self.writes += 1
            seen = self.entries.setdefault(key, digest)
            if seen != digest:
                self.violations.append(key)

    @contextmanager
    def watch(self):
        shared_write_observers.append(self._observe)
        try:
            yield self
        finally:
            shared_write_observers.remove(self._observe)

    def check(self) -> None:
        if self.violations:
            raise IVReuseError(f"{len(self.violations)} (key, counter) pairs carried two different "
                               f"ciphertexts, first {self.violations[0]!r}")


def check_predictor(predictor) -> None:
    """Check that a predictor class (or an instance: a clone of it is checked) follows
    the :class:`pipellm.predictors.Predictor` contract; raises ``AssertionError`` naming
    the rule it breaks.

    Constructible from its parameters, which ``get_params`` returns and ``set_params`` and
    ``clone`` honour (an unknown one refused); ``fit`` returns the predictor; ``prepare``
    runs; ``predict(k)`` returns at most ``k`` :class:`~pipellm.predictors.Prediction`
    of (str, offset >= 0, nbytes >= 1), nothing for ``k = 0``, at every step of a trace
    with loads, swap-outs and repeats; two predictors fed the same transfers predict the
    same; ``reset`` forgets what was observed.

    >>> from pipellm.predictors import LayerwisePredictor
    >>> check_predictor(LayerwisePredictor)
    """
    from .errors import ArgumentError
    from .predictors import Prediction, Predictor, TransferEvent, clone
    from .traces import generate

    cls = predictor if isinstance(predictor, type) else type(predictor)
    assert isinstance(cls, type) and issubclass(cls, Predictor), f"{cls!r} is not a Predictor subclass"
    p = cls() if isinstance(predictor, type) else clone(predictor)
    name = cls.__name__
    assert isinstance(p.name, str) and p.name, f"{name}.name must be a non-empty str"
    params = p.get_params()
    assert list(params) == cls._param_names(), f"{name}.get_params() must return its __init__ parameters"
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
                if k in params and v.default is not inspect.Parameter.empty}
    built = cls().get_params()
    assert all(_same({k: built[k]}, {k: v}) for k, v in defaults.items() if not isinstance(v, (list, tuple))), \
        f"{name}() must store each __init__ parameter as given (scikit-learn's rule): {built} against {defaults}"
    twin = clone(p)
    assert type(twin) is cls and twin is not p and _same(twin.get_params(), params), \
        f"clone({name}) must rebuild it from get_params()"
    assert p.set_params(**params) is p, f"{name}.set_params() must return the predictor"
    try:
        p.set_params(no_such_parameter=1)
    except ArgumentError:
        pass
    else:
        raise AssertionError(f"{name}.set_params() must refuse an unknown parameter")
    repr(p)
    trace = generate.mixed(generate.accelerate("opt-13b", tokens=3, batch=1, weight_budget=1 << 20), every=3)
    try:
        assert p.fit([trace]) is p, f"{name}.fit() must return the predictor"
    except ImportError:
        pass  # (fitting needs an optional package that is not installed here)
    p.prepare()
    twin._restore_fitted(p._fitted_state())  # the fitted model, so both predict alike
    twin.prepare()
    events = [TransferEvent(r.region, r.offset, r.nbytes, r.op, r.stream or 0, 0.0)
              for r in trace.records if r.op in ("h2d", "d2h")]
    events.append(TransferEvent("kv", 0, 4096, "d2h"))
    events += [TransferEvent("kv", 0, 4096, "h2d")] * 2
    assert list(p.predict(0)) == [], f"{name}.predict(0) must return nothing"
    for step, event in enumerate(events):
        for k in (1, 4):
            out = p.predict(k)
            assert isinstance(out, list) and len(out) <= k, f"{name}.predict({k}) must return a list of at most {k}"
            for x in out:
                assert isinstance(x, Prediction) and isinstance(x.region, str) and isinstance(x.offset, int) \
                    and isinstance(x.nbytes, int) and x.offset >= 0 and x.nbytes >= 1, \
                    f"{name}.predict() returned {x!r}, not a Prediction(str, offset >= 0, nbytes >= 1)"
        assert [tuple(x) for x in p.predict(4)] == [tuple(x) for x in twin.predict(4)], \
            f"two {name} fed the same transfers predicted differently (step {step})"
        p.observe(event)
        twin.observe(event)
    p.reset()
    fresh = clone(p)
    fresh._restore_fitted(p._fitted_state())
    fresh.prepare()
    assert [tuple(x) for x in p.predict(4)] == [tuple(x) for x in fresh.predict(4)], \
        f"{name}.reset() must forget what was observed"


def _same(a: dict, b: dict) -> bool:
    try:
        return bool(a == b)
    except Exception:  # (array-valued parameters)
        return all(x is y for x, y in zip(a.values(), b.values())) and list(a) == list(b)
