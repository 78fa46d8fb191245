"""near_duplicate_groups: correctness against brute force, transitivity, missing values, scale."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lensmith.neardup import band_masks, hamming_distance, near_duplicate_groups


def hexes(values: np.ndarray) -> list[str]:
    return [f"{int(v):016x}" for v in values]


def flip_bits(value: int, n_bits: int, rng: np.random.Generator) -> int:
    for bit in rng.choice(64, size=n_bits, replace=False):
        value ^= 1 << int(bit)
    return value


def brute_force_groups(phashes: list[str], max_distance: int) -> np.ndarray:
    n = len(phashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if hamming_distance(phashes[i], phashes[j]) <= max_distance:
                parent[find(i)] = find(j)
    roots = [find(i) for i in range(n)]
    first: dict[int, int] = {}
    return np.array([first.setdefault(r, len(first)) for r in roots])


def clustered_hashes(rng: np.random.Generator, n_clusters: int, per_cluster: int, spread: int) -> list[str]:
    out = []
    for _ in range(n_clusters):
        base = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        out.extend(f"{flip_bits(base, int(rng.integers(0, spread + 1)), rng):016x}" for _ in range(per_cluster))
    rng.shuffle(out)
    return out


def test_bands_cover_all_64_bits_exactly_once():
    for d in (0, 1, 4, 7, 63, 100):
        covered = 0
        for shift, mask in band_masks(d):
            band = int(mask) << shift
            assert covered & band == 0
            covered |= band
        assert covered == 2**64 - 1


@pytest.mark.parametrize("max_distance", [0, 2, 4, 8])
def test_matches_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    phashes = clustered_hashes(rng, n_clusters=40, per_cluster=6, spread=6)
    assert np.array_equal(near_duplicate_groups(phashes, max_distance), brute_force_groups(phashes, max_distance))


def test_transitive_chain_is_one_group_and_far_hash_is_not():
    base = 0x0F0F_0F0F_0F0F_0F0F
    chain = [base, base ^ 0b1111, base ^ 0b1111_1111, base ^ 0b1111_1111_1111]  # each step 4 bits away
    far = base ^ 0xFFFF_FFFF_0000_0000
    groups = near_duplicate_groups([f"{v:016x}" for v in [*chain, far]], max_distance=4)
    assert groups.tolist() == [0, 0, 0, 0, 1]


def test_exact_duplicates_and_distance_zero():
    phashes = ["00000000000000ff", "00000000000000ff", "00000000000000fe", "ffffffffffffffff"]
    assert near_duplicate_groups(phashes, 0).tolist() == [0, 0, 1, 2]
    assert near_duplicate_groups(phashes, 1).tolist() == [0, 0, 0, 1]


def test_missing_hashes_are_singletons_and_bad_hashes_raise():
    groups = near_duplicate_groups(["00000000000000ff", None, float("nan"), "00000000000000ff", ""], 4)
    assert groups.tolist() == [0, 1, 2, 0, 3]
    with pytest.raises(ValueError, match="row 1"):
        near_duplicate_groups(["00000000000000ff", "xyz"], 4)
    with pytest.raises(ValueError, match="64-bit"):
        near_duplicate_groups(["ff"], 4)


def test_empty_input():
    assert near_duplicate_groups([], 4).shape == (0,)


def test_scales_to_100k_rows():
    rng = np.random.default_rng(0)
    unique = rng.integers(0, 2**63, size=95_000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    near = np.array([flip_bits(int(v), 3, rng) for v in unique[:5_000]], dtype=np.uint64)
    phashes = hexes(np.concatenate([unique, near]))
    start = time.perf_counter()
    groups = near_duplicate_groups(phashes, 4)
    seconds = time.perf_counter() - start
    assert seconds < 5, f"took {seconds:.1f}s"
    assert len(np.unique(groups)) == 95_000
    assert np.array_equal(groups[95_000:], groups[:5_000])
