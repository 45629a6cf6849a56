"""An adversary on the emulated device's untrusted link, in both directions and every
mode that encrypts (cc; pipellm in strict and in window IV order).

Every attack is refused with IntegrityError (or, for a message dropped at the end, a
clear timeout), the destination keeps what it held, and the channel stays closed.
In pipellm mode the attacked host-to-device message is speculative data (a SPEC message
sent on a hit), the path that differs from cc.
"""

import os

import numpy as np
import pytest

import pipellm
from pipellm import ChannelClosedError, IntegrityError, TransferTimeoutError
from pipellm.testing import Adversary
from conftest import make_pipe

N = 3000  # bytes per transfer: one message (chunk_size 4096)
#: the device the suite attacks: the emulated one, or (tests/test_kernels.py runs the suite
#: again under the CUDA simulator) the cuda device, whose GPU kernels do the refusing
DEVICE = os.environ.get("PIPELLM_TEST_DEVICE", "emulated")
#: "cuda-fake": the cuda device's driver path on the fake driver (tests/test_gpupath.py);
#: "cuda-driver": the driver path on a GPU (benchmarks/gpu_check.sh)
_OPEN = {"cuda-fake": ("cuda", {"path": "driver", "driver": "fake"}), "cuda-driver": ("cuda", {"path": "driver"})}


def open_dev(**kw):
    kind, extra = _OPEN.get(DEVICE, (DEVICE, {}))
    return pipellm.open_device(kind, **extra, **kw)


def flip(index):
    def attack(msg, adv):
        msg.payload[index] ^= 0x01
        return [msg]
    return attack


def flip_iv(msg, adv):
    msg.iv = bytes([msg.iv[0] ^ 1]) + bytes(msg.iv[1:])
    return [msg]


def flip_aad(byte):
    def attack(msg, adv):
        msg.aad[byte] ^= 0x01
        return [msg]
    return attack


def truncate(msg, adv):
    msg.payload = msg.payload[:-1]
    return [msg]


def extend(msg, adv):
    msg.payload = memoryview(bytes(msg.payload) + b"\0")
    return [msg]


def redirect(msg, adv):
    buffer, offset, length = msg.dst
    msg.dst = (adv.other, offset, length)
    return [msg]


def replay_old(msg, adv):
    return [msg, adv.old]           # the current message lands; the stale one must not


def replay_other_direction(msg, adv):
    return [msg, adv.cross]         # a genuine message of the other direction, delivered here


def replay_twice(msg, adv):
    return [msg, msg]


def reorder(msg, adv):
    if adv.held is None:
        adv.held = msg
        adv.armed = True             # stay armed for the next message
        return []
    return [msg, adv.held]


def other_session(msg, adv):
    return [adv.foreign]


ATTACKS = {
    "flip-ciphertext": flip(0),
    "flip-tag": flip(-1),
    "flip-iv": flip_iv,
    "flip-aad-counter": flip_aad(23),
    "flip-aad-offset": flip_aad(39),
    "flip-aad-session": flip_aad(11),
    "truncate": truncate,
    "extend": extend,
    "redirect": redirect,
    "replay-old": replay_old,
    "replay-twice": replay_twice,
    "replay-other-direction": replay_other_direction,
    "reorder": reorder,
    "other-session": other_session,
}


MODES = ["cc", "pipellm", "pipellm-window"]


def open_pipe(mode, dev, **kw):
    """A pipeline in one of ``MODES`` that speculates on anything (no size floor)."""
    if mode == "cc":
        return make_pipe(device=dev, **kw)
    window = {"iv_order": "window"} if mode == "pipellm-window" else {}
    return make_pipe("pipellm", device=dev, min_speculative_bytes=0, **window, **kw)


def _kind(msg):
    from pipellm.channel.protocol import unpack_header
    header = unpack_header(msg.aad)
    return None if header is None else header.kind


class Armed(Adversary):
    """Passes messages on until armed; then applies ``attack`` once to one direction
    (to the first message of kind ``kind`` where one is given)."""

    def __init__(self, direction, attack, kind=None):
        self.direction, self.attack, self.kind = direction, attack, kind
        self.armed = False
        self.old = self.held = self.foreign = self.other = self.cross = None
        self.attacked = 0

    def on_message(self, msg):
        if msg.direction == self.direction and self.old is None:
            self.old = msg.copy()
        if msg.direction != self.direction and self.cross is None:
            self.cross = msg.copy()
        if not self.armed or msg.direction != self.direction:
            return [msg]
        if self.held is None and self.kind is not None and _kind(msg) != self.kind:
            return [msg]
        self.armed = False
        self.attacked += 1
        return self.attack(msg, self)


def capture_foreign(dev, adv, direction):
    """A genuine message of another session on the same device."""
    with make_pipe(device=dev) as other:
        region = other.register(np.full(N, 9, np.uint8))
        adv.armed, adv.old = False, None
        dbuf = other.to_device(region)
        other.synchronize()
        if direction == "d2h":
            other.to_host(dbuf, other.register(np.zeros(N, np.uint8))).wait()
        adv.foreign = adv.old
        adv.old = None


