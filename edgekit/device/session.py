"""An onnxruntime session for a bundle: execution provider choice and threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
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
    log.info("execution provider: %s, %s intra-op threads", provider, threads or "onnxruntime's default")
    return session, provider


MADV_RANDOM, MADV_DONTNEED = 1, 4  # Linux


@dataclass
class MemoryMap:
    start: int
    end: int
    offset: int  # where the map starts in its file
    path: str  # "" for an anonymous map
    kb: dict[str, int]  # "Rss", "Anonymous", ...: the kB lines of its /proc/self/smaps entry


def memory_maps() -> list[MemoryMap]:
    """This process's memory maps from /proc/self/smaps (Linux; OSError elsewhere)."""
    maps: list[MemoryMap] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # a header "start-end perms offset dev inode [path]", or "Key: value kB"
        if fields[0].endswith(":"):
            if maps and len(fields) >= 2 and fields[1].isdigit():
                maps[-1].kb[fields[0][:-1]] = int(fields[1])
        else:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            maps.append(MemoryMap(start, end, int(fields[2], 16), fields[5] if len(fields) == 6 else "", {}))
    return maps


def release_load_memory(data_file: Path) -> int:
    """Give back the memory that loading a bundle used and running it does not; returns the size of
    the weight maps it dropped. Linux with glibc; elsewhere it does nothing and returns 0.

    - onnxruntime memory-maps `data_file` (the external weights) and pre-packs the int4 matrices
      from it into buffers of its own, which are what runs. The pages the packing read stay in this
      process's resident set as long as the maps live (9 MB for SmolLM2 int4): drop them.
      onnxruntime maps them copy-on-write: a map with a page written to (Anonymous > 0) is left
      alone, since dropping would undo the write.
    - The tensors it still reads from the maps (the embedding's table, the norms' weights) are also
      dropped from the page cache, and read at random: a token's row then comes back a page at a
      time. Otherwise a fault maps the whole large folio the bundle's verification read the file
      into: the 212 distinct tokens of one SmolLM2 request made 21 of the int8 table's 28 MB resident.
    - Loading the graph frees heap memory that glibc keeps for reuse: trim_heap hands it back.
    """
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c")).madvise
        maps = memory_maps()
    except (OSError, AttributeError, TypeError):  # not Linux/glibc (macOS, musl, Windows)
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target = str(data_file.resolve())
    unwritten = [m for m in maps if m.path == target and m.kb.get("Anonymous") == 0]
    released = 0
    if unwritten:  # a graph with its weights inside model.onnx maps no data file
        with open(target, "rb") as f:
            for m in unwritten:
                size = m.end - m.start
                if madvise(m.start, size, MADV_DONTNEED) == 0:
                    released += size
                    madvise(m.start, size, MADV_RANDOM)  # a fault reads its own page, no readahead
                    os.posix_fadvise(f.fileno(), m.offset, size, os.POSIX_FADV_DONTNEED)
    trim_heap()
    return released


def trim_heap() -> None:
    """Hand the heap memory glibc keeps for reuse back to the system (malloc_trim); elsewhere nothing."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass
