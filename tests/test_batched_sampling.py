"""Batched, sync-free sampling: one host copy per call (per draft position), rows independent of their batch,
a sampler fault confined to its row, and the same tokens as judging each row alone."""

import pytest
import torch

from minedraft.engine import verification
from minedraft.engine.model_runner import ModelRunner
from minedraft.engine.sampling import (
    DRAFT_STREAM,
    TARGET_STREAM,
    Sampling,
    draft_rows,
    greedy_argmax,
    make_generator,
    warp_rows,
)
from minedraft.engine.verification import judge
from services.draft import engine as draft_engine
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine, Verdict

SETTINGS = [Sampling(), Sampling(temperature=0.8, top_k=5, seed=1), Sampling(temperature=1.2, top_p=0.7, seed=2),
            Sampling(temperature=0.9, min_p=0.1, seed=3), Sampling(temperature=1.0, seed=4)]


def counting(monkeypatch, module) -> list[int]:
    """Counts the device-to-host copies a module makes through `to_host`."""
    calls = [0]
    real = module.to_host

    def counted(tensor: torch.Tensor) -> list:
        calls[0] += 1
        return real(tensor)
    monkeypatch.setattr(module, "to_host", counted)
    return calls


def test_one_host_copy_per_verify_and_per_draft_position(tiny_pair, monkeypatch) -> None:
    target = TargetEngine(ModelRunner.load(str(tiny_pair[0]), dtype="float64"))
    draft = DraftEngine(ModelRunner.load(str(tiny_pair[1]), dtype="float64"), top_m=8)
    prompts = {f"s{i}": ([3 + i, 9, 4, 7 + i], sampling) for i, sampling in enumerate(SETTINGS)}
    verify_copies, draft_copies = counting(monkeypatch, verification), counting(monkeypatch, draft_engine)
    firsts = target.prefill([(s, tokens, sampling) for s, (tokens, sampling) in prompts.items()])
    draft.prefill([(s, tokens, sampling) for s, (tokens, sampling) in prompts.items()])
    assert verify_copies[0] == 1, "a prefill of five rows draws every first token with one copy"
    proposals = draft.propose([(s, len(tokens), [first.next_token], 4)
                               for (s, (tokens, _)), first in zip(prompts.items(), firsts, strict=True)])
    assert draft_copies[0] == 4, "one copy per draft position, whatever the batch"
    verdicts = target.verify([(s, [(p.token_id, p.support, p.probs) for p in props])
                              for s, props in zip(prompts, proposals, strict=True)])
    assert verify_copies[0] == 2 and all(isinstance(v, Verdict) for v in verdicts)


def test_batched_judgement_equals_each_row_alone() -> None:
    """Rows of different settings and draft counts, judged together and one at a time: the same verdicts."""
    torch.manual_seed(5)
    vocab, positions = 50, 4
    logits = torch.randn(len(SETTINGS), positions, vocab, dtype=torch.float64) * 2
    draft_logits = logits[:, :-1] + torch.randn(len(SETTINGS), positions - 1, vocab, dtype=torch.float64)
    drafts = []
    for row, sampling in enumerate(SETTINGS):
        n = row % positions  # 0 to 3 drafts: right-aligned, as the runner returns them
        generator = make_generator(sampling.seed, DRAFT_STREAM)
        tokens, ids, q, _ = draft_rows(draft_logits[row, positions - 1 - n:], [sampling] * n, 6, [generator] * n) \
            if n else (torch.zeros(0), None, None, None)
        drafts.append([(int(tokens[i]), [int(x) for x, p in zip(ids[i], q[i], strict=True) if p > 0],
                        [float(p) for p in q[i] if p > 0]) for i in range(n)])

    def generators() -> list[torch.Generator]:
        return [make_generator(s.seed, TARGET_STREAM) for s in SETTINGS]
    together = judge(logits, drafts, SETTINGS, generators())
    alone = [judge(logits[row:row + 1, positions - 1 - len(d):], [d], [s], [g])
             for row, (d, s, g) in enumerate(zip(drafts, SETTINGS, generators(), strict=True))]
    assert together.accepted == [a.accepted[0] for a in alone]
    assert together.next_tokens == [a.next_tokens[0] for a in alone]
    assert together.ok == [True] * len(SETTINGS)
    best = logits.argmax(dim=-1)
    greedy_accepted = 0  # row 0: greedy, no drafts: the argmax of its only position
    assert together.next_tokens[0] == int(best[0, -1]) and together.accepted[0] == greedy_accepted


