"""An experiment, not the product (docs/bench/zen5-forced-drop-*): auto's policy drops to target-only once per
router, at the first replan with 16 measured sequence rounds and FORCE_AT or more sequences in flight, as it
did on its own on the AMX CPU at C = 4, so a run shows whether a probe brings speculation back. Copy it as
`sitecustomize.py` into a folder on PYTHONPATH for the bench (every process imports it; only the router
calls the policy):

    PYTHONPATH=DIR FORCE_AT=2 MINEDRAFT_LOG_LEVEL=INFO .venv/bin/minedraft bench --modes ar,sd,auto \\
        --concurrency 2,3 --repeats 2 --workload humaneval --num-prompts 8 --prompts-per-concurrency 1 --max-tokens 64
"""

import logging
import os

from services.router import policy

_real_next_plan, _fired = policy.next_plan, []


def _next_plan_dropping_once(model, current, sequences, *args, **kwargs):
    if not _fired and current.k and sequences >= int(os.environ.get("FORCE_AT", "2")) and model.rounds >= 16:
        _fired.append(sequences)
        logging.getLogger("forcedrop").warning("forced drop at %d sequences", sequences)
        return policy.Plan(1, 0, 0.0)
    return _real_next_plan(model, current, sequences, *args, **kwargs)


policy.next_plan = _next_plan_dropping_once
