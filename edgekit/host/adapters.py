"""PEFT adapters: merged into the weights (LoRA and kin) or baked into the bundle (prefix tuning).

    --adapter [NAME=]PATH[:WEIGHT]  (repeatable)

    LoRA, DoRA, rsLoRA, LoHa, LoKr, IA3 ──► peft merge_and_unload ──► plain weights (then quantize)
    several LoRAs with weights           ──► peft add_weighted_adapter("cat") ──► merge
    prefix tuning                        ──► peft get_prompt ──► keys/values for cache positions [0, P)

Merging happens on the fp32 transformers model right after loading, so calibration and
quantization (GPTQ, AWQ) see the adapted weights and the device runs the adapted model at
the base model's speed. Prefix tuning has nothing to merge: its learned keys and values are
written to the bundle (prefix_kv.npz) and the runtime puts them in the cache before every
sequence, exactly where peft puts them (positions 0..P-1, keys used as stored, not rotated;
the prompt starts at position P).

Every adapter is checked before anything is changed: its files, its type, that its target
modules exist in the architecture, that its tensors fit the model's shapes, and that it was
trained on this base model. A problem raises ExportError saying what and what to do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgekit.device.bundle import sha256_file
from edgekit.errors import ExportError
from edgekit.host.load import SHIPPED, CausalLM, LoadedModel

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# peft types whose layers peft can merge into the base weights (merge_and_unload)
MERGEABLE = {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3"}
BAKEABLE = {"PREFIX_TUNING": "prefix tuning"}
# Several adapters: "cat" stacks the weighted A and B matrices, so the merged delta is exactly
# sum_i weight_i * delta_i (peft's "svd" approximates it, "linear" adds cross terms).
COMBINATION = "cat"
COMBINED = "combined"
# Parameter names of adapter layers; what precedes them in a tensor name is the adapted module.
_ADAPTER_PARTS = re.compile(r"^(lora_|hada_|lokr_|ia3_|oft_|boft_|token_adapter|modules_to_save|base_layer)")
_DELTA_PARTS = re.compile(r"^(lora_|hada_|lokr_|ia3_)")  # what merge_and_unload adds into the adapted weight


@dataclass
class AdapterSpec:
    """One --adapter value: "[name=]path[:weight]"."""

    name: str
    path: Path
    weight: float = 1.0
    text: str = ""  # as the user typed it


@dataclass
class Adapter:
    """An adapter folder whose files were found and read (not yet checked against a model)."""

    spec: AdapterSpec
    config: dict  # adapter_config.json
    peft_type: str
    weights_file: Path
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @property
    def kind(self) -> str:
        """"lora", "dora", "rslora", "loha", ..., "prefix_tuning"."""
        if self.peft_type == "LORA" and self.config.get("use_dora"):
            return "dora"
        if self.peft_type == "LORA" and self.config.get("use_rslora"):
            return "rslora"
        return self.peft_type.lower()

    def record(self, applied: str, combination: str | None) -> dict:
        """This adapter's entry in the manifest's `adapters` list."""
        c = self.config
        entry = {"name": self.spec.name, "path": str(self.spec.path), "type": self.kind, "weight": self.spec.weight,
                 "applied": applied, "base_model": c.get("base_model_name_or_path") or "", "sha256": self.sha256}
        if applied == "merged":
            entry["combination"] = combination
            entry["r"] = c.get("r")
            targets = c.get("target_modules")
            entry["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
        else:
            entry["num_virtual_tokens"] = c.get("num_virtual_tokens")
        return entry


# -- the one call export makes ------------------------------------------------------------


def apply_adapters(loaded: LoadedModel, specs: list[str], say: Callable[[str], None] = print
                   ) -> tuple[list[dict], np.ndarray | None]:
    """Merge the mergeable adapters of `specs` into `loaded.model` and compute a prefix-tuning prefix.

    Every adapter is validated before the model changes. Returns the manifest's `adapters`
    records (in the order given) and the prefix keys/values, (layers, 2, kv_heads, P, head_size)
    float32, or None without a prefix-tuning adapter. `loaded.model` is replaced by the merged
    model. Raises ExportError for an adapter that cannot be used.
    """
    if not specs:
        return [], None
    parsed = parse_specs(specs)
    adapters = [read_adapter(s) for s in parsed]
    for a in adapters:
        check_fits(a, loaded)
    merge = [a for a in adapters if a.peft_type in MERGEABLE]
    prefixes = [a for a in adapters if a.peft_type in BAKEABLE]
    if len(prefixes) > 1:
        raise ExportError(f"only one prefix-tuning adapter can be baked into a bundle, got "
                          f"{', '.join(a.spec.name for a in prefixes)}")
    for a in prefixes:
        if a.spec.weight != 1.0:
            raise ExportError(f"adapter {a.spec.name}: a prefix-tuning adapter cannot be weighted "
                              f"(got :{a.spec.weight:g}); drop the weight")
    combination = None
    if len(merge) > 1 or (merge and merge[0].spec.weight != 1.0):
        combination = COMBINATION if len(merge) > 1 else "linear"  # peft combines one adapter linearly (exact)
        for a in merge:
            if a.peft_type != "LORA":
                raise ExportError(f"adapter {a.spec.name}: {MERGEABLE[a.peft_type]} adapters cannot be weighted or "
                                  "combined (peft's add_weighted_adapter is for LoRA); merge it alone without a weight")
            # peft's add_weighted_adapter silently drops these parts of an adapter (peft issue #3761)
            for key, what in (("use_dora", "DoRA's magnitude vector"), ("lora_bias", "the LoRA bias"),
                              ("kasa_config", "KaSA's singular values"),
                              ("modules_to_save", "the trained copies of modules_to_save")):
                if a.config.get(key):
                    raise ExportError(f"adapter {a.spec.name}: {key} adapters cannot be weighted or combined (peft's "
                                      f"add_weighted_adapter drops {what}); merge it alone without a weight")
            if a.config.get("bias", "none") != "none":
                raise ExportError(f"adapter {a.spec.name}: an adapter that trained biases (bias={a.config['bias']!r}) "
                                  "cannot be weighted or combined (peft's add_weighted_adapter refuses them); merge it "
                                  "alone without a weight")

    records = {}
    if merge:
        desc = ", ".join(f"{a.spec.name} ({a.kind}, x{a.spec.weight:g})" for a in merge)
        say(f"      merging adapters: {desc}" + (f", combined by {combination}" if combination else ""))
        loaded.model = merge_adapters(loaded.model, merge, combination)
        records.update({id(a): a.record("merged", combination) for a in merge})
    prefix = None
    if prefixes:
        a = prefixes[0]
        prefix = prefix_kv(loaded.model, a)
        say(f"      baking prefix-tuning adapter {a.spec.name}: {prefix.shape[3]} virtual tokens into the cache")
        records[id(a)] = a.record("prefix", None)
    return [records[id(a)] for a in adapters], prefix


# -- specs and files ----------------------------------------------------------------------


def parse_spec(text: str) -> AdapterSpec:
    """Parse "[name=]path[:weight]". The name defaults to the folder's name, the weight to 1.

    A folder literally named "x:0.5" stays a path; otherwise what follows the last ":" after an
    existing folder must be a finite number (ExportError naming the bad weight, not the folder).
    """
    if not text.strip():
        raise ExportError("--adapter is empty; give the adapter's folder: --adapter [NAME=]PATH[:WEIGHT]")
    rest, name = text, None
    m = re.match(r"^([A-Za-z0-9_.-]+)=(.+)$", text)  # a name has no "/", so "runs/lr=3e-4/lora" is a path
    if m:
        name, rest = m.group(1), m.group(2)
    weight = 1.0
    # split at the last ':' whose left side is an existing folder; failing that, at the last ':' when a
    # number follows it (the folder is then reported missing)
    cuts = [i for i, c in enumerate(rest) if c == ":"]
    at = next((i for i in reversed(cuts) if Path(rest[:i]).exists()), None) if not Path(rest).exists() else None
    if at is None and cuts and not Path(rest).exists() and _looks_like_number(rest[cuts[-1] + 1:]):
        at = cuts[-1]
    head, sep, tail = (rest[:at], ":", rest[at + 1:]) if at is not None else (rest, "", "")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            raise ExportError(f"--adapter {text}: the weight {tail!r} after ':' is not a number") from None
        if not math.isfinite(weight):
            raise ExportError(f"--adapter {text}: the weight must be a finite number, got {tail}")
        rest = head
    if not rest:
        raise ExportError(f"--adapter {text}: no folder before the weight")
    path = Path(rest)
    return AdapterSpec(name=name or path.resolve().name or "adapter", path=path, weight=weight, text=text)


def _looks_like_number(s: str) -> bool:
    """A weight someone meant to give: empty (a trailing ':'), a float, or inf/nan spelled any way."""
    return s == "" or bool(re.fullmatch(r"[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf(inity)?|nan)", s, re.I))


def parse_specs(texts: list[str]) -> list[AdapterSpec]:
    specs = [parse_spec(str(t)) for t in texts]
    names = [s.name for s in specs]
    for s in specs:
        if names.count(s.name) > 1:
            raise ExportError(f"two adapters are named {s.name!r}; name them: --adapter a=PATH --adapter b=PATH")
    return specs


def read_adapter(spec: AdapterSpec) -> Adapter:
    """Find and read an adapter folder's config and weights file; hash both."""
    where = f"adapter {spec.name} ({spec.path})"
    if not spec.path.exists():
        raise ExportError(f"{where}: no such folder")
    if not spec.path.is_dir():
        raise ExportError(f"{where}: expected the adapter's folder (the one peft's save_pretrained wrote, with "
                          f"{CONFIG_FILE} and {WEIGHT_FILES[0]}), not a file")
    config_path = spec.path / CONFIG_FILE
    if not config_path.is_file():
        raise ExportError(f"{where}: {CONFIG_FILE} is missing; "
                          "save the adapter with peft_model.save_pretrained(folder)")
    weights = next((spec.path / f for f in WEIGHT_FILES if (spec.path / f).is_file()), None)
    if weights is None:
        raise ExportError(f"{where}: the adapter's weights are missing (no {' or '.join(WEIGHT_FILES)}); "
                          "save the adapter with peft_model.save_pretrained(folder)")
    try:
        config = json.loads(config_path.read_text())
    except OSError as e:
        raise ExportError(f"{where}: cannot read {CONFIG_FILE} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ExportError(f"{where}: {CONFIG_FILE} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{where}: {CONFIG_FILE} is not a JSON object; it was not written by peft")
    peft_type = config.get("peft_type")
    if not peft_type or not isinstance(peft_type, str):
        raise ExportError(f"{where}: {CONFIG_FILE} has no peft_type; it was not written by peft")
    if peft_type != peft_type.upper():  # peft reads its enum's values: "LORA", never "lora"
        raise ExportError(f"{where}: {CONFIG_FILE} has peft_type {peft_type!r}; peft writes it in capitals "
                          f"({peft_type.upper()!r}): fix the file")
    if peft_type not in MERGEABLE and peft_type not in BAKEABLE:
        known = ", ".join([*MERGEABLE.values(), "DoRA", "rsLoRA", *BAKEABLE.values()])
        raise ExportError(f"{where}: a {peft_type} adapter can neither be merged into the weights nor baked into the "
                          f"bundle; supported adapter types: {known}")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ExportError(f"{where}: task_type is {task}; only CAUSAL_LM adapters apply to a text-generation model")
    for key, why in (("layer_replication", "it changes the number of layers"),
                     ("alora_invocation_tokens", "activated LoRA only applies after its invocation tokens")):
        if config.get(key):
            raise ExportError(f"{where}: LoRA with {key} cannot be merged into plain weights ({why})")
    if config.get("target_parameters"):
        raise ExportError(f"{where}: LoRA on target_parameters (nn.Parameter) is not supported; target modules")
    return Adapter(spec, config, peft_type, weights,
                   {config_path.name: sha256_file(config_path), weights.name: sha256_file(weights)})


def adapter_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, as saved by peft (names start with base_model.model.)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # a truncated or foreign file
            raise ExportError(f"{path}: cannot read the adapter's weights: {str(e).splitlines()[0][:200]}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: cannot read the adapter's weights: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path}: not an adapter's weights (peft saves a dict of tensor name -> tensor)")
    return {k: tuple(v.shape) for k, v in state.items()}


# -- checks against the model -------------------------------------------------------------


def check_fits(adapter: Adapter, loaded: LoadedModel) -> None:
    """Raise ExportError unless `adapter` was made for `loaded`'s architecture, shapes and base model.

    Shapes and module names are the hard evidence and are checked first; the base model's
    name catches an adapter of a different model with the same shapes.
    """
    if adapter.peft_type in BAKEABLE:
        _check_prefix_shapes(adapter, loaded.model)
    else:
        _check_target_modules(adapter, loaded.model)
        _check_tensor_shapes(adapter, loaded.model)
    _check_base_name(adapter, loaded)


def _module_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n}


