"""n samples of one prompt run the prompt once: the others copy the first one's cache."""

from __future__ import annotations

from minedraft.engine.model_runner import ModelRunner, SequenceState


def copy_prompt_cache(runner: ModelRunner, parent: SequenceState, child: SequenceState) -> None:
    """Gives `child` (holding the same tokens as `parent`, uncached) a copy of parent's cached keys/values."""
    if runner.static:
        runner.static.assign([child])
        for cache in (*runner.static.keys, *runner.static.values):
            cache[child.slot, :parent.kv_len] = cache[parent.slot, :parent.kv_len]
    else:
        child.kv = parent.kv.clone()
    child.mark_cached()


Copy = tuple[SequenceState, SequenceState]  # (parent, child)


def split_shared(seqs: list[tuple[str, SequenceState]],
                 same_prompt_as: dict[str, str]) -> tuple[list[SequenceState], list[Copy]]:
    """The states whose prompts must run, and (parent, child) pairs where the child copies its parent's cache.

    A child's parent must be an earlier sequence of the call, with the same tokens, that runs its prompt itself;
    otherwise the child runs its own."""
    by_id: dict[str, SequenceState] = {}
    ran: list[SequenceState] = []
    copies: list[Copy] = []
    for seq_id, state in seqs:
        parent = by_id.get(same_prompt_as.get(seq_id, ""))
        if parent is not None and parent.tokens == state.tokens:
            copies.append((parent, state))
        else:
            ran.append(state)
            by_id[seq_id] = state
    return ran, copies
