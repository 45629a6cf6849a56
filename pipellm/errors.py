"""Exceptions raised by pipellm.

Every exception the library raises derives from :class:`PipellmError`. Bad arguments
raise :class:`ArgumentError` or :class:`ArgumentTypeError`, which are also
``ValueError`` / ``TypeError``, so callers that already catch those keep working.
"""

from __future__ import annotations


class PipellmError(Exception):
    """Base class of every pipellm exception."""


class ArgumentError(PipellmError, ValueError):
    """An argument has the right type but a wrong value (size, offset, name...)."""


class ArgumentTypeError(PipellmError, TypeError):
    """An argument has the wrong type (or dtype, or memory layout)."""


class UnknownRegionError(ArgumentError):
    """A region that is not registered with this pipeline (or was unregistered)."""


class IntegrityError(PipellmError):
    """A message failed authentication or arrived out of order.

    Nothing from the message reached its destination and the channel is closed: every
    later use raises :class:`ChannelClosedError`. The message names the direction and
    counter that failed, never why the tag did not match.
    """


class ChannelClosedError(PipellmError):
    """The confidential channel (or the pipeline, the device, a bounce pool) is closed."""


class ForkedError(ChannelClosedError):
    """The object was made before ``os.fork()``: in the child its threads do not exist.
    Make a new one in the child (the parent's goes on unharmed)."""


class UnknownSessionError(ChannelClosedError):
    """A device was asked for a channel session it does not have open (never opened, or
    closed since)."""


class DeviceError(PipellmError):
    """The device refused or failed an operation for a reason other than integrity."""


class DeviceUnavailableError(DeviceError):
    """A device kind that cannot be opened here; the message says why."""


class TransferTimeoutError(PipellmError, TimeoutError):
    """A wait ran past its timeout (a lost message, a stalled device, a full pool)."""


class UsageError(PipellmError, RuntimeError):
    """An operation the object's state does not allow now (a lock released by a thread
    that does not hold it, a second timeline recorded at once)."""


class KeyExhaustedError(PipellmError):
    """No more key epochs can be derived for a direction (after 2**32 rotations)."""


class TraceError(ArgumentError):
    """A malformed trace; the message names the file and line."""


class NotFittedError(ArgumentError, AttributeError):
    """The learned predictor has no model: fit() it or load() one."""


class PinningWarning(UserWarning):
    """Bounce buffers could not be pinned (mlock refused); transfers go on unpinned."""


class DepthWarning(UserWarning):
    """A predicted transfer is larger than the speculation depth (``depth_bytes``): it is
    never encrypted ahead; ``stats()["oversized_predictions"]`` counts such plans."""


class PredictorWarning(UserWarning):
    """A predictor raised while observing or predicting; the transfer it planned for goes
    on without speculation (encrypted on demand), and ``stats()["predictor_errors"]`` counts it."""