def _check_target_modules(adapter: Adapter, model: CausalLM) -> None:
    targets = adapter.config.get("target_modules")
    modules = _module_names(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if not list(m.children())})
    where = f"adapter {adapter.spec.name}"
    arch = model.config.model_type
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise ExportError(f"{where}: target_modules must be module names (strings), got {json.dumps(targets)[:80]}")
        # peft matches a name exactly or as the last dotted part(s) of a module path, and needs one to match
        # (an adapter config may list the names of several architectures)
        if "all-linear" not in targets and not any(n == t or n.endswith("." + t) for t in targets for n in modules):
            raise ExportError(f"{where}: target module(s) {', '.join(targets)} do not exist in this {arch} model "
                              f"(its modules: {', '.join(leaves)}); the adapter was made for another architecture")
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ExportError(f"{where}: target_modules {targets!r} is not a regular expression ({e})") from None
        if not any(pattern.fullmatch(n) for n in modules):
            raise ExportError(f"{where}: target_modules pattern {targets!r} matches no module of this {arch} model "
                              f"(its modules: {', '.join(leaves)}); the adapter was made for another architecture")


def _check_tensor_shapes(adapter: Adapter, model: CausalLM) -> None:
    """Every saved tensor adapts a module the model has, with matching in/out sizes."""
    modules = _module_names(model)
    where = f"adapter {adapter.spec.name}"
    for key, shape in adapter_tensor_shapes(adapter.weights_file).items():
        name, param = adapted(key)
        module = modules.get(name)
        if module is None:
            raise ExportError(f"{where}: it has weights for {name}, which this {model.config.model_type} model does "
                              f"not have ({model.config.num_hidden_layers} layers); the adapter was made for "
                              "another base model")
        want = _expected_shape(module, param, shape)
        if want is not None and tuple(want) != tuple(shape):
            raise ExportError(f"{where}: {key} has shape {tuple(shape)} but this model's {name} needs "
                              f"{tuple(want)}; the adapter was made for another base model (different sizes)")


