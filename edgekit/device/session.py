"""An onnxruntime session for a bundle: execution provider choice and threads."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from edgekit.device.bundle import BundleError

log = logging.getLogger("edgekit")

# onnxruntime's worker threads spin-wait between operators by default, until the next one comes:
# 1.3x faster decode on a quiet 2-core host, but when another process wants the cores (a camera
# or planning node) the spinning threads preempt each other and decode falls to 40-45% of its quiet
# speed. Not spinning at all keeps 74-91% under load but costs 0.72-0.75x of the quiet speed, for
# the wake-up of every operator of a 4 ms decode step. Spinning at most 10 µs (onnxruntime >= 1.26;
# older releases ignore the key and spin) catches the next operator of the same step and sleeps
# between steps: as fast as spinning on a quiet host, and 0.98-1.22x the speed of not spinning with
# one or two competing processes (benchmarks/README.md, spinning.py). A bundle's target profile or the
# caller may override either key ("0" turns spinning off, as the rpi4 profile does).
DEFAULT_CONFIG = {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": "10"}


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

    `config` entries are added to DEFAULT_CONFIG's, replacing those with the same key.

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
    for key, value in {**DEFAULT_CONFIG, **(config or {})}.items():
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
