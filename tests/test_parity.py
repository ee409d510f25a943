"""The exported fp32 graph computes what transformers computes.

Tolerance: logits within 1e-4 absolute of transformers' (float32 on both sides), on a
prompt and on 16 cached decode steps, for each supported architecture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.device import Model
from edgekit.host import export

ATOL = 1e-4
PROMPT = "The robot arm lifted the red cube and placed it on the shelf, then"


def hf_logits_with_cache(model, prompt_ids: list[int], steps: list[int]) -> list[np.ndarray]:
    """transformers' logits for the prompt, then for each of `steps` fed one at a time with its cache."""
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        result = [out.logits[0].numpy()]
        past = out.past_key_values
        for tok in steps:
            out = model(torch.tensor([[tok]]), cache=past, use_cache=True)
            past = out.past_key_values
            result.append(out.logits[0, -1].numpy())
    return result


def check_parity(bundle, hf_model, tokenizer, decode_steps: int = 16) -> float:
    """Largest |edgekit - transformers| over the prompt's logits and `decode_steps` cached steps."""
    ids = tokenizer(PROMPT).input_ids
    rng = np.random.default_rng(0)
    steps = rng.integers(0, hf_model.config.vocab_size, decode_steps).tolist()
    want = hf_logits_with_cache(hf_model, ids, steps)
    model = Model(bundle)
    got = [model.forward(ids, 0, all_logits=True)]
    for k, tok in enumerate(steps):
        got.append(model.forward([tok], len(ids) + k)[0])
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    assert got[0].shape == want[0].shape
    return worst


ARCHITECTURES = {
    "llama-gqa": ("llama", {}),
    "llama-mha-untied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
    "llama-attention-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "llama-rope-llama3": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}}),
    "llama-rope-yarn": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}}),
    "llama-rope-dynamic": ("llama", {"rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 20}}),  # ignored by transformers: 15 + 16 tokens run as default rope
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tiny_model_logits_match_transformers(name, make_tiny, smol_tokenizer, tmp_path):
    model_type, config = ARCHITECTURES[name]
    folder, hf_model = make_tiny(model_type, **config)
    bundle = export(folder, tmp_path / "bundle", progress=lambda _: None)
    worst = check_parity(bundle, hf_model, smol_tokenizer)
    assert worst < ATOL, f"{name}: max |logits diff| {worst:.2e} >= {ATOL}"


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_bundle, smollm2_hf):
    worst = check_parity(smollm2_bundle, smollm2_hf.model, smollm2_hf.tokenizer)
    assert worst < ATOL, f"max |logits diff| {worst:.2e} >= {ATOL}"


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_identical_to_transformers_generate(smollm2_bundle, smollm2_hf):
    messages = [{"role": "user", "content": "What is a Raspberry Pi?"}]
    tok = smollm2_hf.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = smollm2_hf.model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64,
                                        do_sample=False)
    want = out[0, len(ids):].tolist()

    model = Model(smollm2_bundle)
    assert model.encode(messages) == list(ids)  # the device renders the chat template identically
    logits, _ = model.prefill(ids)
    got = []
    for _ in range(64):  # no EOS stop, to compare all 64 like min_new_tokens does
        got.append(int(np.argmax(logits)))
        logits = model.step(got[-1])
    assert got == want
