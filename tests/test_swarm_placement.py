"""Placement of ``--blocks auto`` servers: hand-computed cases of the pure placement rules."""

from __future__ import annotations

import itertools

import pytest

from fedswarm.server.swarm.placement import Announced, Move, block_strengths, choose_span, should_move


def s(address: str, start: int, end: int, throughput: float = 10.0) -> Announced:
    return Announced(address, start, end, throughput)


def test_strengths_sum_the_servers_holding_each_block_and_clip_to_the_model():
    servers = [s("a:1", 0, 2, 10.0), s("b:1", 1, 9, 2.5), s("c:1", 0, 4, 0.0)]  # zero throughput counts nothing
    assert block_strengths(servers, 4) == [10.0, 12.5, 2.5, 2.5]


def test_empty_swarm_takes_the_first_blocks():
    assert choose_span([], 4, 2, 1.0) == (0, 2)


@pytest.mark.parametrize(
    ("servers", "num_blocks", "expected"),
    [
        ([s("a:1", 0, 2)], 4, (2, 4)),  # the gap at the end
        ([s("a:1", 2, 4)], 4, (0, 2)),  # the gap at the start
        ([s("a:1", 0, 2), s("b:1", 4, 6)], 6, (2, 4)),  # a gap in the middle
        ([s("a:1", 0, 3), s("b:1", 4, 6, 5.0)], 6, (3, 5)),  # a one-block gap, covered with its weaker neighbour
    ],
)
def test_a_gap_is_filled(servers, num_blocks, expected):
    assert choose_span(servers, num_blocks, 2, 10.0) == expected


def test_the_weakest_blocks_are_strengthened_first():
    # strengths [30, 10, 5, 20]: one block of help goes to block 2; two blocks to 1:3 (min 15 vs 10 at 2:4)
    servers = [s("a:1", 0, 1, 20.0), s("b:1", 0, 2, 10.0), s("c:1", 2, 3, 5.0), s("d:1", 3, 4, 20.0)]
    assert block_strengths(servers, 4) == [30.0, 10.0, 5.0, 20.0]
    assert choose_span(servers, 4, 1, 10.0) == (2, 3)
    assert choose_span(servers, 4, 2, 10.0) == (1, 3)


def test_equal_candidates_resolve_to_the_lowest_start_whatever_the_listing_order():
    # strengths [10, 4, 4, 10]: blocks 1 and 2 are equally weak; every server must pick block 1
    servers = [s("a:1", 0, 1), s("b:1", 1, 3, 4.0), s("c:1", 3, 4)]
    for order in itertools.permutations(servers):
        assert choose_span(list(order), 4, 1, 1.0) == (1, 2)
    # a full second replica: every two-block span leaves strengths {10, 10, 20, 20}
    assert choose_span([s("a:1", 0, 2), s("b:1", 2, 4)], 4, 2, 10.0) == (0, 2)


def test_more_blocks_than_the_model_has_clamps_to_the_whole_model():
    assert choose_span([s("a:1", 0, 2)], 4, 10, 1.0) == (0, 4)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="length"):
        choose_span([], 4, 0, 1.0)
    with pytest.raises(ValueError, match="num_blocks"):
        choose_span([], 0, 1, 1.0)
    with pytest.raises(ValueError, match="min_gain"):
        should_move([], s("me:1", 0, 2), 4, min_gain=0.5)


def test_hysteresis_a_small_gain_does_not_move_a_large_one_does():
    # others: a full replica (10 on every block) and b on 0:2 (10); me on 0:2 too.
    others = [s("a:1", 0, 4, 10.0), s("b:1", 0, 2, 10.0)]
    weak = s("a:5", 0, 2, 1.0)  # now [21, 21, 10, 10]; at 2:4 [20, 20, 11, 11]: min 10 -> 11, x1.1
    assert should_move(others, weak, 4, min_gain=1.5) is None
    assert should_move(others, weak, 4, min_gain=1.05) == Move(2, 4, 0)
    strong = s("a:5", 0, 2, 10.0)  # now [30, 30, 10, 10]; at 2:4 [20, 20, 20, 20]: min 10 -> 20, x2
    assert should_move(others, strong, 4, min_gain=1.5) == Move(2, 4, 0)
    assert should_move(others, strong, 4, min_gain=2.5) is None
    # b gains as much by moving; of the two, the lower address is asked first
    assert should_move(others, s("z:1", 0, 2, 10.0), 4, min_gain=1.5) == Move(2, 4, 1)


def test_a_server_in_its_best_place_stays():
    servers = [s("a:1", 0, 2), s("b:1", 2, 4)]
    assert should_move(servers, s("c:1", 0, 2), 4) is None
    assert should_move(servers + [s("c:1", 0, 2)], s("b:1", 2, 4), 4) is None  # moving would open a gap


def test_a_server_alone_on_its_blocks_never_leaves_them_for_another_gap():
    # blocks 2:4 have nobody; moving a:1 there would open 0:2 instead (gaps 2 -> 2)
    assert should_move([], s("a:1", 0, 2), 4) is None


def test_a_killed_server_leaves_a_gap_that_one_server_fills():
    # a:1 [0:2], b:1 [2:4], c:1 [0:2]; b:1 is killed
    survivors = [s("a:1", 0, 2), s("c:1", 0, 2)]
    assert choose_span(survivors, 4, 2, 10.0) == (2, 4)  # a newcomer goes to the gap
    first, second = (should_move(survivors, me, 4) for me in survivors)
    assert first == Move(2, 4, 0)  # both would close it; the lower address moves first ...
    assert second == Move(2, 4, 1)  # ... the other only if the gap is still open at its next check
    after = [s("a:1", 2, 4), s("c:1", 0, 2)]
    assert should_move(after, s("c:1", 0, 2), 4) is None  # and once it moved, nobody else does


def test_the_listed_entry_of_this_server_is_replaced_by_its_actual_span():
    listed = [s("a:1", 0, 2), s("me:1", 0, 2)]  # the registry still lists me on 0:2
    assert should_move(listed, s("me:1", 2, 4), 4) is None  # but I already moved to the gap