def adapted(key: str) -> tuple[str, list[str]]:
    """A saved adapter tensor's name -> (the module it adapts, the parameter's own path):
    "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" -> ("model.layers.0.mlp.up_proj",
    ["lora_A", "weight"])."""
    parts = key.removeprefix("base_model.model.").split(".")
    cut = next((i for i, p in enumerate(parts) if _ADAPTER_PARTS.match(p)), len(parts) - 1)
    return ".".join(parts[:cut]), parts[cut:]


def _expected_shape(module: torch.nn.Module, param: list[str], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a saved LoRA tensor must have for `module`; None when we do not know (peft checks)."""
    if param[0] == "base_layer":  # a full copy of the base weight, saved alongside adapted embeddings
        param = param[1:]
    head = param[0]
    if isinstance(module, torch.nn.Linear):
        if head == "lora_A":
            return (shape[0], module.in_features)  # (r, in)
        if head == "lora_B":
            if param[-1] == "bias":  # lora_bias: a bias of the adapted layer's width
                return (module.out_features,)
            return (module.out_features, shape[1])  # (out, r)
        if head == "lora_magnitude_vector":
            return (module.out_features,)
        if param == ["weight"] or param == ["bias"]:  # modules_to_save: a full copy
            return tuple(getattr(module, param[0]).shape)
    if isinstance(module, torch.nn.Embedding):
        if head == "lora_embedding_A":
            return (shape[0], module.num_embeddings)  # (r, vocab)
        if head == "lora_embedding_B":
            return (module.embedding_dim, shape[1])  # (dim, r)
        if param == ["weight"]:
            return tuple(module.weight.shape)
    return None


def _check_prefix_shapes(adapter: Adapter, model: CausalLM) -> None:
    """peft sizes a LLaMA prefix per layer as (kv_heads, P, head_size) for keys and for values."""
    from edgekit.host.families import family_of

    c, mc = adapter.config, model.config
    kv_heads, head_size = _peft_prefix_heads(mc)
    family = family_of(model)
    if (kv_heads, head_size) != (family.num_kv_heads, family.head_size):  # Falcon with grouped kv, for one
        raise ExportError(f"adapter {adapter.spec.name}: peft makes this {mc.model_type} model's prefix for {kv_heads} "
                          f"heads of size {head_size}, but its attention caches {family.num_kv_heads} of size "
                          f"{family.head_size}; such a prefix cannot be baked into the cache: use a LoRA instead")
    want = {"num_layers": mc.num_hidden_layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_size,
            "num_transformer_submodules": 1}
    wrong = [f"{k}={c.get(k)} (this model: {v})" for k, v in want.items() if c.get(k) is not None and c.get(k) != v]
    if wrong:
        raise ExportError(f"adapter {adapter.spec.name}: prefix tuning made for another base model: "
                          f"{', '.join(wrong)}")
    P = c.get("num_virtual_tokens")
    shapes = adapter_tensor_shapes(adapter.weights_file)
    expected = (P, 2 * mc.num_hidden_layers * kv_heads * head_size)  # (P, layers * 2 * kv_heads * head_size)
    got = shapes.get("prompt_embeddings")
    if got is not None and tuple(got) != expected:
        raise ExportError(f"adapter {adapter.spec.name}: prompt_embeddings has shape {tuple(got)}, this model needs "
                          f"{expected}; the adapter was made for another base model")


def _peft_prefix_heads(config) -> tuple[int, int]:
    """(heads, head size) of the keys and values peft's prefix tuning makes for a model of `config`."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_key(name: str) -> str:
    """A model name reduced to compare across hubs, folders and file formats.

    "HuggingFaceTB/SmolLM2-135M-Instruct", "/models/SmolLM2-135M-Instruct.Q4_1.gguf" and
    "unsloth/SmolLM2-135M-Instruct-bnb-4bit" all become "smollm2-135m-instruct".
    """
    key = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    key = re.sub(r"\.gguf$", "", key)
    # quantized copies of a model (QLoRA bases, GGUF files) carry its name plus a format suffix
    return re.sub(r"([-_.](bnb|4bit|8bit|int4|int8|nf4|fp4|gptq|awq|gguf|fp16|bf16|fp32|q\d\w*))+$", "", key)


def base_names(loaded: LoadedModel) -> list[str]:
    """The names this model may go by in an adapter's base_model_name_or_path."""
    src = loaded.source
    names = [src.spec, str(src.folder), getattr(loaded.model.config, "_name_or_path", "") or ""]
    if src.gguf_file:
        names.append(src.gguf_file)
    if src.spec in SHIPPED:  # the Hugging Face repo an adapter was most likely trained from
        names.append(SHIPPED[src.spec].hub_id)
    return [n for n in names if n]


def _check_base_name(adapter: Adapter, loaded: LoadedModel) -> None:
    base = adapter.config.get("base_model_name_or_path")
    if not base:
        return  # peft leaves it empty for a model built in memory: nothing to compare, the shapes were checked
    ours = base_names(loaded)
    if model_key(base) not in {model_key(n) for n in ours}:
        raise ExportError(
            f"adapter {adapter.spec.name} was trained on base model {base!r}, but this export is of "
            f"{loaded.source.spec!r}; export that base model, or, if it was trained on these same weights "
            f"under another name, set base_model_name_or_path in {adapter.spec.path / CONFIG_FILE} "
            f"to {ours[-1]!r}")


# -- merging and baking -------------------------------------------------------------------


def merge_adapters(model: torch.nn.Module, adapters: list[Adapter], combination: str | None) -> torch.nn.Module:
    """Load `adapters` with peft, combine them (when weighted or several), and merge into the weights.

    Returns the plain transformers model with merged weights (the same modules, changed in place).
    """
    from peft import PeftModel

    assert adapters and all(a.peft_type in MERGEABLE for a in adapters)
    assert combination is not None or (len(adapters) == 1 and adapters[0].spec.weight == 1.0)
    names = [f"adapter_{i}" for i in range(len(adapters))]  # peft names must be module-safe: no dots
    _untie_if_adapted(model, adapters)
    _give_biases_to(model, adapters)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapters[0].spec.path), adapter_name=names[0])
        for name, a in zip(names[1:], adapters[1:], strict=True):
            peft_model.load_adapter(str(a.spec.path), adapter_name=name)
        for name, a in zip(names, adapters, strict=True):
            _check_loaded(peft_model, name, a)
        active = names[0]
        if combination is not None:
            peft_model.add_weighted_adapter(names, [a.spec.weight for a in adapters], COMBINED,
                                            combination_type=combination)
            _unit_scaling(peft_model, COMBINED)
            active = COMBINED
        peft_model.set_adapter(active)
        # safe_merge: refuse NaN/inf weights instead of exporting a broken model
        return peft_model.merge_and_unload(safe_merge=True, adapter_names=[active])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        which = ", ".join(a.spec.name for a in adapters)
        raise ExportError(f"peft could not merge adapter(s) {which}: {' '.join(str(e).split())[:400]}") from None


