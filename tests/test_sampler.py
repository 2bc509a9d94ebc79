"""The sampler: greedy = argmax, top-k/top-p keep what they promise, seeds make
a row's draws independent of the batch around it, logprobs are the model's."""
from __future__ import annotations

import math

import torch

from statex_serve.engine.sampler import PenaltyHistory, SamplingRow, make_generator, prompt_logprobs, sample

V = 50


def _logits(B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


def test_greedy_is_argmax_and_bias_and_bans_apply():
    logits = _logits(6)
    out = sample(logits, [SamplingRow() for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    top = int(logits[0].argmax())
    other = int(logits[0].argmin())
    assert sample(logits[:1], [SamplingRow(banned_token_ids=(top,))]).token_ids[0] != top
    assert sample(logits[:1], [SamplingRow(logit_bias=((other, 100.0),))]).token_ids[0] == other


def test_top_k_and_top_p_restrict_the_support():
    logits = _logits(1).repeat(400, 1)
    order = logits[0].argsort(descending=True).tolist()
    rows = [SamplingRow(temperature=1.5, top_k=3, generator=make_generator(i, "cpu")) for i in range(400)]
    assert set(sample(logits, rows).token_ids) <= set(order[:3])
    # top_p: the smallest prefix (by probability) whose mass reaches p
    logits = logits / 3
    probs = logits[0].softmax(-1)[order]
    keep = int((probs.cumsum(0) < 0.6).sum()) + 1
    assert 3 < keep < V // 2
    rows = [SamplingRow(temperature=1.0, top_p=0.6, generator=make_generator(i, "cpu")) for i in range(400)]
    drawn = set(sample(logits, rows).token_ids)
    assert drawn <= set(order[:keep]) and len(drawn) > 1
    # a vanishing top_p or top_k=1 is greedy
    rows = [SamplingRow(temperature=1.0, top_p=1e-6, generator=make_generator(i, "cpu")) for i in range(20)]
    assert set(sample(logits[:20], rows).token_ids) == {order[0]}


def test_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    rows = [SamplingRow(temperature=0.7, generator=make_generator(1000 + i, "cpu")) for i in range(4000)]
    counts = torch.bincount(torch.tensor(sample(logits, rows).token_ids), minlength=4).float() / 4000
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(counts, expected, atol=0.03), (counts, expected)


def test_seeded_row_draws_do_not_depend_on_the_batch():
    logits = _logits(8, seed=3)

    def draws(batch_rows: list[int]) -> list[int]:
        gens = {i: make_generator(42 + i, "cpu") for i in batch_rows}
        seq = []
        for _ in range(10):
            rows = [SamplingRow(temperature=1.0, generator=gens[i]) for i in batch_rows]
            seq.append(sample(logits[batch_rows], rows).token_ids)
        return seq

    alone = [step[0] for step in draws([5])]
    in_batch = [step[2] for step in draws([0, 1, 5, 7])]
    assert alone == in_batch
    greedy_mix = [SamplingRow(), SamplingRow(temperature=1.0, generator=make_generator(47, "cpu"))]
    assert sample(logits[[0, 5]], greedy_mix).token_ids[1] == alone[0]


def test_logprobs_are_the_models_log_softmax():
    logits = _logits(3)
    rows = [SamplingRow(logprobs=4), SamplingRow(temperature=1.0, generator=make_generator(0, "cpu"), logprobs=0),
            SamplingRow()]
    out = sample(logits, rows)
    lp = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert math.isclose(first.logprob, float(lp[0, first.token_id]), rel_tol=1e-6)
    assert [t for t, _ in first.top] == lp[0].topk(4).indices.tolist()
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    assert out.logprobs[1].top == [] and math.isclose(out.logprobs[1].logprob,
                                                      float(lp[1, out.token_ids[1]]), rel_tol=1e-6)
    assert out.logprobs[2] is None


def test_prompt_logprobs_score_each_target():
    logits = _logits(5)
    targets = [3, 1, 4, 1]
    entries = prompt_logprobs(logits, targets, k=2)
    lp = logits.log_softmax(-1)
    assert [e.token_id for e in entries] == targets
    for t, e in enumerate(entries):
        assert math.isclose(e.logprob, float(lp[t, targets[t]]), rel_tol=1e-6)
        assert [i for i, _ in e.top] == lp[t].topk(2).indices.tolist()


def _penalized_reference(logits: list[float], prompt: list[int], output: list[int], presence: float,
                         frequency: float, repetition: float) -> list[float]:
    """vLLM's definitions, one token at a time: repetition over prompt + output
    (divide a positive logit, multiply a negative one), frequency per output
    occurrence, presence once per output token."""
    out = list(logits)
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        out[t] -= frequency * output.count(t) + presence * (t in output)
    return out


def test_penalties_follow_vllms_definitions_in_a_mixed_batch():
    g = torch.Generator().manual_seed(5)
    logits = _logits(8, seed=5)
    cases = [(0.0, 0.0, 1.0), (1.5, 0.0, 1.0), (0.0, 2.0, 1.0), (0.0, 0.0, 3.0), (-1.0, 0.5, 0.5),
             (2.0, -2.0, 1.7), (0.0, 0.0, 1.0), (0.3, 0.7, 1.2)]
    rows, expected = [], []
    for i, (pres, freq, rep) in enumerate(cases):
        prompt = torch.randint(0, V, (6,), generator=g).tolist()
        output: list[int] = [int(logits[i].argmax())] * 2     # penalize the favourite, so the choice moves
        history = PenaltyHistory(prompt, output)
        row = SamplingRow(presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep,
                          history=history if (pres or freq or rep != 1.0) else None)
        # the history is read twice, as outputs grow between steps
        for step in range(2):
            if row.history is not None:
                row.history.output_counts(V, "cpu")
            output.extend(torch.randint(0, V, (3 + step,), generator=g).tolist())
        rows.append(row)
        expected.append(_penalized_reference(logits[i].tolist(), prompt, output, pres, freq, rep))
    got = sample(logits, rows).token_ids      # greedy rows: the argmax of the penalized logits
    want = [max(range(V), key=row.__getitem__) for row in expected]
    assert got == want
    assert got[0] == int(logits[0].argmax()) and got[6] == int(logits[6].argmax())
    assert sum(t != int(a) for t, a in zip(got, logits.argmax(-1))) >= 4, "the penalties changed nothing"
    # sampled rows see the same penalized logits: a huge repetition penalty on a row
    # whose prompt holds all but one token leaves only that one
    free = 17
    history = PenaltyHistory([t for t in range(V) if t != free], [])
    rows = [SamplingRow(temperature=1.0, repetition_penalty=1e6, history=history, generator=make_generator(i, "cpu"))
            for i in range(50)]
    assert set(sample(torch.randn(50, V).abs() + 20, rows).token_ids) == {free}
