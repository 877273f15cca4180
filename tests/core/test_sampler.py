"""Sampler: greedy, seeded sampling, truncation (top-k/p, min-p), penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from portaserve.core.request import Request
from portaserve.core.sampler import Sampler
from portaserve.core.sampling import SamplingParams
from portaserve.errors import RequestError

V = 50


def req(rid: str = "r", prompt: list[int] | None = None, out: list[int] | None = None,
        eos: tuple[int, ...] = (), **kw) -> Request:
    r = Request(rid, prompt or [1, 2, 3], SamplingParams(**kw), eos_token_ids=eos)
    r.output_token_ids = list(out or [])
    return r


def test_greedy_is_argmax_per_row():
    logits = torch.randn(6, V)
    out = Sampler().sample(logits, [req(str(i), temperature=0) for i in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_bf16_logits_keep_their_dtype_for_argmax_and_upcast_for_penalties(monkeypatch):
    """The runner hands the sampler logits in the model's dtype: greedy rows take the argmax
    of them as they are (the same ids as the float32 copy: the upcast is exact); penalties,
    sampling and logprobs see float32."""
    logits = (torch.randn(8, V, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    seen = []
    real_argmax = torch.Tensor.argmax
    monkeypatch.setattr(torch.Tensor, "argmax", lambda t, *a, **kw: seen.append(t.dtype) or real_argmax(t, *a, **kw))
    greedy = Sampler().sample(logits, [req(str(i), temperature=0) for i in range(8)])
    assert greedy.token_ids == real_argmax(logits.float(), -1).tolist()
    assert seen == [torch.bfloat16]
    seen.clear()
    reqs = [req(str(i), temperature=0, prompt=[int(logits[i].float().argmax())], repetition_penalty=3.0)
            for i in range(8)]
    penalized = Sampler().sample(logits, reqs)
    assert penalized.token_ids == Sampler().sample(logits.float(), reqs).token_ids
    assert seen and all(dt == torch.float32 for dt in seen)
    lp = Sampler().sample(logits[:1], [req("l", temperature=0, logprobs=2)]).logprobs[0]
    want = torch.log_softmax(logits[0].float(), -1)
    top = int(want.argmax())
    assert lp[top] == pytest.approx(float(want[top]))


def test_mixed_greedy_and_random_rows():
    logits = torch.randn(4, V)
    reqs = [req("a", temperature=0), req("b", temperature=1.0, seed=1),
            req("c", temperature=0), req("d", temperature=0.7, seed=2)]
    out = Sampler().sample(logits, reqs)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[2] == int(logits[2].argmax())
    assert all(0 <= t < V for t in out.token_ids)


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    torch.manual_seed(0)
    steps = [torch.randn(3, V) for _ in range(20)]

    def run(batch_rows: list[int], seed: int) -> list[int]:
        s = Sampler(seed=123)
        r = req("x", temperature=1.0, seed=seed)
        others = [req(f"o{i}", temperature=1.0) for i in range(len(batch_rows) - 1)]
        got = []
        for logits in steps:
            rows = [r, *others]
            got.append(s.sample(logits[: len(rows)], rows).token_ids[0])
        return got

    a = run([0], seed=7)
    b = run([0, 1, 2], seed=7)  # other unseeded requests in the batch must not disturb it
    c = run([0], seed=8)
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(5, V)
    s = Sampler()
    k1 = s.sample(logits, [req(str(i), temperature=1.5, top_k=1, seed=i) for i in range(5)])
    p = s.sample(logits, [req(str(i), temperature=1.5, top_p=1e-6, seed=i) for i in range(5)])
    assert k1.token_ids == logits.argmax(-1).tolist()
    assert p.token_ids == logits.argmax(-1).tolist()


def test_top_k_and_min_p_restrict_the_support():
    torch.manual_seed(1)
    logits = torch.randn(V)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    probs = torch.softmax(logits, -1)
    allowed_min_p = set((probs >= 0.3 * probs.max()).nonzero().squeeze(1).tolist())
    s = Sampler()
    r_k = req("k", temperature=1.0, top_k=5, seed=3)
    r_m = req("m", temperature=1.0, min_p=0.3, seed=4)
    seen_k, seen_m = set(), set()
    for _ in range(300):
        out = s.sample(torch.stack([logits, logits]), [r_k, r_m])
        seen_k.add(out.token_ids[0])
        seen_m.add(out.token_ids[1])
    assert seen_k <= top5 and len(seen_k) > 1
    assert seen_m <= allowed_min_p


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    expected = torch.softmax(logits, -1)
    s = Sampler()
    r = req("d", temperature=1.0, seed=11)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[s.sample(logits[None], [r]).token_ids[0]] += 1
    assert torch.allclose(counts / n, expected, atol=0.03)


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.zeros(1, V)
    logits[0, 5] = 2.0  # seen in the prompt
    logits[0, 9] = 1.5  # unseen
    plain = Sampler().sample(logits, [req(temperature=0, prompt=[5])]).token_ids[0]
    penal = Sampler().sample(logits, [req(temperature=0, prompt=[5], repetition_penalty=2.0)])
    assert plain == 5
    assert penal.token_ids[0] == 9  # 2.0 / 2 = 1.0 < 1.5


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(1, V)
    logits[0, 3] = 1.0
    logits[0, 4] = 0.9
    # token 3 generated twice: frequency 0.1 * 2 = 0.2 -> 0.8 < 0.9
    out = Sampler().sample(logits, [req(temperature=0, out=[3, 3], frequency_penalty=0.1)])
    assert out.token_ids[0] == 4
    # presence counts once: 1.0 - 0.05 = 0.95 > 0.9
    out = Sampler().sample(logits, [req(temperature=0, out=[3, 3], presence_penalty=0.05)])
    assert out.token_ids[0] == 3
    # the prompt does not count for presence/frequency
    out = Sampler().sample(logits, [req(temperature=0, prompt=[3], frequency_penalty=2.0)])
    assert out.token_ids[0] == 3


def test_a_pending_token_counts_like_a_known_one():
    # Async scheduling: the previous token is still on the device; penalties must treat it
    # exactly as if it were already in output_token_ids (fresh random logits, all penalties).
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, V, generator=gen)
    kw = dict(temperature=0, repetition_penalty=1.7, frequency_penalty=0.6, presence_penalty=0.4)
    outs = [[3, 8, 3], [], [11], [2, 2]]
    flight = [int(logits[i].argmax()) for i in range(4)]  # strongly affected tokens
    known = [req(str(i), out=o + [flight[i]], **kw) for i, o in enumerate(outs)]
    waiting = [req(str(i), out=o, **kw) for i, o in enumerate(outs)]
    pending = {i: torch.tensor([flight[i]]) for i in range(4)}
    want = Sampler().sample_ids(logits, known, [len(o) + 1 for o in outs])
    got = Sampler().sample_ids(logits, waiting, [len(o) + 1 for o in outs], pending)
    assert torch.equal(got, want)
    assert not torch.equal(Sampler().sample_ids(logits, waiting, [len(o) for o in outs]), want)


def test_logprob_tensors_match_the_dicts():
    logits = torch.randn(3, V)
    reqs = [req("a", temperature=0, logprobs=2), req("b", temperature=0), req("c", temperature=0, logprobs=0)]
    s = Sampler()
    out = s.sample(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    top_a = raw[0].topk(2)
    want_a = dict(zip(top_a.indices.tolist(), top_a.values.tolist(), strict=True))
    want_a[out.token_ids[0]] = float(raw[0, out.token_ids[0]])
    assert out.logprobs[0] == want_a
    assert out.logprobs[1] is None
    assert out.logprobs[2] == {out.token_ids[2]: float(raw[2, out.token_ids[2]])}


def test_min_tokens_bans_eos_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 2] = 5.0  # eos is the argmax
    early = Sampler().sample(logits, [req(temperature=0, eos=(2,), min_tokens=2, out=[7])])
    late = Sampler().sample(logits, [req(temperature=0, eos=(2,), min_tokens=2, out=[7, 8])])
    assert early.token_ids[0] != 2
    assert late.token_ids[0] == 2


def test_logprobs_top_n_and_chosen_token():
    logits = torch.randn(2, V)
    ref = torch.log_softmax(logits, -1)
    out = Sampler().sample(logits, [req("a", temperature=0, logprobs=3),
                                    req("b", temperature=1.0, seed=5, logprobs=0)])
    top = ref[0].topk(3)
    assert set(out.logprobs[0]) == set(top.indices.tolist())
    for tok, lp in out.logprobs[0].items():
        assert lp == pytest.approx(float(ref[0, tok]), abs=1e-5)
    chosen_b = out.token_ids[1]
    assert out.logprobs[1] == {chosen_b: pytest.approx(float(ref[1, chosen_b]), abs=1e-5)}


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("temperature", -1.0), ("n", 0),
     ("min_p", 2.0), ("presence_penalty", 3.0), ("logprobs", 50), ("repetition_penalty", 0.0)],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert field in str(err.value)
