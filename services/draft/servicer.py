"""gRPC face of the draft engine: protobuf in, engine call on the device thread, protobuf out."""

from __future__ import annotations

import grpc

from minedraft.protos import common_pb2, draft_pb2, draft_pb2_grpc
from minedraft.sampling import Sampling
from minedraft.servicing import EngineServicer
from services.draft.engine import DraftEngine


class DraftServicer(EngineServicer, draft_pb2_grpc.DraftServicer):
    engine: DraftEngine | None

    async def Prefill(self, request: draft_pb2.DraftPrefillRequest,
                      context: grpc.aio.ServicerContext) -> draft_pb2.DraftPrefillResponse:
        seqs = [(s.seq_id, list(s.tokens), Sampling.from_proto(s.sampling)) for s in request.seqs]
        _, stats = await self.call(context, len(seqs), "prefill", seqs, threads=request.threads)
        return draft_pb2.DraftPrefillResponse(stats=stats)

    async def Propose(self, request: draft_pb2.ProposeRequest,
                      context: grpc.aio.ServicerContext) -> draft_pb2.ProposeResponse:
        seqs = [(s.seq_id, s.commit.keep, list(s.commit.append), s.k) for s in request.seqs]
        proposals, stats = await self.call(context, len(seqs), "propose", seqs, threads=request.threads)
        return draft_pb2.ProposeResponse(
            proposals=[
                draft_pb2.Proposal(seq_id=seq_id, tokens=[
                    common_pb2.DraftToken(token_id=t.token_id,
                                          q=common_pb2.SparseDist(token_ids=t.support, probs=t.probs))
                    for t in tokens])
                for (seq_id, *_), tokens in zip(seqs, proposals, strict=True)],
            stats=stats)