def warm_up(pipe, mode, regions):
    """Transfer ``regions`` in a cycle until the pipeline has the first one encrypted ahead."""
    for _ in range(1 if mode == "cc" else 3):
        for r in regions:
            pipe.to_device(r)
        pipe.synchronize()
        if mode != "cc":
            pipe.wait_speculation()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_h2d_attack_is_refused(attack, mode):
    from pipellm.channel import Kind
    adv = Armed("h2d", ATTACKS[attack], Kind.DATA if mode == "cc" else Kind.SPEC)
    with open_dev(adversary=adv) as dev:
        if attack == "other-session":
            capture_foreign(dev, adv, "h2d")
        pipe = open_pipe(mode, dev)
        # library-owned memory (write-protected), which the pipeline encrypts ahead
        a, b = pipellm.array(np.full(N, 1, np.uint8)), pipellm.array(np.full(N, 2, np.uint8))
        ra, rb = pipe.register(a), pipe.register(b)
        warm_up(pipe, mode, [ra, rb])               # legit: their device copies hold 1s and 2s
        if attack == "replay-other-direction":     # a device-to-host message to replay
            pipe.to_host(rb.device_buffer, pipe.register(np.zeros(N, np.uint8))).wait()
            if mode != "cc":
                pipe.wait_speculation()
        target = dev.alloc(N)                       # holds 0s
        adv.other = rb.device_buffer.id
        adv.armed = True
        pipe.to_device(ra, dst=target)            # attacked (in pipellm mode a hit): must not land
        if attack == "reorder":
            pipe.to_device(rb)
        # (the cuda device verifies tags per transfer, so a malformed speculative message
        # may be refused for its header before its tag is checked: refused either way)
        with pytest.raises(IntegrityError, match="h2d (speculative )?message"):
            pipe.synchronize()
        assert adv.attacked, "the attack never ran: nothing of the expected kind was sent"
        # a replay comes after the genuine message, which lands; the stale copy must not
        expected = 1 if attack.startswith("replay") else 0
        assert (dev.read(target) == expected).all()
        assert (dev.read(ra.device_buffer) == 1).all() and (dev.read(rb.device_buffer) == 2).all()
        with pytest.raises(ChannelClosedError):
            pipe.to_device(ra)
        pipe.close()
        # a new session on the same device works
        with open_pipe(mode, dev) as fresh:
            dbuf = fresh.to_device(fresh.register(np.full(N, 5, np.uint8)))
            fresh.synchronize()
            assert (dev.read(dbuf) == 5).all()


def test_window_order_refuses_a_transfer_held_back_past_a_later_one_to_the_same_place():
    """Every message is fresh and inside the IV window, so only the request number in the
    header stops the older bytes from landing over the newer ones (protocol version 2)."""
    class HoldFirst(Adversary):
        armed, held = False, None

        def on_message(self, msg):
            if not self.armed or msg.direction != "h2d":
                return [msg]
            if self.held is None:
                self.held = msg.copy()
                return []
            self.armed = False
            return [msg, self.held]

    adv = HoldFirst()
    with open_dev(adversary=adv) as dev:
        pipe = open_pipe("pipellm-window", dev)
        a = np.full(N, 1, np.uint8)
        region = pipe.register(a)
        dbuf = pipe.to_device(region)
        pipe.synchronize()
        a[:] = 2
        adv.armed = True
        pipe.to_device(region)       # held back by the adversary
        a[:] = 3
        pipe.to_device(region)       # delivered, then the held one
        with pytest.raises(IntegrityError, match="arrived after request"):
            pipe.synchronize()
        assert adv.held is not None and not adv.armed
        assert (dev.read(dbuf) == 3).all()
        with pytest.raises(ChannelClosedError):
            pipe.to_device(region)
        pipe.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_d2h_attack_is_refused(attack, mode):
    adv = Armed("d2h", ATTACKS[attack])
    with open_dev(adversary=adv) as dev:
        if attack == "other-session":
            capture_foreign(dev, adv, "d2h")
        pipe = open_pipe(mode, dev)
        src = pipe.to_device(pipe.register(np.full(N, 1, np.uint8)))
        host, other = np.zeros(N, np.uint8), np.zeros(N, np.uint8)
        rh, ro = pipe.register(host), pipe.register(other)
        pipe.to_host(src, rh).wait()              # legit
        assert (host == 1).all()
        adv.other = ro.id
        host[:] = 7
        adv.armed = True
        transfer = pipe.to_host(src, rh)
        # a replayed copy waits in the bounce buffer: the next transfer is refused
        follow = pipe.to_host(src, ro)
        with pytest.raises(IntegrityError, match="d2h message"):
            transfer.wait()
            follow.wait()
        expected = 1 if attack.startswith("replay") else 7
        assert (host == expected).all() and (other == 0).all()
        with pytest.raises(ChannelClosedError):
            pipe.to_host(src, rh)
        pipe.close()
        # a new session on the same device works
        with open_pipe(mode, dev) as fresh:
            back = fresh.register(np.zeros(N, np.uint8))
            fresh.to_host(fresh.to_device(fresh.register(np.full(N, 5, np.uint8))), back).wait()
            assert (back.array == 5).all()


