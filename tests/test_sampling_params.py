import pytest

from sparsa.sampling_params import SamplingParams, SamplingType


def test_defaults() -> None:
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.min_p == 0.0
    assert p.max_tokens == 16
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.logprobs is None
    assert p.skip_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert not p.is_greedy
    assert p.sampling_type is SamplingType.RANDOM
    assert not p.has_penalties


def test_normalization() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    p = SamplingParams(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert isinstance(p.repetition_penalty, float)


def test_sampling_type() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=5e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(seed=7).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.0, seed=7).sampling_type is SamplingType.GREEDY


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0),
        dict(top_k=-1),
        dict(top_k=1),
        dict(top_p=1e-3),
        dict(min_p=1.0),
        dict(repetition_penalty=1e-3),
        dict(presence_penalty=-2.0, frequency_penalty=2.0),
        dict(max_tokens=None, min_tokens=100),
        dict(max_tokens=5, min_tokens=5),
        dict(logprobs=0),
        dict(logprobs=20),
        dict(seed=0),
        dict(seed=-1),
        dict(seed=2**64 - 1),
        dict(n=4, temperature=0.7),
        dict(stop=None, stop_token_ids=None),
    ],
)
def test_valid(kwargs: dict) -> None:
    SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0), "n must be at least 1"),
        (dict(n=True), "n must be an int"),
        (dict(n=2.0), "n must be an int"),
        (dict(n=2, temperature=0.0), "n must be 1 when using greedy"),
        (dict(temperature=-0.1), "temperature must be non-negative"),
        (dict(temperature="0.5"), "temperature must be a number"),
        (dict(temperature=None), "temperature must be a number"),
        (dict(temperature=True), "temperature must be a number"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-0.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be 0 or -1"),
        (dict(top_k=2.5), "top_k must be an int"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be greater than 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be greater than 0"),
        (dict(presence_penalty=2.1), r"presence_penalty must be in \[-2, 2\]"),
        (dict(presence_penalty=-2.1), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=3.0), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3.0), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(seed=1.5), "seed must be an int or None"),
        (dict(seed="42"), "seed must be an int or None"),
        (dict(seed=False), "seed must be an int or None"),
        (dict(seed=2**64), "seed must be in"),
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(max_tokens=-5), "max_tokens must be at least 1"),
        (dict(max_tokens=3.0), "max_tokens must be an int or None"),
        (dict(min_tokens=-1), "min_tokens must be non-negative"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens must be at most max_tokens"),
        (dict(min_tokens=None), "min_tokens must be an int"),
        (dict(logprobs=-1), r"logprobs must be in \[0, 20\]"),
        (dict(logprobs=21), r"logprobs must be in \[0, 20\]"),
        (dict(logprobs=True), "logprobs must be an int or None"),
        (dict(stop=""), "stop must not contain empty strings"),
        (dict(stop=["ok", ""]), "stop must not contain empty strings"),
        (dict(stop=[1]), "stop must contain only strings"),
        (dict(stop=5), "stop must be a str"),
        (dict(stop_token_ids=[1, "2"]), "stop_token_ids must contain only ints"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be non-negative"),
        (dict(stop_token_ids=5), "stop_token_ids must be a list"),
        (dict(ignore_eos=1), "ignore_eos must be a bool"),
        (dict(skip_special_tokens="yes"), "skip_special_tokens must be a bool"),
        (dict(include_stop_str_in_output=None), "include_stop_str_in_output must be a bool"),
    ],
)
def test_invalid(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
