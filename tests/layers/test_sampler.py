import math

import numpy as np
import pytest
import torch

from sparsa.layers.sampler import Sampler, SamplerOutput
from sparsa.sampling_params import SamplingParams

# Chi-square critical values at p = 0.001 by degrees of freedom. Draws use fixed
# seeds, so the tests are deterministic; the threshold only guards correctness.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}
N_DRAWS = 10000

# 8-token vocabulary with well separated probabilities, so top-p / min-p
# boundaries are far from float round-off.
BASE_PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.035, 0.015])
BASE_LOGITS = np.log(BASE_PROBS)
# Mixed-sign logits for the repetition penalty (it treats signs differently).
MIXED_LOGITS = np.array([1.2, 0.8, -0.3, 0.5, -1.0, 0.1, -0.6, 0.0])


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def draw(
    logits: np.ndarray,
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    n: int = N_DRAWS,
    seeded: bool = False,
    eos: set[int] | None = None,
) -> np.ndarray:
    """Token counts of ``n`` independent samples from the same row."""
    torch.manual_seed(1234)
    batch = torch.tensor(logits, dtype=torch.float32).expand(n, -1).contiguous()
    if seeded:
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
    else:
        gens = [None] * n
    out = Sampler(eos or ())(batch, [params] * n, [prompt or []] * n, [output or []] * n, gens)
    return np.bincount(np.array(out.token_ids), minlength=len(logits))


def assert_distribution(counts: np.ndarray, expected: np.ndarray) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    assert math.isclose(expected.sum(), 1.0, rel_tol=1e-9)
    zero = expected == 0
    assert counts[zero].sum() == 0, f"excluded tokens were sampled: {counts} vs {expected}"
    n = counts.sum()
    exp_counts = expected[~zero] * n
    chi2 = float(((counts[~zero] - exp_counts) ** 2 / exp_counts).sum())
    dof = int((~zero).sum()) - 1
    if dof == 0:
        return
    assert chi2 < CHI2_CRIT[dof], f"chi2={chi2:.1f} dof={dof} counts={counts} exp={exp_counts}"


def renorm(p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def expected_top_k(p: np.ndarray, k: int) -> np.ndarray:
    keep = np.zeros(len(p), dtype=bool)
    keep[np.argsort(-p)[:k]] = True
    return renorm(p, keep)


def expected_top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-p)
    keep = np.zeros(len(p), dtype=bool)
    mass = 0.0
    for i in order:
        keep[i] = True
        mass += p[i]
        if mass >= top_p:
            break
    return renorm(p, keep)


def expected_min_p(p: np.ndarray, min_p: float) -> np.ndarray:
    return renorm(p, p >= min_p * p.max())


# --------------------------------------------------------------------- greedy


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    params = [SamplingParams(temperature=0.0)] * 5
    out = Sampler()(logits, params, [[]] * 5, [[]] * 5, [None] * 5)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.top_logprobs == [None] * 5


def test_greedy_mixed_with_random_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=0.0, top_k=3),
        SamplingParams(temperature=0.8, min_p=0.1),
    ]
    out = Sampler()(logits, params, [[]] * 4, [[]] * 4, [None] * 4)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()


def test_greedy_applies_penalties() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    out = Sampler()(logits, [p], [[0]], [[]], [None])
    assert out.token_ids == [1]  # 2.0 / 1.5 < 1.9
    p = SamplingParams(temperature=0.0, presence_penalty=0.5)
    out = Sampler()(logits, [p], [[]], [[0]], [None])
    assert out.token_ids == [1]


def test_input_logits_not_modified() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    ref = logits.clone()
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, min_tokens=2),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, frequency_penalty=0.5),
        SamplingParams(temperature=1.3, min_p=0.2, presence_penalty=1.0),
    ]
    Sampler(eos_token_ids={3})(logits, params, [[1, 2]] * 3, [[4, 4]] * 3, [None] * 3)
    assert torch.equal(logits, ref)


