"""Who joins a lane: size, balance and the per-lane token budget (no services needed)."""

from __future__ import annotations

from collections import deque

from minedraft.engine.sampling import Sampling
from services.router.lanes import Lane, take_waiting
from services.router.request import Request


def request(name: str, prompt: int, max_tokens: int) -> Request:
    return Request(seq_id=name, prompt_ids=[1] * prompt, sampling=Sampling(), max_tokens=max_tokens, text=None,
                   eos_ids=frozenset())


def test_a_lane_takes_requests_up_to_its_token_budget_in_order() -> None:
    lane = Lane(0)
    waiting = deque([request("a", 100, 100), request("b", 300, 200), request("c", 10, 10)])
    joined = take_waiting([lane], 1, lane, waiting, max_batch=8, max_lane_tokens=600)
    assert [r.seq_id for r in joined] == ["a"]  # b would pass 600; c waits behind it, not ahead of it
    lane.active = joined
    waiting.popleft()
    assert [r.seq_id for r in take_waiting([lane], 1, lane, waiting, 8, 600)] == ["c"]


def test_one_request_alone_always_fits_and_no_budget_means_batch_only() -> None:
    lane = Lane(0)
    assert len(take_waiting([lane], 1, lane, deque([request("big", 5000, 100)]), 8, max_lane_tokens=600)) == 1
    many = deque(request(str(i), 1000, 1000) for i in range(10))
    assert len(take_waiting([lane], 1, lane, many, max_batch=8)) == 8


def test_the_smaller_lane_takes_the_newcomers() -> None:
    lanes = [Lane(0), Lane(1)]
    lanes[1].active = [request("x", 1, 1), request("y", 1, 1)]
    waiting = deque(request(str(i), 1, 1) for i in range(5))
    assert len(take_waiting(lanes, 2, lanes[0], waiting, max_batch=8)) == 3  # evens out at 3 and 2, then one more
