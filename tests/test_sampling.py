"""Sampling gives the distribution transformers' logits processors give for the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from edgekit.device.sampling import SamplingConfig, distribution, sample


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 50, 1.0, 1.0), (1.0, 0, 0.9, 1.0), (0.8, 40, 0.95, 1.3),
])
def test_distribution_matches_transformers(temperature, top_k, top_p, penalty):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 1000).astype(np.float32)
    seen = rng.integers(0, 1000, 30)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ids, probs = distribution(logits, cfg, seen)
    got = np.zeros(1000)
    got[ids] = probs

    scores = torch.tensor(logits)[None]
    input_ids = torch.tensor(seen)[None]
    scores = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores) if penalty != 1.0 else scores
    scores = TemperatureLogitsWarper(temperature)(input_ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(input_ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(input_ids, scores)
    want = torch.softmax(scores, -1)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_greedy_picks_the_argmax_after_the_penalty():
    logits = np.array([1.0, 3.0, 2.9], np.float32)
    assert sample(logits, SamplingConfig(), np.random.default_rng(), np.empty(0, np.int64)) == 1
    penalised = SamplingConfig(repetition_penalty=2.0)
    assert sample(logits, penalised, np.random.default_rng(), np.array([1])) == 2


def test_seeded_samples_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    cfg = SamplingConfig(temperature=1.0)
    rng = np.random.default_rng(123)
    draws = np.bincount([sample(logits, cfg, rng, np.empty(0, np.int64)) for _ in range(4000)], minlength=3)
    np.testing.assert_allclose(draws / 4000, [0.5, 0.3, 0.2], atol=0.03)


@pytest.mark.parametrize("setting, value, says", [
    ("temperature", float("nan"), "temperature must be 0 (greedy) or a number from 0.0001 to 100, got nan"),
    ("temperature", float("inf"), "temperature must be 0 (greedy)"),
    ("temperature", 1e-300, "got 1e-300"),  # logits / 1e-300 overflow float32: NaN probabilities
    ("temperature", -0.5, "temperature must be"),
    ("temperature", True, "got True"),  # a bool is not a temperature
    ("top_p", float("nan"), "top_p must be a number in (0, 1]"),
    ("top_p", float("-inf"), "top_p must be"),
    ("top_p", 0.0, "top_p must be"),
    ("repetition_penalty", float("nan"), "repetition_penalty must be a number from 0.01 to 100"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be"),
    ("repetition_penalty", 1e-300, "repetition_penalty must be"),
    ("repetition_penalty", 0.0, "repetition_penalty must be"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_k", False, "top_k must be an integer"),
    ("seed", -3, "seed must be an integer >= 0"),
])
def test_a_setting_outside_its_range_is_refused_in_one_line_naming_it(setting, value, says):
    with pytest.raises(ValueError) as e:
        SamplingConfig(**{setting: value})
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("temperature, penalty", [(0.01, 100.0), (100.0, 0.01), (0.01, 0.01), (0, 100.0)])
def test_the_extremes_of_the_ranges_still_sample_finite_probabilities(temperature, penalty):
    rng = np.random.default_rng(1)
    logits = (rng.normal(0, 30, 5000)).astype(np.float32)
    cfg = SamplingConfig(temperature=temperature, repetition_penalty=penalty)
    seen = np.arange(0, 5000, 7)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        token = sample(logits, cfg, rng, seen)
        if temperature:
            _, probs = distribution(logits, cfg, seen)
            assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-5
    assert 0 <= token < 5000


def test_min_p_matches_transformers():
    from transformers import MinPLogitsWarper

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, 1000).astype(np.float32)
    ids, probs = distribution(logits, SamplingConfig(temperature=0.8, min_p=0.05), np.empty(0, np.int64))
    got = np.zeros(1000)
    got[ids] = probs
    scores = MinPLogitsWarper(0.05)(None, TemperatureLogitsWarper(0.8)(None, torch.tensor(logits)[None]))
    np.testing.assert_allclose(got, torch.softmax(scores, -1)[0].numpy(), atol=1e-6)


def test_presence_and_frequency_penalties_and_logit_bias_are_openais():
    """logit - presence * (count > 0) - frequency * count, over the answer's tokens; plus the bias."""
    logits = np.zeros(5, np.float32)
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 3.0})
    from edgekit.device.sampling import adjust

    got = adjust(logits, cfg, np.empty(0, np.int64), np.array([1, 1, 2]))
    np.testing.assert_allclose(got, [0, -1.0, -0.75, 0, 3.0])
    assert logits.tolist() == [0, 0, 0, 0, 0]  # the model's logits are not touched
    banned = SamplingConfig(logit_bias={1: -100.0})
    assert sample(np.array([0.0, 5.0, 1.0], np.float32), banned, np.random.default_rng(), np.empty(0, np.int64)) == 2


def test_generation_reports_the_models_log_probabilities(tiny_bundle):
    from edgekit.device import Model

    done = Model(tiny_bundle).generate("The robot", max_new_tokens=4, temperature=0.0, top_logprobs=3)
    assert len(done.logprobs) == len(done.token_ids)
    first = done.logprobs[0]
    assert first["id"] == done.token_ids[0] and first["top"][0]["id"] == first["id"]  # greedy: the likeliest
    assert first["logprob"] == first["top"][0]["logprob"] <= 0


def test_an_answer_ended_by_eos_has_log_probabilities_for_its_tokens_only(tiny_bundle):
    """EOS is in neither token_ids nor the text; its entry made logprobs one longer than token_ids."""
    from edgekit.device import Model

    model = Model(tiny_bundle)
    eos = min(model.eos_token_ids)
    done = model.generate("The robot", max_new_tokens=4, temperature=0.0, top_logprobs=2, logit_bias={eos: 100.0})
    assert (done.finish_reason, done.token_ids, done.logprobs) == ("eos", [], [])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.sampled_from([2, 65, 1000, 49152]), scale=st.floats(0.1, 30),
       temperature=st.floats(0.05, 2.0), top_k=st.sampled_from([0, 1, 50, 100]), top_p=st.floats(0.01, 1.0),
       ties=st.booleans())
def test_distribution_is_the_head_of_a_full_sort(seed, vocab, scale, temperature, top_k, top_p, ties):
    """Top-p looks only at the head of the distribution (a full sort of 49k logits is most of a
    decode step): the ids, their order and their probabilities are those of a full stable sort."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, vocab).astype(np.float32)
    if ties:
        logits = np.round(logits)  # many equal logits: ordered by id, as a stable sort does
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ids, probs = distribution(logits, cfg, np.empty(0, np.int64))

    z = logits / np.float32(temperature)
    if top_k and top_k < vocab:
        z = np.where(z < np.partition(z, -top_k)[-top_k], -np.inf, z)
    order = np.argsort(-z, kind="stable")
    want = np.exp(z[order] - z[order[0]])
    want /= want.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(want), top_p)) + 1
        order, want = order[:cut], want[:cut] / want[:cut].sum()
    keep = want > 0
    assert ids.tolist() == order[keep].tolist()
    np.testing.assert_allclose(probs, want[keep], rtol=1e-5, atol=1e-7)


def test_an_almost_greedy_temperature_samples_the_argmax_without_overflow():
    logits = np.array([30.0, 29.99, -50.0, 12.0], np.float32)  # real logits' range; 1e-4 scales them to 3e5
    rng = np.random.default_rng(0)
    assert {sample(logits, SamplingConfig(temperature=1e-4), rng, np.empty(0, np.int64)) for _ in range(50)} == {0}
