"""GGUF files written as llama.cpp's convert_hf_to_gguf.py writes a Llama, for the GGUF tests.

    write_llama(model, path, extra_kv={...}, extra_tensors={...}, drop_kv=(...))

The tokenizer is SmolLM2's (its metadata copied from the shipped GGUF); the weights are the
transformers model's, with q_proj and k_proj rows permuted as llama.cpp stores them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np


def _permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def shipped_gguf() -> Path:
    from edgekit.host.load import resolve

    src = resolve("smollm2-135m")
    return src.folder / src.gguf_file


@functools.cache
def _shipped_tokenizer() -> list[tuple]:
    """The shipped GGUF's tokenizer.* metadata as (key, value, type, array item type or None): read
    once per test run (gguf-py takes 5 s to parse its 49k tokens and merges)."""
    shipped = gguf.GGUFReader(str(shipped_gguf()))
    return [(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
            for key, field in shipped.fields.items() if key.startswith("tokenizer.")]


def write_llama(model, path: Path, extra_kv: dict | None = None, extra_tensors: dict | None = None,
                drop_kv: tuple = ()) -> Path:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    kv = {"llama.block_count": c.num_hidden_layers, "llama.context_length": c.max_position_embeddings,
          "llama.embedding_length": c.hidden_size, "llama.feed_forward_length": c.intermediate_size,
          "llama.attention.head_count": c.num_attention_heads,
          "llama.attention.head_count_kv": c.num_key_value_heads,
          "llama.rope.freq_base": float(c.rope_parameters["rope_theta"]),
          "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "llama.vocab_size": c.vocab_size,
          "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads, **(extra_kv or {})}
    for key, value in kv.items():
        if key not in drop_kv:
            {int: w.add_uint32, float: w.add_float32, str: w.add_string}[type(value)](key, value)
    for key, value, kind, sub_type in _shipped_tokenizer():
        if key not in drop_kv and key not in kv:
            w.add_key_value(key, value, kind, sub_type=sub_type)
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            out = "output.weight"
        elif name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        else:
            _, _, i, part = name.split(".", 3)
            module = part.rsplit(".", 1)[0]
            out = f"blk.{i}.{NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                data = _permute(data, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                data = _permute(data, c.num_key_value_heads)
        w.add_tensor(out, data)
    for out, data in (extra_tensors or {}).items():
        w.add_tensor(out, np.asarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
