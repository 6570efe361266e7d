"""Tests of ``dcp_safetensors.checksum``: CRC-32 combination against zlib and an independent reference."""

from __future__ import annotations

import zlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_safetensors.checksum import (
    combine_runs,
    crc32,
    crc32_combine,
    crc32_of_shares,
    crc32_share,
    format_crc32,
)

crc_values = st.integers(0, 2**32 - 1)


# --- crc32 (ISA-L) is zlib's CRC-32, value for value. -------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=5000), start=crc_values, cut=st.integers(0, 5000))
def test_crc32_equals_zlib(data: bytes, start: int, cut: int) -> None:
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)
    cut = min(cut, len(data))
    assert crc32(data[cut:], crc32(data[:cut])) == zlib.crc32(data)


def test_crc32_on_views_and_arrays_at_every_alignment() -> None:
    """The buffers the writer and verifier hand it: unaligned memoryview slices, numpy arrays, MiB sizes."""
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, (3 << 20) + 97, dtype=np.uint8)
    view = memoryview(buf)  # type: ignore[arg-type]
    for lo in (0, 1, 3, 7, 63, 4097):
        for n in (0, 1, 15, 64, 1000, 1 << 20, (3 << 20) - 5000):
            assert crc32(view[lo : lo + n]) == zlib.crc32(view[lo : lo + n]), (lo, n)
    assert crc32(buf) == zlib.crc32(buf.tobytes())
    assert crc32(bytearray(b"abc")) == zlib.crc32(b"abc")


# --- An independent reference: zlib 1.2.11's crc32_combine_, ported line by line. ---------------
# (GF(2) 32x32 matrices as lists of column words; a different algorithm from the module's
# tabulated powers: it squares the one-zero-byte operator once per bit of len2.)


def _gf2_matrix_times(mat: list[int], vec: int) -> int:
    total = 0
    i = 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_matrix_square(mat: list[int]) -> list[int]:
    return [_gf2_matrix_times(mat, mat[n]) for n in range(32)]


def reference_crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    if len2 <= 0:
        # 1.2.11 returned crc1 here; zlib >= 1.2.12 returns crc1 ^ crc2 (equal when crc2 is
        # the CRC of the empty run, 0), as does the module.
        return crc1 ^ crc2
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # operator for one zero bit
    even = _gf2_matrix_square(odd)  # two zero bits
    odd = _gf2_matrix_square(even)  # four zero bits
    while True:
        even = _gf2_matrix_square(odd)
        if len2 & 1:
            crc1 = _gf2_matrix_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_matrix_square(even)
        if len2 & 1:
            crc1 = _gf2_matrix_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


# --- Against zlib on real bytes. ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    expected = zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == expected
    assert reference_crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == expected


@settings(max_examples=200, deadline=None)
@given(buffer=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=12))
def test_combine_runs_over_random_splits(buffer: bytes, cuts: list[int]) -> None:
    # Cut points may repeat (empty runs) or fall at either end.
    bounds = [0, *sorted(min(c, len(buffer)) for c in cuts), len(buffer)]
    runs = [(hi - lo, zlib.crc32(buffer[lo:hi])) for lo, hi in zip(bounds, bounds[1:])]
    assert sum(length for length, _ in runs) == len(buffer)
    assert combine_runs(runs) == zlib.crc32(buffer)


