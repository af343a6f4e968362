"""Keeps a cluster's services running: a service that exits on its own is started again."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minedraft.app.launcher import Cluster


class Supervisor:
    """Starts again any service that exits on its own, after a backoff that doubles while it keeps dying.

    The router recovers from a restarted draft or target by itself (health watch, new epoch); the draft only
    accelerates, so the cluster serves on, target-only, while it is away."""

    def __init__(self, cluster: Cluster, first_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 stable_after_s: float = 60.0) -> None:
        self.cluster = cluster
        self.first_backoff_s, self.max_backoff_s, self.stable_after_s = first_backoff_s, max_backoff_s, stable_after_s
        self.backoff_s = dict.fromkeys(cluster.procs, first_backoff_s)
        self.died_at: dict[str, float] = {}
        self.started_at = dict.fromkeys(cluster.procs, time.monotonic())
        self.restarts = dict.fromkeys(cluster.procs, 0)

    def check(self) -> None:
        now = time.monotonic()
        for name, proc in self.cluster.procs.items():
            if proc.poll() is None:
                if now - self.started_at[name] > self.stable_after_s:
                    self.backoff_s[name] = self.first_backoff_s
                continue
            died_at = self.died_at.setdefault(name, now)
            if now - died_at < self.backoff_s[name]:
                continue
            print(f"minedraft: {name} exited with code {proc.returncode}; starting it again "
                  f"(restart {self.restarts[name] + 1})", file=sys.stderr, flush=True)
            self.cluster.restart(name)
            del self.died_at[name]
            self.started_at[name], self.restarts[name] = now, self.restarts[name] + 1
            self.backoff_s[name] = min(self.max_backoff_s, 2 * self.backoff_s[name])