def test_a_row_without_finite_mass_fails_alone() -> None:
    logits = torch.randn(3, 2, 20, dtype=torch.float64)
    logits[1] = float("nan")
    settings = [Sampling(temperature=1.0, seed=1)] * 3
    verdict = judge(logits, [[], [], []], settings, [make_generator(i, TARGET_STREAM) for i in range(3)])
    assert verdict.ok == [True, False, True]
    tokens, _, _, ok = draft_rows(logits[:, 0], settings, 4, [make_generator(i, DRAFT_STREAM) for i in range(3)])
    assert ok.tolist() == [True, False, True] and 0 <= int(tokens[0]) < 20


@pytest.mark.parametrize("sampling", SETTINGS[1:], ids=["top_k", "top_p", "min_p", "plain"])
def test_a_row_is_warped_the_same_in_any_batch(sampling: Sampling) -> None:
    torch.manual_seed(6)
    logits = torch.randn(len(SETTINGS), 3, 40)
    together = warp_rows(logits, SETTINGS)
    row = SETTINGS.index(sampling)
    assert torch.equal(together[row], warp_rows(logits[row:row + 1], [sampling])[0])


def test_ranking_only_the_likeliest_tokens_keeps_the_same_distribution(monkeypatch) -> None:
    """On a CPU top-k/top-p rank a row's 1,024 likeliest tokens when its choice lies within them: the same
    probabilities as sorting the whole vocabulary, for peaked and flat rows (the flat ones are sorted whole)."""
    from minedraft.engine import sampling

    torch.manual_seed(0)
    logits = torch.randn(4, 3, 20000) * torch.tensor([1.0, 4.0, 8.0, 12.0])[:, None, None]
    settings = [Sampling(temperature=0.8, top_p=0.9), Sampling(temperature=1.0, top_k=50, top_p=0.95),
                Sampling(temperature=0.7, top_k=2000), Sampling(temperature=1.2, top_p=0.5)]
    fast, fast_rows = warp_rows(logits, settings), warp_rows(logits[:, 0], settings)  # [rows, P, V] and [rows, V]
    monkeypatch.setattr(sampling, "CANDIDATES", 1 << 30)
    whole = warp_rows(logits, settings)
    assert torch.allclose(fast, whole, rtol=0, atol=1e-7) and torch.equal(fast > 0, whole > 0)
    assert torch.allclose(fast_rows, whole[:, 0], rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 151_936), (3, 5, 4_099), (40, 1, 1_000), (2, 0, 7)])
def test_greedy_argmax_picks_the_same_index_as_argmax(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The widened blocks must pick argmax's own index: ties (rounded logits tie often in half precision),
    NaN rows, all -inf rows and more rows than one block included."""
    torch.manual_seed(11)
    logits = (torch.randn(shape) * 3).round().to(dtype)  # integers: most rows tie at their maximum
    rows = shape[0] * shape[1]
    if rows > 1:
        logits[0, 0, 5:9] = float("nan")
        logits[-1, -1] = float("-inf")
    widened = greedy_argmax(logits)
    assert widened.shape == shape[:-1]
    assert torch.equal(widened, logits.argmax(dim=-1))
    assert torch.equal(widened, logits.float().argmax(dim=-1))
    if rows > 1:
        assert widened[0, 0] == 5 and widened[-1, -1] == 0  # the first NaN; the first of equal -inf


def test_greedy_argmax_of_a_strided_view_matches() -> None:
    """The draft passes logits[:, -1], a non-contiguous [rows, vocab] view; 32 rows end exactly on a block."""
    torch.manual_seed(12)
    logits = (torch.randn(32, 3, 2_051) * 3).round().to(torch.bfloat16)
    logits[16, -1, 100:] = float("nan")  # the first row of the second block
    last = logits[:, -1]
    assert not last.is_contiguous()
    assert torch.equal(greedy_argmax(last), last.argmax(dim=-1))
    assert int(greedy_argmax(last)[16]) == 100
