"""GGUF files: the bundle computes the model the file holds, or export says in one line why it cannot.

transformers' GGUF loader reads what it knows and skips the rest (biases, rope factor tables, rope
scaling keys): a bundle built on what it returned matched transformers and computed another model.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from gguf_files import write_llama

from edgekit.device import Model
from edgekit.host import ExportError, export

QUIET = dict(progress=lambda _: None)


@pytest.fixture(scope="module")
def llama(make_tiny):
    folder, model = make_tiny("llama")
    return model


def last_logits(bundle, ids: list[int]) -> np.ndarray:
    return Model(bundle).forward(ids, 0)[-1]


def test_a_gguf_exports_the_model_it_holds_from_any_working_directory(llama, make_tiny, tmp_path, monkeypatch):
    """transformers looked for the file's bare name in the working directory first: a model.gguf there
    gave its weights to the config of the file asked for; a tokenizer.json beside the file replaced
    the GGUF's own tokenizer."""
    for folder in ("a", "cwd"):
        (tmp_path / folder).mkdir()
    write_llama(llama, tmp_path / "a" / "model.gguf")
    write_llama(make_tiny("llama", seed=1)[1], tmp_path / "cwd" / "model.gguf")  # another model, same shape
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "cwd")
    bundle = export(tmp_path / "a" / "model.gguf", tmp_path / "b", **QUIET)
    ids = [1, 504, 3458, 282, 260, 1010]
    want = llama(torch.tensor([ids])).logits[0, -1].detach().numpy()
    np.testing.assert_allclose(last_logits(bundle, ids), want, atol=1e-4)
    assert Model(bundle).tokenizer.get_vocab_size() == 49152
    assert Model(bundle).manifest.source.name_or_path == str(tmp_path / "a")  # not the folder it was read through


@pytest.mark.parametrize("change, says", [
    (dict(extra_tensors={"blk.0.attn_q.bias": np.ones(64)}), "left out 64 of the file's"),  # attention_bias
    (dict(extra_tensors={"rope_freqs.weight": np.ones(8)}), "left out 8"),  # Llama 3's rope as a table
    (dict(extra_kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
     "rope scaling (linear) is not carried over"),
    (dict(extra_kv={"llama.block_count": 3_000_000}), "says 3000000 layers but holds tensors for 2"),  # not built
    (dict(drop_kv=("tokenizer.ggml.tokens",)), "holds no tokenizer"),  # was "'tokens'"
    (dict(extra_kv={"tokenizer.ggml.bos_token_id": 999_999}), "bos_token_id is 999999, past its 49152 tokens"),
])
def test_what_transformers_would_drop_or_trip_on_is_refused_in_one_line(change, says, llama, tmp_path):
    path = write_llama(llama, tmp_path / "m.gguf", **change)
    with pytest.raises(ExportError, match=re.escape(says)) as e:
        export(path, tmp_path / "b", **QUIET)
    assert "\n" not in str(e.value)


def test_the_gguf_end_of_turn_token_ends_generation(llama, tmp_path):
    """llama.cpp stops at eos and at eot (Gemma's <end_of_turn>); the bundle knew only eos."""
    path = write_llama(llama, tmp_path / "m.gguf", extra_kv={"tokenizer.ggml.eot_token_id": 0})
    bundle = export(path, tmp_path / "b", **QUIET)
    assert json.loads((bundle / "edgekit.json").read_text())["generation"]["eos_token_ids"] == [0, 2]
    done = Model(bundle).generate("Hi", max_new_tokens=5, temperature=0, logit_bias={0: 100})
    assert done.finish_reason == "eos" and done.token_ids == []


def test_loading_a_gguf_parses_it_once_and_leaves_gguf_py_as_it_was(llama, tmp_path, monkeypatch):
    """transformers parsed the file four times (config, model twice, tokenizer) after edgekit's own
    read, built gguf-py's tensor name map for every module and decoded every metadata value at each
    read: 28 of the 34 s it took to load the shipped SmolLM2."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    from edgekit.host.load import load

    path = write_llama(llama, tmp_path / "m.gguf")
    parsed, name_maps, decoded = [], [], Counter()
    make, name_map = gguf.GGUFReader.__init__, gguf.tensor_mapping.TensorNameMap.__init__
    parse = hf_gguf._gguf_parse_value

    def counted(self, path, *args, **kwargs):
        parsed.append(path)
        make(self, path, *args, **kwargs)

    def counted_map(self, *args):
        name_maps.append(args)
        name_map(self, *args)

    def counted_value(part, types):
        decoded[id(part)] += 1
        return parse(part, types)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted)
    monkeypatch.setattr(gguf.tensor_mapping.TensorNameMap, "__init__", counted_map)
    monkeypatch.setattr(hf_gguf, "_gguf_parse_value", counted_value)
    loaded = load(path)
    assert [str(p) for p in parsed] == [str(path.resolve())]
    assert len(name_maps) == 1 and decoded and set(decoded.values()) == {1}
    # what the load shared is gone with it
    assert isinstance(gguf.GGUFReader, type) and hf_gguf._gguf_parse_value is counted_value
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map
    ids = [1, 504, 3458]
    np.testing.assert_allclose(loaded.model(torch.tensor([ids])).logits.detach().numpy(),
                               llama(torch.tensor([ids])).logits.detach().numpy(), atol=1e-5)
