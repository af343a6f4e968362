"""Several draft/target pairs ("cells") behind one router, and requests that outlive their cell's target.

Each cell is a Scheduler of its own (lanes, stage model, backends). A new request goes to the up cell with the
lowest predicted wait: the sequences it holds over the rate it has been serving them (sequence-rounds per second
of its lanes), and stays there. A cell whose target stops answering takes no new requests, and the requests it
held move on: the router holds every token it has streamed, so another cell prefills prompt + tokens so far and
decodes on. Under greedy decoding the client sees exactly the tokens of an undisturbed run; sampled, the same
conditional distribution. Only when no cell is up do they fail (UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

from services.router.request import Request
from services.router.scheduler import Scheduler

log = logging.getLogger(__name__)


class Cells:
    def __init__(self, schedulers: list[Scheduler], ready: bool = True) -> None:
        self.schedulers = schedulers
        self.ready = ready  # every scheduler calibrated and started: requests are taken
        self._releases: set[asyncio.Task] = set()

    def __getitem__(self, index: int) -> Scheduler:
        return self.schedulers[index]

    def __len__(self) -> int:
        return len(self.schedulers)

    @property
    def first(self) -> Scheduler:
        return self.schedulers[0]

    @property
    def target_up(self) -> bool:
        return any(s.target_up for s in self.schedulers)

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.schedulers)

    def predicted_wait(self, scheduler: Scheduler) -> float:
        """Sequences held over sequence-rounds served per second (unmeasured: one per second)."""
        rounds = sum(lane.served_rounds for lane in scheduler.lanes)
        busy_s = sum(lane.served_ms for lane in scheduler.lanes) / 1000
        rate = rounds / busy_s if rounds and busy_s > 0 else 1.0
        return (scheduler.in_flight + 1) / rate

    def pick(self, avoid: int | None = None) -> int | None:
        """The up cell (other than `avoid`) a new request waits least in; None when none is up."""
        up = [i for i, s in enumerate(self.schedulers) if s.target_up and i != avoid]
        return min(up, key=lambda i: (self.predicted_wait(self.schedulers[i]), i), default=None)

    def submit(self, request: Request) -> None:
        cell = self.pick()
        request.cell = cell if cell is not None else 0
        request.rescue = self.rescue
        request.span.set_attribute("minedraft.cell", request.cell)
        self.schedulers[request.cell].submit(request)

    def rescue(self, request: Request) -> bool:
        """Moves a request whose cell's target went down to another cell; False when no other is up."""
        cell = self.pick(avoid=request.cell)
        if cell is None:
            return False
        old = self.schedulers[request.cell]
        old.withdraw(request)
        left_behind = dataclasses.replace(request)  # its old id, released there once that target is back
        task = asyncio.get_running_loop().create_task(old.releaser.release([left_behind]))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        log.warning("cell %d lost its target; request %s goes on in cell %d after %d tokens", request.cell,
                    request.seq_id, cell, len(request.generated))
        request.seq_id, request.same_prompt_as = uuid.uuid4().hex, ""
        request.draft_len, request.draft_epoch, request.draft_sent = 0, -1, False
        request.cell, request.moves = cell, request.moves + 1
        request.span.set_attribute("minedraft.cell", cell)
        request.span.add_event("moved", {"minedraft.cell": cell, "minedraft.tokens": len(request.generated)})
        self.schedulers[cell].submit(request)
        return True
