"""Resources: bounce memory within its cap; RSS and open file descriptors flat over 10**5
transfers in every mode."""

import gc
import os

import numpy as np
import pytest

import pipellm
from conftest import make_pipe


def rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", ["plain", "cc", "pipellm"])
def test_memory_and_descriptors_stay_flat_over_a_hundred_thousand_transfers(mode):
    cap = 256 << 10
    with make_pipe(mode, chunk_size=4096, bounce_bytes=cap, rotate_after=1000) as pipe:
        # protected regions of 1-3 chunks (the pipellm mode speculates on them), one back
        regions = [pipe.register(pipellm.array(np.full(4096 * (1 + i % 3), i, np.uint8)), name=f"r{i}")
                   for i in range(4)]
        back = pipe.register(np.zeros(4096, np.uint8))

        def burst(n):
            for i in range(n):
                dbuf = pipe.to_device(regions[i % 4])
                if i % 10 == 0:
                    pipe.to_host(dbuf, back, nbytes=4096)
                if i % 100 == 0:
                    pipe.synchronize()
            pipe.synchronize()

        burst(10_000)  # warm up caches and allocator pools
        gc.collect()
        rss, fds = rss_bytes(), open_fds()
        burst(100_000)
        gc.collect()
        grown = rss_bytes() - rss
        stats = pipe.stats()
        assert stats["transfers_h2d"] == 110_000 and stats["transfers_d2h"] == 11_000
        assert np.array_equal(back.array, regions[99_990 % 4].array[:4096])  # the last copy back
        if mode != "plain":  # plain has no bounce memory and no keys
            assert stats["bounce"]["cap_bytes"] <= cap
            assert stats["bounce"]["high_water_bytes"] <= stats["bounce"]["cap_bytes"]
            assert stats["key_rotations"] > 100  # the keys turned over many times meanwhile
        assert grown < 4 << 20, f"RSS grew by {grown} bytes over 10**5 transfers"
        assert open_fds() <= fds
