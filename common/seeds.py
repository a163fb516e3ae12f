"""Seeds for every (run seed, round, node, stream): spawned by numpy's SeedSequence, never by arithmetic.

``seed * 1_000_003 + round * 1009 + node`` collides (two (round, node) pairs a multiple of
1009 apart give one seed) and correlates neighbouring streams; SeedSequence hashes the whole
tuple, so distinct tuples give independent streams.
"""

from __future__ import annotations

import numpy as np

BATCHES, DP_NOISE = 0, 1  # the streams a node's round draws from


def round_seed(run_seed: int, server_round: int, node: int, stream: int = BATCHES) -> int:
    """A 63-bit seed (fits torch's and numpy's generators) for one node's ``stream`` in one round."""
    entropy = [int(x) for x in (run_seed, server_round, node, stream)]
    if min(entropy) < 0:
        raise ValueError(f"seed parts must be >= 0, got {entropy}")
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) >> 1
