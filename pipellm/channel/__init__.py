"""The confidential channel: key agreement, per-direction keys, sealing and opening.

The protocol (header/AAD layout, IV derivation, rotation rule) is defined once, in
:mod:`pipellm.channel.protocol`; the host and every device import it from there.
"""

from .endpoint import Destination, Message, Opener, Sealer, Ticket, publish, shared_write_observers
from .keys import EpochKey, KeyAgreement, SessionKeys
from .receiver import H2D_KINDS, Commit, Receiver
from .protocol import DEFAULT_ROTATE_AFTER, HEADER_BYTES, TAG_BYTES, Direction, Header, Kind

__all__ = [
    "DEFAULT_ROTATE_AFTER", "HEADER_BYTES", "TAG_BYTES", "Destination", "Direction", "EpochKey",
    "Header", "KeyAgreement", "Kind", "Message", "Opener", "Sealer", "SessionKeys", "Ticket",
    "publish", "shared_write_observers", "H2D_KINDS", "Commit", "Receiver",
]