def _check_loaded(peft_model, name: str, adapter: Adapter) -> None:
    """Every delta tensor of the adapter's file went into the model, and every delta the model made for it
    came from the file. peft only warns (or says nothing) when they differ: tensors under names it does
    not expect are dropped, and the parameters it did not get keep their initial values (zero for LoRA's
    B, random for LoKr's): the bundle would silently be the base model, or a random change of it."""
    from peft import get_peft_model_state_dict

    saved = {k for k in adapter_tensor_shapes(adapter.weights_file) if _DELTA_PARTS.match(adapted(k)[1][0])}
    # save_embedding_layers="auto" (the default) asks the Hugging Face hub for the base model's config
    # when its name is not a local folder: an offline device waits for the network to fail
    made = {k for k in get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
            if _DELTA_PARTS.match(adapted(k)[1][0])}
    for what, keys in (("peft has no place for", saved - made), ("lacks", made - saved)):
        if keys:
            raise ExportError(f"adapter {adapter.spec.name}: its weights file {what} {len(keys)} tensor(s) of this "
                              f"model's adapter, e.g. {min(keys)}; the file was not written by peft's save_pretrained "
                              "for this base model and adapter_config.json: save the adapter again")


def _unit_scaling(peft_model, name: str) -> None:
    """add_weighted_adapter folds each adapter's weight and scaling into the new A matrices and sets
    lora_alpha = r, meaning a scaling of 1; but it copies use_rslora from the first adapter, which
    would scale by sqrt(r) instead (fixed upstream in peft PR #3449, present in peft 0.21). Make the
    combined delta exactly sum_i weight_i * delta_i."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.scaling[name] = 1.0


def _untie_if_adapted(model: CausalLM, adapters: list[Adapter]) -> None:
    """A merge into a tied lm_head would also change the input embedding (one tensor), which peft's
    unmerged model does not do; give lm_head its own copy first. The graph then stores both."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return
    names = {n for n, m in model.named_modules() if m is out or m is inp}
    for a in adapters:
        for key in adapter_tensor_shapes(a.weights_file):
            module, param = adapted(key)
            # a delta (LoRA, LoHa, LoKr, IA3) on either end of a tied pair applies to that end only (trainable
            # tokens, peft's token_adapter, update both ends alike: merged into the one tensor they stay right)
            if _DELTA_PARTS.match(param[0]) and module in names:
                if any(".token_adapter." in k for b in adapters for k in adapter_tensor_shapes(b.weights_file)):
                    raise ExportError(f"adapter {a.spec.name}: a LoRA on a tied embedding or lm_head together with "
                                      "trainable tokens cannot be merged exactly (the trained rows would reach one "
                                      "end only); train the tokens and the LoRA on separate ends, or untie them")
                out.weight = torch.nn.Parameter(out.weight.detach().clone())
                model.config.tie_word_embeddings = False
                return