def test_h2d_drop_last_message_is_refused_at_synchronize():
    adv = Armed("h2d", lambda msg, adv: [])
    with open_dev(adversary=adv) as dev:
        pipe = make_pipe(device=dev)
        region = pipe.register(np.full(N, 4, np.uint8))
        adv.armed = True
        dbuf = pipe.to_device(region)
        with pytest.raises(IntegrityError, match="message 0 .*never arrived"):
            pipe.synchronize()                    # the host relies on it: not a wait, a refusal
        with pytest.raises(ChannelClosedError):
            pipe.to_device(region)
        assert not dev.read(dbuf).any()
        pipe.close()


def test_d2h_drop_is_refused():
    adv = Armed("d2h", lambda msg, adv: [])
    with open_dev(adversary=adv) as dev:
        pipe = make_pipe(device=dev)
        src = pipe.to_device(pipe.register(np.full(N, 1, np.uint8)))
        host = np.full(N, 6, np.uint8)
        adv.armed = True
        with pytest.raises(IntegrityError, match="never arrived"):
            pipe.to_host(src, pipe.register(host)).wait()
        assert (host == 6).all()
        pipe.close()


def test_unreported_failure_is_raised_by_close():
    adv = Armed("h2d", flip(0))
    with open_dev(adversary=adv) as dev:
        pipe = make_pipe(device=dev)
        adv.armed = True
        pipe.to_device(pipe.register(np.ones(N, np.uint8)))
        with pytest.raises(IntegrityError):
            pipe.close()        # never silently dropped
        assert pipe.closed
        pipe.close()


class OnCommands(Adversary):
    """Attacks the first GO or SKIP command (speculative mode) once armed."""

    def __init__(self, kind, attack):
        self.kind, self.attack = kind, attack
        self.armed, self.seen = False, []

    def on_message(self, msg):
        if msg.direction != "h2d" or _kind(msg) != self.kind:
            return [msg]
        self.seen.append(msg.copy())
        if not self.armed:
            return [msg]
        self.armed = False
        return self.attack(msg, self)


def go_replayed(msg, adv):
    return [msg, adv.seen[0]] if len(adv.seen) > 1 else [msg, msg]


def go_redirected(msg, adv):
    msg.payload[3] ^= 0x01   # the destination buffer id inside the encrypted GO body
    return [msg]


def go_dropped(msg, adv):
    return []


def skip_forged(msg, adv):
    msg.payload[-1] ^= 0x01  # its tag
    return [msg]


def skip_replayed(msg, adv):
    return [msg, msg]


@pytest.mark.parametrize("kind,attack", [("GO", go_replayed), ("GO", go_redirected), ("GO", go_dropped),
                                         ("SKIP", skip_forged), ("SKIP", skip_replayed)],
                         ids=["go-replayed", "go-redirected", "go-dropped", "skip-forged", "skip-replayed"])
def test_command_attacks_are_refused(kind, attack):
    """The speculative mode's commands (GO: where speculative data lands; SKIP: the NOP)
    forged, replayed, redirected or dropped: refused, nothing lands, the channel closes."""
    from pipellm.channel import Kind
    adv = OnCommands(Kind[kind], attack)
    with open_dev(adversary=adv) as dev:
        pipe = make_pipe("pipellm", device=dev, min_speculative_bytes=0, depth_messages=48,
                         timeout=1 if DEVICE == "emulated" else 60)  # the simulator is slow
        regions = [pipe.register(pipellm.array(np.full(N, i, np.uint8)), name=f"l{i}") for i in range(4)]
        for _ in range(2):
            for r in regions:
                pipe.to_device(r)
                pipe.wait_speculation()
        pipe.synchronize()
        before = [dev.read(r.device_buffer).copy() for r in regions]
        for r in regions:
            r.array[:] = 100 + int(r.array[0])    # new bytes: any stale or misdirected landing shows
        adv.armed = True
        with pytest.raises((IntegrityError, TransferTimeoutError)):
            if kind == "SKIP":
                pipe.to_device(regions[2])          # the queue holds 0 and 1 ahead of 2: a SKIP
                pipe.to_device(regions[3])
            else:
                pipe.to_device(regions[0])          # a hit: GO + speculative data
                pipe.to_device(regions[1])
            pipe.synchronize()
            pipe.to_device(regions[2])
            pipe.synchronize()
        after = [dev.read(r.device_buffer) for r in regions]
        for i, (b, a) in enumerate(zip(before, after)):
            # every region holds either its old bytes or, for a message that authenticated
            # before the attack, its genuine new bytes: never anything else
            assert np.array_equal(a, b) or np.array_equal(a, regions[i]._array), i
        assert adv.seen
        with pytest.raises(pipellm.PipellmError):
            pipe.to_device(regions[0])
            pipe.synchronize()
        try:
            pipe.close()
        except pipellm.PipellmError:
            pass
