"""The device-side perplexity evaluator agrees with transformers' loss on the same windows.

Text: CPython's bundled documentation (pydoc_data), present on every installation.
Tolerance: tiny fp32 models 1e-4 relative (the graph's logits match transformers' to
1e-4 absolute); the real SmolLM2 0.5% (the issue's bar).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgekit.cli import main
from edgekit.device import Model
from edgekit.device.perplexity import DEFAULT_WINDOW, EvalTextError, log_softmax_nll, perplexity, windows_of
from edgekit.host import ExportOptions, export
from edgekit.host.quant.calibration import default_text


def transformers_perplexity(hf_model, ids: list[int], window: int) -> float:
    """exp(mean loss) over the same non-overlapping windows, weighting each by its scored tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows_of(ids, window):
            t = torch.tensor([chunk])
            loss = hf_model(t, labels=t).loss.item()  # mean over len(chunk) - 1 predictions
            total += loss * (len(chunk) - 1)
            count += len(chunk) - 1
    return math.exp(total / count)


def test_windows_do_not_overlap_and_keep_a_short_tail():
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows_of(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    assert windows_of(list(range(10)), 4, max_tokens=6) == [[0, 1, 2, 3], [4, 5]]


def test_nll_is_cross_entropy():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor([0, 2]), reduction="none")
    assert np.allclose(log_softmax_nll(logits, np.array([0, 2])), want.numpy(), atol=1e-6)


def test_tiny_bundle_perplexity_matches_transformers(make_tiny, tmp_path):
    folder, hf_model = make_tiny("llama", seed=5)
    bundle = export(folder, tmp_path / "b", progress=lambda _: None)
    model = Model(bundle)
    text = default_text()[:4000]
    got = perplexity(model, text, window=96)
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    want = transformers_perplexity(hf_model, ids, 96)
    assert got.tokens == len(ids) - got.windows and got.windows == len(windows_of(ids, 96))
    assert abs(got.perplexity / want - 1) < 1e-4, (got.perplexity, want)


def test_unusable_text_or_window_is_a_clear_error(tiny_bundle):
    model = Model(tiny_bundle)
    with pytest.raises(EvalTextError, match="perplexity needs at least 2"):
        perplexity(model, "Hi", window=16)
    with pytest.raises(EvalTextError, match="exceeds the bundle's context length"):
        perplexity(model, default_text()[:2000], window=model.context_length + 1)


def test_eval_compare_prints_size_perplexity_and_delta(make_tiny, tmp_path, capsys):
    folder, _ = make_tiny("llama", tie_word_embeddings=True)
    fp32 = export(folder, tmp_path / "fp32", progress=lambda _: None)
    q4 = export(folder, tmp_path / "q4", ExportOptions(quant="rtn", bits=4, group_size=32), progress=lambda _: None)
    text = tmp_path / "t.txt"
    text.write_text(default_text()[:3000])
    assert main(["eval", "compare", str(fp32), str(q4), "--text", str(text), "--window", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["bundle", "quantization", "size", "MB", "perplexity", "delta"]
    assert out[1].startswith(str(fp32)) and out[1].endswith("+0.00%")
    assert "rtn int4 g32" in out[2]  # Quantization.label
    first, second = (float(line.split()[-2]) for line in out[1:3])
    assert first == pytest.approx(perplexity(Model(fp32), text.read_text(), 64).perplexity, rel=1e-6)
    assert second != first  # the 4-bit bundle is a different model

    assert main(["eval", "perplexity", str(q4), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_bundle_with_a_short_context_is_scored_in_windows_of_its_whole_context(tiny_bundle, tmp_path, capsys):
    model = Model(tiny_bundle)
    assert model.context_length < DEFAULT_WINDOW  # the tiny model's context is 256
    text = tmp_path / "t.txt"
    text.write_text(default_text()[:6000])
    assert main(["eval", "perplexity", str(tiny_bundle), "--text", str(text)]) == 0
    want = perplexity(model, text.read_text(), window=model.context_length)
    assert f"perplexity {want.perplexity:.4f}" in capsys.readouterr().out
    assert perplexity(model, text.read_text()).window == model.context_length
    assert main(["eval", "perplexity", str(tiny_bundle), "--text", str(text), "--window", "1"]) == 2
    assert "--window must be at least 2" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers_within_half_a_percent(smollm2_bundle, smollm2_hf):
    model = Model(smollm2_bundle)
    text = default_text()
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids[:2048]
    got = perplexity(model, model.tokenizer.decode(ids), window=512, max_tokens=2048)
    ids = model.tokenizer.encode(model.tokenizer.decode(ids), add_special_tokens=False).ids[:2048]
    want = transformers_perplexity(smollm2_hf.model, ids, 512)
    assert abs(got.perplexity / want - 1) < 0.005, (got.perplexity, want)
