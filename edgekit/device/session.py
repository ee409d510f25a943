"""An onnxruntime session for a bundle: execution provider choice and threads."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("edgekit")


def choose_provider(preferred: list[str]) -> str:
    """The first of `preferred` that the installed onnxruntime offers, else CPU (with a warning)."""
    available = ort.get_available_providers()
    for name in preferred:
        if name in available:
            return name
    if preferred:
        log.warning(
            "none of the bundle's execution providers %s is in this onnxruntime (%s); falling back to CPU",
            preferred, available,
        )
    return "CPUExecutionProvider"


def create_session(
    model_path: Path,
    preferred_providers: list[str] | None = None,
    threads: int | None = None,
    config: dict[str, str] | None = None,
) -> tuple[ort.InferenceSession, str]:
    """Open `model_path` on the first usable provider. Returns the session and the provider's name."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    provider = choose_provider(preferred_providers or ["CPUExecutionProvider"])
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    log.info("execution provider: %s", provider)
    return session, provider