def test_batch_length_mismatch() -> None:
    with pytest.raises(ValueError, match="one entry per logits row"):
        Sampler()(torch.zeros(2, 4), [SamplingParams()], [[]], [[]], [None])
    with pytest.raises(ValueError, match="batch, vocab"):
        Sampler()(torch.zeros(4), [SamplingParams()], [[]], [[]], [None])


# -------------------------------------------------------------- reproducibility


def _run_steps(
    logits_seq: list[torch.Tensor],
    row_params: SamplingParams,
    seed: int,
    position: int,
    others: list[SamplingParams],
) -> list[int]:
    """Samples one target row over several steps, placed at ``position`` among ``others``."""
    sampler = Sampler()
    gen = torch.Generator().manual_seed(seed)
    other_gens = [torch.Generator().manual_seed(99 + i) if i % 2 else None for i in range(10)]
    tokens: list[int] = []
    for step_logits in logits_seq:
        params = list(others)
        params.insert(position, row_params)
        gens = list(other_gens[: len(others)])
        gens.insert(position, gen)
        b = len(params)
        rows = [torch.randn(step_logits.shape[-1]) for _ in range(b)]
        rows[position] = step_logits
        out = sampler(torch.stack(rows), params, [[1, 2, 3]] * b, [tokens] * b, gens)
        tokens.append(out.token_ids[position])
    return tokens


@pytest.mark.parametrize(
    "row_params",
    [
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=0),
        SamplingParams(temperature=1.2, repetition_penalty=1.2, frequency_penalty=0.3, seed=0),
    ],
)
def test_seeded_reproducible_across_batches(row_params: SamplingParams) -> None:
    g = torch.Generator().manual_seed(5)
    logits_seq = [torch.randn(1000, generator=g) * 2 for _ in range(20)]
    alone = _run_steps(logits_seq, row_params, seed=42, position=0, others=[])
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=0.5, top_k=7),
        SamplingParams(temperature=1.5, min_p=0.2, presence_penalty=0.5),
    ]
    torch.manual_seed(7)
    in_batch = _run_steps(logits_seq, row_params, seed=42, position=2, others=others)
    torch.manual_seed(8)
    at_end = _run_steps(logits_seq, row_params, seed=42, position=4, others=others)
    assert alone == in_batch == at_end
    other_seed = _run_steps(logits_seq, row_params, seed=43, position=0, others=[])
    assert other_seed != alone


def test_seeded_rows_with_same_seed_match_within_batch() -> None:
    torch.manual_seed(0)
    row = torch.randn(500)
    p = SamplingParams(temperature=1.0)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 3)]
    out = Sampler()(row.expand(3, -1), [p] * 3, [[]] * 3, [[]] * 3, gens)
    assert out.token_ids[0] == out.token_ids[2]


def test_unseeded_uses_global_rng() -> None:
    logits = torch.zeros(64, 1000)
    params = [SamplingParams()] * 64
    torch.manual_seed(11)
    a = Sampler()(logits, params, [[]] * 64, [[]] * 64, [None] * 64).token_ids
    torch.manual_seed(11)
    b = Sampler()(logits, params, [[]] * 64, [[]] * 64, [None] * 64).token_ids
    c = Sampler()(logits, params, [[]] * 64, [[]] * 64, [None] * 64).token_ids
    assert a == b
    assert a != c


# ------------------------------------------------------------ distributions


@pytest.mark.parametrize("seeded", [False, True])
def test_plain_sampling_distribution(seeded: bool) -> None:
    counts = draw(BASE_LOGITS, SamplingParams(temperature=1.0), seeded=seeded)
    assert_distribution(counts, BASE_PROBS)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_distribution(temperature: float) -> None:
    counts = draw(BASE_LOGITS, SamplingParams(temperature=temperature))
    assert_distribution(counts, np_softmax(BASE_LOGITS / temperature))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_distribution(k: int) -> None:
    counts = draw(BASE_LOGITS, SamplingParams(top_k=k))
    assert_distribution(counts, expected_top_k(BASE_PROBS, k))


