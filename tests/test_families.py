"""Every model family and variant edgekit exports, on a tiny random model built from a transformers
config: the bundle computes what transformers (eager attention) computes.

Held, for each variant and both graph flavours: logits within 1e-4 of transformers' on a prompt
and on 32 cached decode steps; 32 of 32 greedy tokens the same; and a GPTQ int4 bundle of the
same model exports and generates. Unsupported settings are refused with one line that names
them. (Llama, Mistral and Qwen2 variants: tests/test_parity.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import ATOL, PROMPT, check_parity

from edgekit.device import Model
from edgekit.host import ExportError, ExportOptions, export

STEPS = 32
QUIET = dict(progress=lambda _: None)
PORTABLE = dict(target="jetson-orin-nano", quant="none")  # the portable flavour, weights left in fp32


def longrope(rotary_dim: int, original: int, **extra) -> dict:
    """LongRoPE factors for a tiny head (one per frequency), switching at `original` positions."""
    n = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.1 * i for i in range(n)], "long_factor": [2.0 + 0.5 * i for i in range(n)],
            **extra}


VARIANTS = {  # name -> (model_type, config overrides)
    "phi3": ("phi3", {}),
    "phi3-sliding-window": ("phi3", {"sliding_window": 8}),
    # the prompt (15 tokens) plus 32 steps crosses the original length: short factors, then long ones
    "phi3.5-longrope": ("phi3", {"rope_parameters": longrope(16, 24)}),
    "phi4-mini-partial-rotary-longrope": ("phi3", {"rope_parameters": longrope(12, 24, partial_rotary_factor=0.75),
                                                   "tie_word_embeddings": True}),
    "gemma": ("gemma", {"head_dim": 16}),
    # Google's Gemma 2 configs carry hidden_act too; transformers reads hidden_activation
    "gemma2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6,
                          "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.3, "hidden_act": "silu"}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 6,
                               "attn_logit_softcapping": 0.5,  # transformers' Gemma 3 ignores it
                               "layer_types": ["sliding_attention", "full_attention"],
                               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1000000.0}}}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3-sliding-window": ("qwen3", {"head_dim": 16, "use_sliding_window": True, "sliding_window": 6,
                                       "max_window_layers": 1}),
    "smollm3-nope": ("smollm3", {"no_rope_layers": [1, 0]}),
    "smollm3-nope-sliding": ("smollm3", {"no_rope_layers": [0, 1], "use_sliding_window": True, "sliding_window": 6,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "granite": ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.03,
                            "logits_scaling": 4.0, "tie_word_embeddings": True}),
    "granite-untied-bias": ("granite", {"embedding_multiplier": 6.0, "residual_multiplier": 0.5,
                                        "attention_multiplier": 0.1, "logits_scaling": 2.0, "attention_bias": True,
                                        "tie_word_embeddings": False}),
    "olmo2": ("olmo2", {}),
    "stablelm2": ("stablelm", {"use_qkv_bias": True}),
    "stablelm2-parallel-qk-layernorm": ("stablelm", {"use_parallel_residual": True, "qk_layernorm": True,
                                                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                         "partial_rotary_factor": 0.5}}),
    "glm": ("glm", {"head_dim": 16, "attention_bias": True}),
    "glm4": ("glm4", {"head_dim": 16, "attention_bias": True}),
    # the open-model papers' families
    "pythia": ("gpt_neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.25}}),
    "gpt-neox-sequential": ("gpt_neox", {"use_parallel_residual": False,
                                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.5}}),
    # a head_dim in config.json that the family ignores (transformers: hidden / heads = 16) changes nothing
    "gptj": ("gptj", {"rotary_dim": 8, "n_inner": 128, "head_dim": 32}),
    "gptj-tied-lm-head-bias": ("gptj", {"rotary_dim": 8, "n_inner": 128, "tie_word_embeddings": True}),
    "falcon-7b-multi-query": ("falcon", {"multi_query": True, "parallel_attn": True, "bias": False,
                                         "ffn_hidden_size": 128}),
    "falcon-40b-new-architecture": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2,
                                               "ffn_hidden_size": 128}),
    "falcon-new-architecture-one-norm": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2,
                                                    "num_ln_in_parallel_attn": 1, "ffn_hidden_size": 128}),
    "falcon-rw-alibi": ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False, "bias": True,
                                   "ffn_hidden_size": 128}),
    "bloom": ("bloom", {"head_dim": 32}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64, "head_dim": 32}),
    "opt-350m-post-norm-projected": ("opt", {"ffn_dim": 128, "do_layer_norm_before": False,
                                             "word_embed_proj_dim": 32}),
    "opt-no-affine-norms": ("opt", {"ffn_dim": 128, "layer_norm_elementwise_affine": False}),
    "mpt": ("mpt", {"expansion_ratio": 2, "max_seq_len": 256, "head_dim": 32}),
    "mpt-clip-qkv": ("mpt", {"expansion_ratio": 2, "max_seq_len": 256,
                             "attn_config": {"clip_qkv": 0.3, "softmax_scale": 0.2}}),
}


# The reference is transformers with eager attention, except where eager is wrong: for Falcon with
# ALiBi, transformers 5 puts alibi / sqrt(head_size) into the attention mask and the eager path then
# adds alibi to the scores a second time; its sdpa path (and Falcon-RW's original code) adds it once.
REFERENCE_ATTENTION = {"falcon-rw-alibi": "sdpa"}


@pytest.fixture(scope="module")
def tiny(make_tiny):
    """One tiny model per variant (made once): name -> (HF folder, transformers model)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model_type, config = VARIANTS[name]
            cache[name] = make_tiny(model_type, attention=REFERENCE_ATTENTION.get(name, "eager"), **config)
        return cache[name]
    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_in_both_flavours(name, tiny, smol_tokenizer, tmp_path):
    folder, hf = tiny(name)
    for flavour, options in (("fused", {}), ("portable", PORTABLE)):
        bundle = export(folder, tmp_path / flavour, ExportOptions(**options), **QUIET)
        assert Model(bundle).manifest.graph.flavour == flavour
        worst = check_parity(bundle, hf, smol_tokenizer, decode_steps=STEPS)
        assert worst < ATOL, f"{name} ({flavour}): max |logits diff| {worst:.2e} >= {ATOL}"


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_tokens_match_transformers(name, tiny, smol_tokenizer, tmp_path):
    folder, hf = tiny(name)
    ids = smol_tokenizer(PROMPT).input_ids
    want = []
    with torch.no_grad():  # transformers' own greedy loop, token by token with its cache
        out = hf(torch.tensor([ids]), use_cache=True)
        for _ in range(STEPS):
            want.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.tensor([[want[-1]]]), cache=out.past_key_values, use_cache=True)

    model = Model(export(folder, tmp_path / "b", **QUIET))
    logits, _ = model.prefill(ids)
    got = []
    for _ in range(STEPS):
        got.append(int(np.argmax(logits)))
        logits = model.step(got[-1])
    assert got == want


