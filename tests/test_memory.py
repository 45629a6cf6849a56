"""Resources: bounce memory within its cap, RSS flat over 10**4 transfers."""

import os

import numpy as np

from conftest import make_pipe


def rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_bounce_memory_stays_within_its_cap_and_rss_is_flat():
    cap = 256 << 10
    with make_pipe("cc", chunk_size=4096, bounce_bytes=cap) as pipe:
        host = np.ones(16 << 10, np.uint8)          # 4 messages per transfer
        region = pipe.register(host)
        back = pipe.register(np.zeros_like(host))

        def burst(n):
            for i in range(n):
                dbuf = pipe.to_device(region)
                if i % 10 == 0:
                    pipe.to_host(dbuf, back)
            pipe.synchronize()

        burst(2_000)  # warm up caches and allocator pools
        before = rss_bytes()
        burst(10_000)
        grown = rss_bytes() - before
        stats = pipe.stats()
        assert stats["bounce"]["cap_bytes"] <= cap
        assert stats["bounce"]["high_water_bytes"] <= stats["bounce"]["cap_bytes"]
        assert stats["transfers_h2d"] == 12_000
        assert grown < 4 << 20, f"RSS grew by {grown} bytes over 10**4 transfers"
