"""Route planning and swarm selection: pure functions, hand-checked answers."""

from __future__ import annotations

import pytest

from fedswarm.client.swarm.discovery import choose_swarm
from fedswarm.client.swarm.routing import Hop, NoRouteError, Peer, missing_blocks, plan_route
from fedswarm.common.errors import FedswarmError
from fedswarm.protos import swarm_pb2


def test_single_chain_is_the_route():
    peers = [Peer("b:1", 2, 4, 100.0), Peer("a:1", 0, 2, 100.0)]
    assert plan_route(peers, 0, 4) == [Hop("a:1", 0, 2), Hop("b:1", 2, 4)]


def test_fewer_hops_win_when_compute_is_equal():
    peers = [Peer("a:1", 0, 2, 100.0), Peer("b:1", 2, 3, 100.0), Peer("c:1", 3, 4, 100.0), Peer("r:1", 2, 4, 100.0)]
    assert plan_route(peers, 0, 4, hop_overhead_s=0.01) == [Hop("a:1", 0, 2), Hop("r:1", 2, 4)]


def test_a_fast_server_is_worth_an_extra_hop():
    # slow covers everything at 10 blocks/s (0.4 s); fast covers 1..3 at 1000/s:
    # slow 0:1 + fast 1:3 + slow 3:4 = 3 hops + 0.2 s + 0.002 s  <  0.4 s + 1 hop
    peers = [Peer("slow:1", 0, 4, 10.0), Peer("fast:1", 1, 3, 1000.0)]
    route = plan_route(peers, 0, 4, hop_overhead_s=0.001)
    assert route == [Hop("slow:1", 0, 1), Hop("fast:1", 1, 3), Hop("slow:1", 3, 4)]


def test_high_overhead_keeps_one_hop():
    peers = [Peer("slow:1", 0, 4, 10.0), Peer("fast:1", 1, 3, 1000.0)]
    assert plan_route(peers, 0, 4, hop_overhead_s=1.0) == [Hop("slow:1", 0, 4)]


def test_sub_range_uses_part_of_a_span():
    peers = [Peer("a:1", 0, 4, 100.0)]
    assert plan_route(peers, 2, 3) == [Hop("a:1", 2, 3)]


def test_banned_server_is_routed_around():
    peers = [Peer("a:1", 0, 2, 100.0), Peer("b:1", 2, 4, 1000.0), Peer("r:1", 1, 4, 10.0)]
    assert plan_route(peers, 0, 4, banned={"b:1"}) == [Hop("a:1", 0, 2), Hop("r:1", 2, 4)]


def test_planning_is_deterministic_under_ties():
    peers = [Peer("y:1", 0, 4, 50.0), Peer("x:1", 0, 4, 50.0)]
    assert plan_route(peers, 0, 4) == plan_route(list(reversed(peers)), 0, 4) == [Hop("x:1", 0, 4)]


def test_missing_blocks_are_named():
    peers = [Peer("a:1", 0, 2, 100.0), Peer("b:1", 5, 6, 100.0)]
    assert missing_blocks(peers, 0, 8) == [(2, 5), (6, 8)]
    with pytest.raises(NoRouteError) as info:
        plan_route(peers, 0, 8)
    assert info.value.missing == [(2, 5), (6, 8)]
    assert "blocks 2-4, blocks 6-7" in str(info.value)


def test_ban_that_opens_a_gap_names_it_and_the_server():
    peers = [Peer("a:1", 0, 2, 100.0), Peer("b:1", 2, 3, 100.0), Peer("c:1", 3, 4, 100.0)]
    with pytest.raises(NoRouteError, match=r"no live server holds block 2 \(excluding 1 failed server\(s\): b:1\)"):
        plan_route(peers, 0, 4, banned={"b:1"})


def _info(address: str, model: str = "tiny", adapter: str = "", start: int = 0, end: int = 4) -> swarm_pb2.ServerInfo:
    return swarm_pb2.ServerInfo(
        address=address, model_id=model, adapter_id=adapter, start=start, end=end, num_blocks=4, throughput=1.0
    )


def test_choose_swarm_infers_a_unanimous_model():
    swarm = choose_swarm([_info("a:1"), _info("b:1")])
    assert (swarm.model_id, swarm.adapter_id, swarm.num_blocks, len(swarm.servers)) == ("tiny", "", 4, 2)


def test_servers_disagreeing_on_the_model_is_an_error_unless_chosen():
    servers = [_info("a:1", model="tiny"), _info("b:1", model="smollm2-135m")]
    with pytest.raises(FedswarmError, match="servers disagree on the model: .*pass --model"):
        choose_swarm(servers)
    assert [s.address for s in choose_swarm(servers, model_id="tiny").servers] == ["a:1"]
    with pytest.raises(FedswarmError, match="no server serves model 'other'"):
        choose_swarm(servers, model_id="other")


def test_adapter_is_chosen_explicitly_when_servers_differ():
    servers = [_info("a:1"), _info("b:1", adapter="abc")]
    with pytest.raises(FedswarmError, match="disagree on the adapter"):
        choose_swarm(servers)
    assert [s.address for s in choose_swarm(servers, adapter_id="abc").servers] == ["b:1"]
    assert [s.address for s in choose_swarm(servers, adapter_id="").servers] == ["a:1"]


def test_empty_registry_is_an_error():
    with pytest.raises(FedswarmError, match="no block server is registered"):
        choose_swarm([])
