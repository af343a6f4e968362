"""Lanes and who rides in them: joining from the queue, handing sequences to the other lane, overlap.

A lane is a batch of sequences that goes through rounds together. With two lanes open, each lane's loop runs
on its own, so while the target verifies one the draft proposes for the other. Only the lanes below
`open_lanes` (auto's plan) take new sequences; a closed lane hands its sequences to the open one at its own
round boundary, where none of them is mid-round.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from minedraft.protos import monitor_pb2
from services.router.policy import rebalance
from services.router.request import Request


@dataclass
class Lane:
    index: int
    active: list[Request] = field(default_factory=list)
    incoming: list[Request] = field(default_factory=list)  # handed over by the other lane, joins next round
    prefilling: bool = False
    counters: monitor_pb2.LaneCounters = field(default_factory=monitor_pb2.LaneCounters)  # for people; cleared
    # What routing reads (Cells.predicted_wait): sequence-rounds served and the wall ms they took. Kept apart
    # from `counters`, which a GetStats(clear=True) resets: a cleared cell would look unmeasured, then slow.
    served_rounds: float = 0.0
    served_ms: float = 0.0
    # What auto prices this lane's rounds with: the draft's device ms for them (proposals, and new prompts caught
    # up on the way), never cleared. Read from `counters`, a clear mid-round made a round's cost -1e6 ms.
    draft_ms: float = 0.0

    def __post_init__(self) -> None:
        self.counters.lane = self.index

    def round_served(self, sequences: int, seconds: float) -> None:
        self.served_rounds += sequences
        self.served_ms += seconds * 1e3

    @property
    def size(self) -> int:
        return len(self.active) + len(self.incoming)

    def live(self) -> list[Request]:
        return [r for r in (*self.active, *self.incoming) if not r.done]

    def discard(self, request: Request) -> None:
        for held in (self.active, self.incoming):
            if request in held:
                held.remove(request)

    def tokens_reserved(self) -> int:
        return sum(r.reserved_tokens for r in self.active)


def overlapped(lanes: list[Lane], open_lanes: int, lane: Lane) -> bool:
    """Whether this lane's calls run beside the other lane's (two lanes, both with work)."""
    if len(lanes) != 2 or open_lanes != 2:
        return False
    other = lanes[1 - lane.index]
    return bool(other.active or other.incoming or other.prefilling)


def hand_over(lanes: list[Lane], open_lanes: int, lane: Lane) -> bool:
    """Gives sequences to the other lane: all of them when this one is closed, else enough to even out a tail
    so neither lane idles. Returns whether any moved."""
    if len(lanes) != 2:
        return False
    other = lanes[1 - lane.index]
    if lane.index >= open_lanes:
        count = len(lane.active)
    elif other.index < open_lanes and len(lane.active) > other.size:
        count = rebalance([len(lane.active), other.size])
    else:
        count = 0
    if count:
        other.incoming.extend(lane.active[-count:])
        del lane.active[-count:]
    return bool(count)


def take_waiting(lanes: list[Lane], open_lanes: int, lane: Lane, waiting: deque[Request], max_batch: int,
                 max_lane_tokens: int = 0) -> list[Request]:
    """Moves waiting requests into this lane while it is (one of) the smallest, not full, and (with
    `max_lane_tokens`) holds room for the next one's prompt and completion. The first in line waits its turn
    rather than be overtaken, and one alone always fits. The samples of one request stay together while there
    is room, so they share one prefill."""
    joining: list[Request] = []
    reserved = lane.tokens_reserved()
    while waiting and len(lane.active) + len(joining) < max_batch:
        others = min((o.size for o in lanes if o is not lane and o.index < open_lanes), default=max_batch)
        first_sample = waiting[0].same_prompt_as
        sibling = bool(joining and first_sample) and first_sample in (joining[-1].seq_id, joining[-1].same_prompt_as)
        if len(lane.active) + len(joining) > others and not sibling:
            break
        if waiting[0].cancelled:
            waiting.popleft()
            continue
        if max_lane_tokens and (lane.active or joining) and reserved + waiting[0].reserved_tokens > max_lane_tokens:
            break
        request = waiting.popleft()
        reserved += request.reserved_tokens
        joining.append(request)
    return joining