# one variant per family file: what quantization, adapters and targets read is the family's
FAMILY_VARIANTS = ["phi4-mini-partial-rotary-longrope", "gemma", "gemma2", "gemma3", "qwen3", "smollm3-nope",
                   "granite", "olmo2", "stablelm2", "stablelm2-parallel-qk-layernorm", "glm", "glm4",
                   "pythia", "gpt-neox-sequential", "gptj", "falcon-7b-multi-query", "falcon-40b-new-architecture",
                   "falcon-rw-alibi", "bloom", "opt", "opt-350m-post-norm-projected", "mpt-clip-qkv"]
METHODS = {  # method -> (ExportOptions fields, tolerance on logits relative to max |reference logit|)
    "gptq4": (dict(quant="gptq", bits=4, group_size=32, calib_samples=4, calib_seq_len=64), 1e-3),
    "awq4": (dict(quant="awq", bits=4, group_size=32, calib_samples=4, calib_seq_len=64), 1e-3),
    # int8 activations: a few % of noise, which the post-norms of Gemma 2 (softcapped at 0.3 here) enlarge
    "smoothquant": (dict(quant="smoothquant", calib_samples=4, calib_seq_len=64), 0.1),
}


@pytest.mark.parametrize("name, method", [(name, "gptq4") for name in VARIANTS] +
                         [(name, m) for m in METHODS if m != "gptq4" for name in FAMILY_VARIANTS])
