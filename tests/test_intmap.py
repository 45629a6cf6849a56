"""The predictors' integer tables (pipellm/_ext/intmap): keys as splitmix64's finalizer
gives them, and a table that behaves as a dict through growth."""
import random

import pytest

from pipellm._ext.intmap import IntMap, doubled, int64s, py_key, py_pair

M64, M63 = (1 << 64) - 1, (1 << 63) - 1


def splitmix_key(a, b):
    """The key written out with Python's integers (an independent computation)."""
    x = ((a & M64) * 0x9E3779B97F4A7C15 + (b & M64)) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    x = (x ^ (x >> 31)) & M63
    return x or 1


def test_keys_are_splitmix64_of_the_pair_and_never_zero():
    rnd = random.Random(7)
    values = [0, 1, -1, 2**62, -(2**63), 2**63 - 1] + [rnd.randint(-(2**63), 2**63 - 1) for _ in range(2000)]
    for a, b in zip(values, reversed(values)):
        assert py_key(a, b) == splitmix_key(a, b)
        assert py_pair(a, b) == splitmix_key(splitmix_key(0, a), b)
    assert py_key(0, 0) == 1   # (the finalizer maps (0, 0) to 0, which means "empty")
    assert 0 < py_key(-5, 3) <= M63


def test_table_matches_a_dict_through_growth():
    rnd = random.Random(3)
    table, model = IntMap(2), {}
    keys = [py_key(i, 0) for i in range(3000)]
    for _ in range(20000):
        k = rnd.choice(keys)
        op = rnd.random()
        if op < 0.4:
            v = rnd.randint(-(2**40), 2**40)
            table.put(k, v)
            model[k] = v
        elif op < 0.7:
            d = rnd.randint(-5, 5)
            model[k] = model.get(k, 0) + d
            assert table.add(k, d) == model[k]
        else:
            assert table.get(k, -7) == model.get(k, -7)
    assert table.size == len(model) and 2 * table.size <= table.mask + 1   # at most half full
    assert all(table.get(k, -7) == v for k, v in model.items())


@pytest.mark.parametrize("capacity", [0, 1, 3, 48])
def test_capacity_must_be_a_power_of_two(capacity):
    with pytest.raises(ValueError, match="power of two"):
        IntMap(capacity)


def test_rows_are_numpy_for_compiled_callers_and_lists_for_plain_ones():
    compiled, plain = int64s(3, True), int64s(3, False)
    assert compiled.dtype.itemsize == 8 and list(compiled) == [0, 0, 0] and plain == [0, 0, 0]
    compiled[0], plain[0] = 5, 5
    assert list(doubled(compiled)) == [5, 0, 0, 0, 0, 0] and doubled(plain) == [5, 0, 0, 0, 0, 0]
