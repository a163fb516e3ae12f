from fedswarm.common.seeds import BATCHES, DP_NOISE, round_seed


def test_seeds_do_not_collide_where_arithmetic_did():
    # the old ``seed * 1_000_003 + round * 1009 + node`` gave (round 1, node 0) and (round 0, node 1009) one seed
    assert 1 * 1009 + 0 == 0 * 1009 + 1009
    assert round_seed(0, 1, 0) != round_seed(0, 0, 1009)
    seeds = {round_seed(s, r, n) for s in range(3) for r in range(1, 30) for n in range(40)}
    assert len(seeds) == 3 * 29 * 40


def test_seeds_are_reproducible_per_stream_and_fit_63_bits():
    assert round_seed(7, 2, 5) == round_seed(7, 2, 5, BATCHES)
    assert round_seed(7, 2, 5, BATCHES) != round_seed(7, 2, 5, DP_NOISE)
    assert 0 <= round_seed(2**40, 10**6, 2**63) < 2**63  # a deployed node's 64-bit id is a valid part