def test_quantized_graph_computes_what_its_quantized_weights_do(name, method, tiny, smol_tokenizer):
    """GPTQ for every variant, AWQ and SmoothQuant for one of each family. The reference is transformers
    running the very weights the graph holds (each Linear dequantized, the fp16 embedding, the int8
    lm_head copy), so this checks the family's layer walker, its scale groups and how it rearranges
    quantized rows, not how much 4 bits cost a random model. MatMulNBits runs at accuracy_level 1
    (fp32 compute); W8A8 quantizes activations at run time, hence its looser bound."""
    fields, tol = METHODS[method]
    assert quantized_graph_error(tiny(name)[0], fields, smol_tokenizer, accuracy_level=1) < tol


def test_awq_leaves_relu_channels_the_calibration_never_fed_alone(tiny, smol_tokenizer):
    """OPT's fc2 reads a ReLU: channels that never fired on the calibration (mean |x| = 0) got AWQ scales
    of 1e-4 ** ratio, so their input grew up to 7000x where they do fire, and MatMulNBits' int8
    activations (accuracy_level 4, the default) lost the other channels of their blocks: the bundle
    was 10% off its own weights (RTN's: 0.7%)."""
    fields = dict(quant="awq", bits=4, calib_samples=4, calib_seq_len=64)
    assert quantized_graph_error(tiny("opt")[0], fields, smol_tokenizer, accuracy_level=4) < 0.02


@pytest.mark.parametrize("name, method", [("opt", "gptq"), ("mpt", "smoothquant"), ("gptj", "awq")])
def test_calibration_longer_than_transformers_runs_the_model_is_refused_in_one_line(name, method, tiny, tmp_path):
    """OPT's learned position table, MPT's ALiBi buffer and GPT-J's sin/cos table end at 256 positions
    here: an IndexError or a RuntimeError in the middle of calibrating, before."""
    with pytest.raises(ExportError, match="calibration samples of 300 tokens .* than the 256 positions"):
        export(tiny(name)[0], tmp_path / "b", ExportOptions(quant=method, calib_samples=2, calib_seq_len=300), **QUIET)