@pytest.mark.parametrize("k", [-1, 0, 8, 100])
def test_top_k_disabled_or_too_large(k: int) -> None:
    counts = draw(BASE_LOGITS, SamplingParams(top_k=k))
    assert_distribution(counts, BASE_PROBS)


def test_top_k_keeps_ties() -> None:
    logits = np.array([1.0, 2.0, 2.0, 0.5, 2.0])
    counts = draw(logits, SamplingParams(top_k=2), n=3000)
    assert_distribution(counts, np.array([0.0, 1 / 3, 1 / 3, 0.0, 1 / 3]))


@pytest.mark.parametrize("top_p", [0.25, 0.45, 0.6, 0.75, 0.93])
def test_top_p_distribution(top_p: float) -> None:
    counts = draw(BASE_LOGITS, SamplingParams(top_p=top_p))
    assert_distribution(counts, expected_top_p(BASE_PROBS, top_p))


def test_top_p_with_temperature() -> None:
    counts = draw(BASE_LOGITS, SamplingParams(temperature=0.5, top_p=0.7))
    assert_distribution(counts, expected_top_p(np_softmax(BASE_LOGITS / 0.5), 0.7))


@pytest.mark.parametrize("min_p", [0.1, 0.35, 0.5, 1.0])
def test_min_p_distribution(min_p: float) -> None:
    counts = draw(BASE_LOGITS, SamplingParams(min_p=min_p))
    assert_distribution(counts, expected_min_p(BASE_PROBS, min_p))


def test_top_k_top_p_min_p_combined() -> None:
    # Order: temperature, top-k, top-p (on the renormalized top-k set), min-p.
    t, k, top_p, min_p = 1.5, 6, 0.8, 0.4
    p = np_softmax(BASE_LOGITS / t)
    p = expected_top_k(p, k)
    p = expected_top_p(p, top_p)
    p = expected_min_p(p, min_p)
    counts = draw(BASE_LOGITS, SamplingParams(temperature=t, top_k=k, top_p=top_p, min_p=min_p))
    assert_distribution(counts, p)


def test_mixed_batch_distributions() -> None:
    """Different filters in one batch must not leak into each other's rows."""
    n = 3000
    specs = [
        (SamplingParams(top_k=2), expected_top_k(BASE_PROBS, 2)),
        (SamplingParams(top_p=0.6), expected_top_p(BASE_PROBS, 0.6)),
        (SamplingParams(min_p=0.35), expected_min_p(BASE_PROBS, 0.35)),
        (SamplingParams(), BASE_PROBS),
    ]
    params = [s[0] for s in specs for _ in range(n)]
    logits = torch.tensor(BASE_LOGITS, dtype=torch.float32).expand(len(params), -1)
    torch.manual_seed(3)
    out = Sampler()(logits, params, [[]] * len(params), [[]] * len(params), [None] * len(params))
    toks = np.array(out.token_ids).reshape(len(specs), n)
    for j, (_, expected) in enumerate(specs):
        assert_distribution(np.bincount(toks[j], minlength=8), expected)


# ---------------------------------------------------------------- penalties


def expected_repetition(logits: np.ndarray, seen: set[int], penalty: float) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for t in seen:
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


@pytest.mark.parametrize("penalty", [1.8, 0.6])
def test_repetition_penalty_distribution(penalty: float) -> None:
    prompt, output = [0, 2, 2], [4, 5]
    counts = draw(MIXED_LOGITS, SamplingParams(repetition_penalty=penalty), prompt, output)
    expected = np_softmax(expected_repetition(MIXED_LOGITS, {0, 2, 4, 5}, penalty))
    assert_distribution(counts, expected)


def test_presence_frequency_distribution() -> None:
    output = [0, 0, 0, 1, 3, 3]
    pres, freq = 0.7, 0.4
    counts = draw(
        MIXED_LOGITS,
        SamplingParams(presence_penalty=pres, frequency_penalty=freq),
        prompt=[2, 5, 6],  # prompt tokens are not penalized by presence/frequency
        output=output,
    )
    occ = np.bincount(output, minlength=8).astype(np.float64)
    expected = np_softmax(MIXED_LOGITS - pres * (occ > 0) - freq * occ)
    assert_distribution(counts, expected)


