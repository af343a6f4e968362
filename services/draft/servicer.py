"""gRPC face of the draft engine: protobuf in, engine call on the device thread, protobuf out."""

from __future__ import annotations

import grpc

from minedraft.engine.sampling import Sampling
from minedraft.protos import common_pb2, draft_pb2, draft_pb2_grpc
from minedraft.serving.servicing import EngineServicer, owner_of, seq_errors
from services.draft.engine import DraftEngine


class DraftServicer(EngineServicer, draft_pb2_grpc.DraftServicer):
    engine: DraftEngine | None

    async def Prefill(self, request: draft_pb2.DraftPrefillRequest,
                      context: grpc.aio.ServicerContext) -> draft_pb2.DraftPrefillResponse:
        engine = await self.ready_engine(context)
        seqs = [(s.seq_id, list(s.tokens), Sampling.from_proto(s.sampling)) for s in request.seqs]
        replace = frozenset(s.seq_id for s in request.seqs if s.replace)
        same = {s.seq_id: s.same_prompt_as for s in request.seqs if s.same_prompt_as}
        errors, stats = await self.call(context, len(seqs), engine.prefill, seqs, owner_of(context), replace, same,
                                        threads=request.threads)
        failed = seq_errors([seq_id for seq_id, *_ in seqs], errors)
        return draft_pb2.DraftPrefillResponse(stats=stats, errors=list(failed.values()))

    async def Propose(self, request: draft_pb2.ProposeRequest,
                      context: grpc.aio.ServicerContext) -> draft_pb2.ProposeResponse:
        engine = await self.ready_engine(context)
        seqs = [(s.seq_id, s.commit.keep, list(s.commit.append), s.k) for s in request.seqs]
        proposals, stats = await self.call(context, len(seqs), engine.propose, seqs, owner_of(context),
                                           request.with_logprobs, request.stop_below, threads=request.threads)
        ids = [seq_id for seq_id, *_ in seqs]
        errors = seq_errors(ids, proposals)
        return draft_pb2.ProposeResponse(
            proposals=[
                draft_pb2.Proposal(seq_id=seq_id, error=errors[seq_id]) if seq_id in errors else
                draft_pb2.Proposal(seq_id=seq_id, tokens=[
                    common_pb2.DraftToken(token_id=t.token_id, logprob=t.logprob,
                                          q=common_pb2.SparseDist(token_ids=t.support, probs=t.probs))
                    for t in tokens])
                for seq_id, tokens in zip(ids, proposals, strict=True)],
            stats=stats)
