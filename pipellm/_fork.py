"""Fork detection: a forked child inherits pipelines and devices but not their threads,
so objects created before a fork refuse to be used in the child (instead of hanging)."""

from __future__ import annotations

import os

generation = 0


def _after_fork_in_child() -> None:
    global generation
    generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def check(created_in: int, what: str) -> None:
    from .errors import ForkedError

    if created_in != generation:
        raise ForkedError(f"this {what} was created before os.fork(); its threads do not exist in the "
                                 f"child process: create a new one in the child")