def _give_biases_to(model: torch.nn.Module, adapters: list[Adapter]) -> None:
    """A LoRA with lora_bias adds a bias to each layer it adapts; peft can merge it only into a layer
    that has one. Give the adapted Linears without a bias a zero bias, so the merge is exact (the
    graph then adds the merged bias)."""
    if not any(a.config.get("lora_bias") for a in adapters):
        return
    modules = dict(model.named_modules())
    for a in adapters:
        for key in adapter_tensor_shapes(a.weights_file):
            name, param = adapted(key)
            if param[0] == "lora_B":
                module = modules.get(name)
                if isinstance(module, torch.nn.Linear) and module.bias is None:
                    module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))


@torch.no_grad()
def prefix_kv(model: CausalLM, adapter: Adapter) -> np.ndarray:
    """The prefix keys and values peft feeds the model for `adapter`: (layers, 2, kv_heads, P, head_size).

    Taken from peft's own get_prompt (which also resolves a saved prefix projection), so the
    bundle gets exactly the cache peft's prefix-tuned model starts from; `model` is unchanged.
    """
    from peft import PeftModel

    assert adapter.peft_type in BAKEABLE
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.spec.path), adapter_name="baked")
        peft_model.eval()
        cache = peft_model.get_prompt(batch_size=1)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ExportError(f"peft could not load prefix-tuning adapter {adapter.spec.name}: "
                          f"{str(e).strip().splitlines()[0][:300]}") from None
    layers = cache.layers if hasattr(cache, "layers") else None
    if layers is None:  # a legacy tuple of (key, value) per layer
        pairs = [(k, v) for k, v in cache]
    else:
        pairs = [(layer.keys, layer.values) for layer in layers]
    kv = np.stack([np.stack([k[0].float().numpy(), v[0].float().numpy()]) for k, v in pairs])
    c = model.config
    kv_heads, head_size = _peft_prefix_heads(c)
    P = adapter.config["num_virtual_tokens"]
    assert kv.shape == (c.num_hidden_layers, 2, kv_heads, P, head_size), kv.shape  # (layers, 2, kv_heads, P, head_size)
    return np.ascontiguousarray(kv, dtype=np.float32)
