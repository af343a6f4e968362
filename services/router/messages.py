"""The internal calls' request messages, built in one place for the rounds and the start-up calibration."""

from __future__ import annotations

from collections.abc import Iterable

from minedraft.protos import common_pb2, draft_pb2, target_pb2

PromptSeq = tuple[str, list[int], common_pb2.SamplingParams]  # (seq_id, tokens, sampling)


def target_prefill(seqs: Iterable[PromptSeq], threads: int,
                   same_prompt_as: dict[str, str] | None = None) -> target_pb2.TargetPrefillRequest:
    """`same_prompt_as`: a sequence → an earlier one of this call with the same prompt (its cache is copied)."""
    same = same_prompt_as or {}
    return target_pb2.TargetPrefillRequest(seqs=[
        target_pb2.TargetPrefillSeq(seq_id=seq_id, tokens=tokens, sampling=sampling,
                                    same_prompt_as=same.get(seq_id, ""))
        for seq_id, tokens, sampling in seqs], threads=threads)


def draft_prefill(seqs: Iterable[PromptSeq], threads: int, replace: bool = False,
                  same_prompt_as: dict[str, str] | None = None) -> draft_pb2.DraftPrefillRequest:
    same = same_prompt_as or {}
    return draft_pb2.DraftPrefillRequest(seqs=[
        draft_pb2.DraftPrefillSeq(seq_id=seq_id, tokens=tokens, sampling=sampling, replace=replace,
                                  same_prompt_as=same.get(seq_id, ""))
        for seq_id, tokens, sampling in seqs], threads=threads)


def shared_prompts(requests: list) -> dict[str, str]:
    """Samples of one request in one call: each later one copies the first one's prompt cache."""
    present = {r.seq_id for r in requests}
    return {r.seq_id: r.same_prompt_as for r in requests if r.same_prompt_as in present}


def propose(seqs: Iterable[tuple[str, int, list[int], int]], threads: int, with_logprobs: bool = False,
            stop_below: float = 0.0) -> draft_pb2.ProposeRequest:
    """Per sequence (seq_id, keep, append, k): the commit of its verified tokens, then up to k drafts."""
    return draft_pb2.ProposeRequest(seqs=[
        draft_pb2.ProposeSeq(seq_id=seq_id, k=k, commit=draft_pb2.Commit(keep=keep, append=append))
        for seq_id, keep, append, k in seqs], threads=threads, with_logprobs=with_logprobs, stop_below=stop_below)


def verify(seqs: Iterable[tuple[str, list[common_pb2.DraftToken]]], threads: int) -> target_pb2.VerifyRequest:
    return target_pb2.VerifyRequest(seqs=[target_pb2.VerifySeq(seq_id=seq_id, drafts=drafts)
                                          for seq_id, drafts in seqs], threads=threads)


def release(seq_ids: Iterable[str]) -> common_pb2.ReleaseRequest:
    return common_pb2.ReleaseRequest(seq_ids=list(seq_ids))
