"""gRPC face of the target engine: protobuf in, engine call on the device thread, protobuf out."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from minedraft.engine.logits_processing import Logprob
from minedraft.engine.sampling import Sampling
from minedraft.protos import common_pb2, target_pb2, target_pb2_grpc
from minedraft.serving.servicing import EngineServicer, owner_of, seq_errors
from services.target.engine import TargetEngine


class TargetServicer(EngineServicer, target_pb2_grpc.TargetServicer):
    engine: TargetEngine | None

    async def Prefill(self, request: target_pb2.TargetPrefillRequest,
                      context: grpc.aio.ServicerContext) -> target_pb2.TargetPrefillResponse:
        engine = await self.ready_engine(context)
        seqs = [(s.seq_id, list(s.tokens), Sampling.from_proto(s.sampling)) for s in request.seqs]
        same = {s.seq_id: s.same_prompt_as for s in request.seqs if s.same_prompt_as}
        firsts, stats = await self.call(context, len(seqs), engine.prefill, seqs, owner_of(context), same,
                                        threads=request.threads)
        ids = [seq_id for seq_id, _, _ in seqs]
        errors = seq_errors(ids, firsts)
        return target_pb2.TargetPrefillResponse(
            tokens=[target_pb2.FirstToken(seq_id=seq_id, error=errors[seq_id]) if seq_id in errors else
                    target_pb2.FirstToken(seq_id=seq_id, token_id=first.next_token,
                                          logprob=logprob_protos(first.logprobs)[0] if first.logprobs else None)
                    for seq_id, first in zip(ids, firsts, strict=True)],
            stats=stats)

    async def Verify(self, request: target_pb2.VerifyRequest,
                     context: grpc.aio.ServicerContext) -> target_pb2.VerifyResponse:
        engine = await self.ready_engine(context)
        seqs = [(s.seq_id, [(d.token_id, list(d.q.token_ids), list(d.q.probs)) for d in s.drafts])
                for s in request.seqs]
        verdicts, stats = await self.call(context, len(seqs), engine.verify, seqs, owner_of(context),
                                          threads=request.threads)
        ids = [seq_id for seq_id, _ in seqs]
        errors = seq_errors(ids, verdicts)
        return target_pb2.VerifyResponse(
            verdicts=[target_pb2.Verdict(seq_id=seq_id, error=errors[seq_id]) if seq_id in errors else
                      target_pb2.Verdict(seq_id=seq_id, accepted=verdict.accepted, next_token=verdict.next_token,
                                         logprobs=logprob_protos(verdict.logprobs))
                      for seq_id, verdict in zip(ids, verdicts, strict=True)],
            stats=stats)


def logprob_protos(logprobs: Sequence[Logprob]) -> list[common_pb2.TokenLogprob]:
    return [common_pb2.TokenLogprob(token_id=lp.token, logprob=lp.logprob, top_ids=lp.top_ids,
                                    top_logprobs=lp.top_logprobs) for lp in logprobs]