def test_combine_edge_cases() -> None:
    assert combine_runs([]) == zlib.crc32(b"") == 0
    assert combine_runs([(0, 0)]) == 0
    assert crc32_combine(0, zlib.crc32(b"abc"), 3) == zlib.crc32(b"abc")
    assert crc32_combine(zlib.crc32(b"abc"), 0, 0) == zlib.crc32(b"abc")
    for n in (1, 2, 3, 255, 256, 257, 4096, 65537):
        data = bytes(range(256)) * (n // 256 + 1)
        data = data[:n]
        assert crc32_combine(zlib.crc32(b"\xff"), zlib.crc32(data), n) == zlib.crc32(b"\xff" + data), n
        assert crc32_combine(zlib.crc32(data), zlib.crc32(b"\xff"), 1) == zlib.crc32(data + b"\xff"), n


def test_format_crc32() -> None:
    assert format_crc32(0) == "crc32:00000000"
    assert format_crc32(0xFFFFFFFF) == "crc32:ffffffff"
    assert format_crc32(zlib.crc32(b"hello")) == f"crc32:{zlib.crc32(b'hello'):08x}"


# --- Lengths far beyond 2**32, against the reference and algebraic identities. ---------------------


@settings(max_examples=60, deadline=None)
@given(crc1=crc_values, crc2=crc_values, len2=st.integers(0, 2**40))
def test_combine_matches_reference_for_large_lengths(crc1: int, crc2: int, len2: int) -> None:
    assert crc32_combine(crc1, crc2, len2) == reference_crc32_combine(crc1, crc2, len2)


@settings(max_examples=30, deadline=None)
@given(crc1=crc_values, crc2=crc_values, len2=st.integers(2**40, 2**64))
def test_combine_matches_reference_beyond_2_to_40(crc1: int, crc2: int, len2: int) -> None:
    assert crc32_combine(crc1, crc2, len2) == reference_crc32_combine(crc1, crc2, len2)


@settings(max_examples=100, deadline=None)
@given(x=crc_values)
def test_combining_an_empty_run_is_the_identity(x: int) -> None:
    assert crc32_combine(x, zlib.crc32(b""), 0) == x
    assert combine_runs([(0, 0), (0, 0)]) == 0


@settings(max_examples=100, deadline=None)
@given(
    a=crc_values,
    b=crc_values,
    c=crc_values,
    len_b=st.integers(0, 2**40),
    len_c=st.integers(0, 2**40),
)
def test_combine_is_associative(a: int, b: int, c: int, len_b: int, len_c: int) -> None:
    left = crc32_combine(crc32_combine(a, b, len_b), c, len_c)
    right = crc32_combine(a, crc32_combine(b, c, len_c), len_b + len_c)
    assert left == right


def test_zero_runs_beyond_2_to_32_by_repeated_doubling() -> None:
    """CRC of 2**k zero bytes (k up to 40) built by doubling, by the module and by the reference."""
    z_ours = z_ref = zlib.crc32(bytes(1 << 16))
    for k in range(16, 40):
        z_ours = crc32_combine(z_ours, z_ours, 1 << k)
        z_ref = reference_crc32_combine(z_ref, z_ref, 1 << k)
        assert z_ours == z_ref, k
        if k == 20:  # still small enough to check against zlib directly
            assert z_ours == zlib.crc32(bytes(1 << 21))
    # The same 2**40 zero bytes as two runs of 2**39 (built from the reference alone), between
    # a header and a tail: combine_runs agrees with combining the single 2**40 run.
    z39 = zlib.crc32(bytes(1 << 16))
    for k in range(16, 39):
        z39 = reference_crc32_combine(z39, z39, 1 << k)
    prefix, tail = zlib.crc32(b"header"), zlib.crc32(bytes(5))
    whole = crc32_combine(crc32_combine(prefix, z_ours, 1 << 40), tail, 5)
    runs = [(6, prefix), (1 << 39, z39), (1 << 39, z39), (5, tail)]
    assert combine_runs(runs) == whole
    assert combine_runs(runs) != combine_runs([(6, prefix), (1 << 39, z39), (5, tail)])


def test_combine_against_zlib_for_a_file_over_4_gib() -> None:
    """A real stream of 2**32 + 7 bytes through zlib.crc32 (about two seconds)."""
    block = bytes(1 << 26)  # 64 MiB of zeros
    count = 64
    tail = b"\x01\x02\x03\x04\x05\x06\x07"
    length = len(block) * count + len(tail)
    assert length > 2**32
    head = zlib.crc32(b"safetensors header")
    streamed = head
    for _ in range(count):
        streamed = zlib.crc32(block, streamed)
    streamed = zlib.crc32(tail, streamed)
    # The second run's CRC from its pieces, then joined to the first: one combine with len2 > 2**32.
    block_crc = zlib.crc32(block)
    second = combine_runs([(len(block), block_crc)] * count + [(len(tail), zlib.crc32(tail))])
    assert crc32_combine(head, second, length) == streamed
    assert reference_crc32_combine(head, second, length) == streamed


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.lists(st.integers(0, 3000), max_size=40), st.integers(1, 5), st.randoms())
def test_shares_of_interleaved_writers_give_the_file_crc(data, cuts, writers, rnd):
    """crc32_share/crc32_of_shares: runs tiling a file, dealt to writers in any order, give zlib's CRC of the file."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    runs = list(zip(bounds, bounds[1:]))
    rnd.shuffle(runs)
    mine: dict[int, list[tuple[int, int]]] = {w: [] for w in range(writers)}
    for start, end in runs:
        mine[rnd.randrange(writers)].append((start, end))
    shares = [
        crc32_share(
            np.array([zlib.crc32(data[s:e]) for s, e in r], dtype=np.uint32),
            np.array([e - s for s, e in r], dtype=np.int64),
            np.array([len(data) - e for s, e in r], dtype=np.int64),
        )
        for r in mine.values()
    ]
    assert crc32_of_shares(len(data), shares) == zlib.crc32(data)


def test_a_share_misses_a_changed_or_lost_run():
    data = bytes(range(256)) * 64
    runs = [(i, i + 512) for i in range(0, len(data), 512)]

    def share(pieces, payload):
        return crc32_share(
            np.array([zlib.crc32(payload[s:e]) for s, e in pieces], dtype=np.uint32),
            np.array([e - s for s, e in pieces]),
            np.array([len(payload) - e for s, e in pieces]),
        )

    assert crc32_of_shares(len(data), [share(runs, data)]) == zlib.crc32(data)
    assert crc32_of_shares(len(data), [share(runs[:-1], data)]) != zlib.crc32(data)
    flipped = bytearray(data)
    flipped[700] ^= 1
    assert crc32_of_shares(len(data), [share(runs, bytes(flipped))]) != zlib.crc32(data)
    # 2**40 zero bytes after a run: the shift is O(log n), not O(n).
    assert crc32_share(np.array([zlib.crc32(b"x")]), np.array([1]), np.array([1 << 40])) != 0