def quantized_graph_error(folder, fields: dict, smol_tokenizer, accuracy_level: int) -> float:
    """max |graph - transformers on the graph's own dequantized weights| / max |the latter| on PROMPT."""
    from test_portable import _prefill_logits

    from edgekit.host import graph
    from edgekit.host.families import family_of
    from edgekit.host.load import fp32_weights, load
    from edgekit.host.options import plan_export
    from edgekit.host.quant import quantize
    from edgekit.host.target_fit import set_accuracy_level

    loaded = load(folder)
    family = family_of(loaded.model)
    arch = family.architecture()
    plan = plan_export(ExportOptions(**fields)).quant
    weights, _ = quantize(loaded, family, arch, fp32_weights(loaded.model), plan, lambda _: None)
    proto = graph.build(family.describe(weights, arch), "fused")
    set_accuracy_level(proto, accuracy_level)

    model = loaded.model  # its layers now hold their dequantized weights (quantize replaces them)
    head = weights[f"{family.lm_head}.weight"].dequantize()
    model.get_output_embeddings().weight = torch.nn.Parameter(torch.from_numpy(head.copy()))  # untied if it was
    model.get_input_embeddings().weight.data = torch.from_numpy(
        weights[f"{family.embed_tokens}.weight"].dequantize())
    ids = np.array([smol_tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    got = _prefill_logits(proto, arch, ids, portable=False)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_scale_groups_leave_the_layer_unchanged_before_rounding(name, tiny, smol_tokenizer):
    """AWQ and SmoothQuant divide the op before a group by s and multiply the group's Linears by s:
    for every scale group a family declares, the layer must compute exactly what it did."""
    from edgekit.host.families import family_of
    from edgekit.host.load import load
    from edgekit.host.quant import awq, layerwise
    from edgekit.host.quant.layers import scale_groups

    folder, _ = tiny(name)
    model = load(folder).model
    family = family_of(model)
    layer = model.get_submodule(family.decoder_layers)[0]
    ids = torch.tensor([smol_tokenizer(PROMPT).input_ids])
    hidden, kwargs = layerwise.first_layer_inputs(model, layer, ids)
    feats, want = layerwise.linear_inputs(layer, layerwise.inputs_of(family.linears), hidden, kwargs)
    groups = scale_groups(layer, family, feats)
    assert groups, f"{name}: no scale group applies"
    if family.num_kv_heads < family.num_heads and any(g.prev.endswith("v_proj") for g in family.scale_groups):
        assert any(channels is not None for *_, channels in groups), f"{name}: v_proj -> o_proj left out under GQA"
    gen = torch.Generator().manual_seed(0)
    for _sg, prev, fcs, x, channels in groups:
        s = torch.rand(prev.weight.shape[0] if channels is not None else x.shape[-1], generator=gen) * 1.5 + 0.5
        awq.apply_scale(awq.ScaleGroup(prev, fcs, x, lambda t: t, family.norm_offset, channels), s)
    got = layerwise.run_layer(layer, hidden, kwargs)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), f"{name}: {(got - want).abs().max():.2e}"


@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_a_lora_on_the_familys_own_modules_merges_exactly(name, tiny, smol_tokenizer, tmp_path):
    """A LoRA with a bias on every Linear of the family (its own module names: qkv_proj, gate_up_proj,
    OPT's project_in/out, ...), merged at export, gives peft's adapted model's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, _ = tiny(name)
    attention = REFERENCE_ATTENTION.get(name, "eager")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True,
                                                 init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.normal_(0, 0.1)  # lora_bias starts at zero
    peft_model.save_pretrained(tmp_path / "lora")
    bundle = export(folder, tmp_path / "b", ExportOptions(adapters=[str(tmp_path / "lora")]), **QUIET)

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention),
        tmp_path / "lora").eval()
    ids = smol_tokenizer(PROMPT).input_ids
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = Model(bundle).forward(ids, 0, all_logits=True)
    assert np.abs(got - want).max() < ATOL
    base_bundle = export(folder, tmp_path / "base", **QUIET)
    assert np.abs(Model(base_bundle).forward(ids, 0, all_logits=True) - want).max() > 1e-2, "the LoRA must matter"


def test_prefix_tuning_on_a_partial_rotary_family_keeps_its_keys_in_the_graphs_head_order(tiny, smol_tokenizer,
                                                                                          tmp_path):
    """StableLM rotates a quarter of each head, so the graph stores q and k heads permuted
    (host/decoder.py); the baked-in prefix keys must be permuted the same way."""
    from peft import PrefixTuningConfig, get_peft_model
    from test_adapters import prefix_cache

    folder, hf = tiny("stablelm2")
    torch.manual_seed(0)
    peft_model = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    peft_model.save_pretrained(tmp_path / "prefix")
    bundle = export(folder, tmp_path / "b", ExportOptions(adapters=[str(tmp_path / "prefix")]), **QUIET)

    ids = smol_tokenizer(PROMPT).input_ids
    with torch.no_grad():
        want = peft_model.get_base_model()(input_ids=torch.tensor([ids]),
                                           cache=prefix_cache(folder, tmp_path / "prefix")).logits[0].numpy()
    got = Model(bundle).forward(ids, 0, all_logits=True)
    assert np.abs(got - want).max() < ATOL


def test_a_prefix_peft_sizes_unlike_the_cache_is_refused_in_one_line(smol_tokenizer, tmp_path):
    """peft makes Falcon's prefix with a key per query head; the graph caches one per kv head."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    # as Falcon-40B's config: num_kv_heads, and no num_key_value_heads (conftest's TINY has one, which peft reads)
    config = AutoConfig.for_model("falcon", vocab_size=len(smol_tokenizer), hidden_size=64, num_attention_heads=4,
                                  num_hidden_layers=2, new_decoder_architecture=True, num_kv_heads=2,
                                  ffn_hidden_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder := tmp_path / "falcon")
    smol_tokenizer.save_pretrained(folder)
    get_peft_model(AutoModelForCausalLM.from_pretrained(folder), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path / "p")
    with pytest.raises(ExportError, match="prefix for 4 heads of size 16, but its attention caches 2 of size 16"):
        export(folder, tmp_path / "b", ExportOptions(adapters=[str(tmp_path / "p")]), **QUIET)


def test_a_family_exports_with_the_command_line_and_generates(tiny, tmp_path):
    from test_cli import edgekit

    folder, _ = tiny("gemma3")
    r = edgekit("export", folder, "--out", tmp_path / "b", "--quant", "rtn", "--bits", "4", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    assert "gemma3_text" in r.stderr
    r = edgekit("generate", tmp_path / "b", "The robot", "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.parametrize("name, target", [("gemma2", "rpi5"), ("stablelm2-parallel-qk-layernorm", "rpi4"),
                                          ("phi4-mini-partial-rotary-longrope", "jetson-orin-nano"),
                                          ("glm4", "x86-avx2")])
def test_target_export_checks_operators_and_memory(name, target, tiny, tmp_path):
    folder, _ = tiny(name)
    said = []
    bundle = export(folder, tmp_path / target, ExportOptions(target=target), progress=said.append)
    assert any(line.strip().startswith("operators:") for line in said), said
    assert any(f"memory on {target}" in line for line in said), said
    assert Model(bundle).generate(PROMPT, max_new_tokens=4, temperature=0.0).stats.new_tokens >= 1


@pytest.mark.parametrize("model_type, config, refusal", [
    ("llama", {"hidden_act": "tanh"}, "hidden_act 'tanh' is not supported"),
    ("gemma3_text", {"head_dim": 16, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unsupported_settings_are_refused_in_one_line(model_type, config, refusal, make_tiny, tmp_path):
    folder, _ = make_tiny(model_type, **config)
    with pytest.raises(ExportError, match=refusal):
        export(folder, tmp_path / "b", **QUIET)
    assert not (tmp_path / "b").exists()


def test_a_head_size_the_fused_kernels_cannot_take_is_refused_with_the_way_out(make_tiny, smol_tokenizer, tmp_path):
    """GroupQueryAttention needs head sizes that are multiples of 16; the portable graph takes any."""
    folder, hf = make_tiny("llama", hidden_size=32, head_dim=8)
    with pytest.raises(ExportError, match=r"head size 8 is not a multiple of 16.*--flavour portable"):
        export(folder, tmp_path / "fused", **QUIET)
    assert not (tmp_path / "fused").exists()
    bundle = export(folder, tmp_path / "portable", ExportOptions(flavour="portable"), **QUIET)
    assert check_parity(bundle, hf, smol_tokenizer) < ATOL


@pytest.mark.parametrize("config, refusal", [
    ({"model_type": "t5", "is_encoder_decoder": True, "d_model": 64}, "'t5' is an encoder-decoder model"),
    ({"model_type": "chatglm", "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}},
     "'chatglm' needs trust_remote_code"),
    ({"model_type": "baichuan", "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}},
     "'baichuan' needs trust_remote_code"),
])
def test_models_out_of_reach_are_refused_with_why_and_what_instead(config, refusal, tmp_path):
    import json

    from test_cli import assert_one_line_error, edgekit

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert_one_line_error(edgekit("export", tmp_path / "m", "--out", tmp_path / "b"), refusal)
    assert not (tmp_path / "b").exists()


def test_a_model_without_a_chat_template_takes_plain_prompts_or_an_instruction_format(tiny, tmp_path):
    """Pythia, Dolly, MPT and the other open models mostly ship no chat template: plain prompts in
    their fine-tune's instruction format work, and --chat-template alpaca (= dolly) or oasst gives
    them one, so that chat messages (CLI --chat, MQTT) work too."""
    import shutil

    from edgekit.device.chat import ChatFormatError
    from edgekit.host.chat_format import INSTRUCTION_FORMATS

    folder, _ = tiny("pythia")
    plain = tmp_path / "no-template"
    shutil.copytree(folder, plain)
    for f in plain.glob("chat_template.*"):
        f.unlink()
    config = plain / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"_no_chat_template"'))

    model = Model(export(plain, tmp_path / "plain", **QUIET))
    assert model.manifest.chat is None
    dolly = "### Instruction:\nName a planet.\n\n### Response:\n"
    assert model.generate(dolly, max_new_tokens=4, temperature=0.0, stop=["### End"]).stats.new_tokens >= 1
    with pytest.raises(ChatFormatError, match="no chat template; pass a plain prompt"):
        model.encode([{"role": "user", "content": "Name a planet."}])

    model = Model(export(plain, tmp_path / "dolly", ExportOptions(chat_template="dolly"), **QUIET))
    assert (tmp_path / "dolly" / "chat_template.jinja").read_text() == INSTRUCTION_FORMATS["dolly"]
    ids = model.encode([{"role": "user", "content": "Name a planet."}])
    intro = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
             "request.\n\n")
    assert model.tokenizer.decode(ids) == intro + dolly
    assert model.generate([{"role": "user", "content": "Name a planet."}], max_new_tokens=4).stats.new_tokens >= 1

    with pytest.raises(ExportError, match="neither a file nor a known format"):
        export(plain, tmp_path / "bad", ExportOptions(chat_template="vicuna"), **QUIET)