def test_negative_presence_frequency_distribution() -> None:
    output = [6, 7, 7]
    counts = draw(
        BASE_LOGITS, SamplingParams(presence_penalty=-0.5, frequency_penalty=-0.3), output=output
    )
    occ = np.bincount(output, minlength=8).astype(np.float64)
    assert_distribution(counts, np_softmax(BASE_LOGITS + 0.5 * (occ > 0) + 0.3 * occ))


def test_all_penalties_with_temperature() -> None:
    prompt, output = [1, 7], [0, 0, 3]
    rep, pres, freq, t = 1.4, 0.3, 0.2, 0.8
    params = SamplingParams(
        temperature=t, repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq
    )
    counts = draw(MIXED_LOGITS, params, prompt, output)
    x = expected_repetition(MIXED_LOGITS, {0, 1, 3, 7}, rep)
    occ = np.bincount(output, minlength=8).astype(np.float64)
    x = x - pres * (occ > 0) - freq * occ
    assert_distribution(counts, np_softmax(x / t))


# --------------------------------------------------------------- min_tokens


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = np.array([0.0, 0.0, 3.0, 3.0, 0.0, 3.0])
    p = SamplingParams(min_tokens=3, stop_token_ids=[3])
    counts = draw(logits, p, output=[0, 1], eos={2}, n=2000)
    expected = np_softmax(np.where(np.isin(np.arange(6), [2, 3]), -np.inf, logits))
    assert_distribution(counts, expected)
    # Once min_tokens outputs exist, EOS and stop ids are allowed again.
    counts = draw(logits, p, output=[0, 1, 4], eos={2}, n=2000)
    assert_distribution(counts, np_softmax(logits))


def test_min_tokens_greedy_and_ignore_eos() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    sampler = Sampler(eos_token_ids={2})
    out = sampler(logits, [SamplingParams(temperature=0, min_tokens=1)], [[]], [[]], [None])
    assert out.token_ids == [3]
    p = SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[3])
    assert sampler(logits, [p], [[]], [[]], [None]).token_ids == [1]
    # ignore_eos: EOS does not end the request, so it is not masked.
    p = SamplingParams(temperature=0, min_tokens=1, ignore_eos=True)
    assert sampler(logits, [p], [[]], [[]], [None]).token_ids == [2]
    # The per-call argument overrides the constructor's EOS set.
    p = SamplingParams(temperature=0, min_tokens=1)
    assert sampler(logits, [p], [[]], [[]], [None], eos_token_ids={1}).token_ids == [2]


# ----------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=1.0, presence_penalty=1.0, min_p=0.2, logprobs=0),
        SamplingParams(temperature=2.0, top_p=0.5),
    ]
    out = Sampler()(logits, params, [[1, 2, 3]] * 4, [[4, 5]] * 4, [None] * 4)
    ref = np_log_softmax(logits.double().numpy())
    for i in range(3):
        assert out.logprobs[i] == pytest.approx(ref[i, out.token_ids[i]], abs=1e-5)
    assert out.logprobs[3] is None  # not asked for: no logsumexp
    assert out.top_logprobs[2] == []
    assert out.top_logprobs[3] is None
    for i, n in ((0, 5), (1, 3)):
        top = out.top_logprobs[i]
        assert top is not None and len(top) == n
        want = np.argsort(-ref[i])[:n]
        assert [t for t, _ in top] == want.tolist()
        for t, lp in top:
            assert isinstance(t, int) and isinstance(lp, float)
            assert lp == pytest.approx(ref[i, t], abs=1e-5)
    assert out.token_ids[0] == int(np.argmax(ref[0]))


def test_logprobs_more_than_vocab() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0, logprobs=20)], [[]], [[]], [None])
    ref = np_log_softmax(logits.double().numpy())[0]
    assert [t for t, _ in out.top_logprobs[0]] == [2, 1, 0]
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(ref[[2, 1, 0]], abs=1e-6)
