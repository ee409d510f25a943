"""An onnxruntime session for a bundle: execution provider choice and threads."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from edgekit.device.bundle import BundleError

log = logging.getLogger("edgekit")


def choose_provider(preferred: list[str]) -> str:
    """The first of `preferred` that the installed onnxruntime offers, else CPU.

    Warns when that is not the bundle's first choice (e.g. a Jetson bundle on an
    onnxruntime without CUDA runs on its CPU, much slower than it should).
    """
    available = ort.get_available_providers()
    chosen = next((name for name in preferred if name in available), "CPUExecutionProvider")
    if preferred and chosen != preferred[0]:
        log.warning("the bundle's first execution provider %s is not in this onnxruntime (it has %s); using %s",
                    preferred[0], ", ".join(available), chosen)
    return chosen


def create_session(
    model_path: Path,
    preferred_providers: list[str] | None = None,
    threads: int | None = None,
    config: dict[str, str] | None = None,
    profile_prefix: str | Path | None = None,
) -> tuple[ort.InferenceSession, str]:
    """Open `model_path` on the first usable provider. Returns the session and the provider's name.

    With `profile_prefix`, onnxruntime's profiler records every run; `session.end_profiling()`
    then writes `{profile_prefix}_<date>.json` and returns its path (see device/op_profile.py).
    """
    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    provider = choose_provider(preferred_providers or ["CPUExecutionProvider"])
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BundleError(f"{model_path}: onnxruntime cannot load the graph ({first}); the bundle is damaged "
                          "or incomplete (model.onnx and model.onnx.data go together): copy or export it again"
                          ) from None
    log.info("execution provider: %s", provider)
    return session, provider
