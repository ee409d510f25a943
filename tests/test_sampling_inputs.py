"""What the runtime takes in, at every door (Python API, CLI, MQTT): sampling settings and prompt text.

Property-based (hypothesis): a setting is refused with one ValueError line that names it, or
sampling with it gives finite probabilities; a prompt is refused with one line when it holds a
lone surrogate (what Python makes of invalid UTF-8 in argv), or it tokenizes.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgekit.device.sampling import ALLOWED, SamplingConfig, distribution, sample

PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**400), 10**400),
                    st.booleans(), st.sampled_from([0, 0.0, 1e-300, 5e-324, 0.01, 100, 100.0001, 1e300]),
                    st.none(), st.text(max_size=3))
surrogate_text = st.tuples(st.text(max_size=10), st.integers(0xD800, 0xDFFF).map(chr), st.text(max_size=10)) \
    .map("".join)


@PROPERTY
@given(temperature=numbers, top_k=numbers, top_p=numbers, repetition_penalty=numbers,
       seed=st.none() | st.integers(-(2**70), 2**70) | st.booleans(), scale=st.sampled_from([1.0, 30.0, 1e3]))
@example(temperature=1e-300, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, scale=30.0)
@example(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1e-300, seed=None, scale=30.0)
@example(temperature=float("nan"), top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, scale=1.0)
def test_a_sampling_config_is_refused_in_one_line_or_samples_finite_probabilities(
        temperature, top_k, top_p, repetition_penalty, seed, scale):
    try:
        cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed)
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 200
        name = message.split()[0]
        assert name in ALLOWED and message.startswith(f"{name} must be {ALLOWED[name]}, got ")
        return
    rng = np.random.default_rng(0)
    logits = (rng.normal(0, 1, 2000) * scale).astype(np.float32)
    seen = rng.integers(0, 2000, 50)
    # within the accepted ranges nothing overflows: no inf, no NaN, no warning
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        token = sample(logits, cfg, np.random.default_rng(cfg.seed), seen)
        if cfg.temperature:
            ids, probs = distribution(logits, cfg, seen)
            assert len(ids) >= 1 and np.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-4
    assert 0 <= token < 2000


@pytest.fixture(scope="module")
def model(tiny_bundle):
    from edgekit.device import Model

    return Model(tiny_bundle, threads=1)


@PROPERTY
@given(text=st.one_of(st.text(max_size=40), surrogate_text))
@example(text="\udcff")
@example(text="caf\udce9")  # b"caf\xe9" (Latin-1) decoded as UTF-8 with surrogateescape, as argv is
def test_a_prompt_with_a_lone_surrogate_is_refused_in_one_line_before_tokenizing(model, text):
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    if not has_surrogate:
        assert all(isinstance(i, int) for i in model.encode(text))
        return
    for call in (lambda: model.encode(text), lambda: model.stream(text, max_new_tokens=1)):
        with pytest.raises(ValueError) as e:
            call()
        assert "lone surrogate" in str(e.value) and "\n" not in str(e.value)


def _generate(bundle, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", "generate", str(bundle), *args],
                          capture_output=True, timeout=120, check=False)


@pytest.mark.parametrize("args, says", [
    (["hi", "--temperature", "nan"], b"temperature must be 0 (greedy) or a number from 0.0001 to 100, got nan"),
    (["hi", "--temperature", "1e-300"], b"temperature must be"),
    (["hi", "--top-p", "inf"], b"top_p must be"),
    (["hi", "--repetition-penalty", "nan"], b"repetition_penalty must be"),
    ([b"caf\xe9 au lait".decode("utf-8", "surrogateescape")], b"lone surrogate"),  # invalid UTF-8 in argv
])
def test_generate_refuses_a_bad_setting_or_prompt_in_one_line(tiny_bundle, args, says):
    r = _generate(tiny_bundle, *args, "--max-new-tokens", "2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and says in lines[0] and b"Traceback" not in r.stderr
