"""Sampling gives the distribution transformers' logits processors give for the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
