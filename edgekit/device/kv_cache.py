"""The KV cache, and how one run of the graph reads and writes it.

Both strategies keep the cache in the same numpy-owned buffers, one pair per layer,
(1, kv_heads, context_length, head_size), so a baked-in prefix (prefix tuning) is written in
the same way and a caller never sees which strategy runs. The buffers live in an anonymous
memory map (allocate): a position takes memory only once it is written.

    SharedBuffer   the fused graph: GroupQueryAttention takes past and present as one buffer
                   (onnxruntime-genai's past_present_share_buffer). Bound once with IO binding as
                   both the layer's past_key_values input and its present output; a run writes its
                   new keys and values in place at position seqlens_k, and copies nothing.

    GrowingCache   the portable graph (standard operators): past_key_values are positions
                   [0, past) of the buffers, present comes back past + new positions long and is
                   copied into the same buffers.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from edgekit.errors import InputError


def allocate(names: Sequence[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Zeroed float32 buffers of `shape`, one per name, in one anonymous memory map.

    The kernel provides a page when it is first written, so positions never used take no memory.
    np.zeros does not promise that: glibc serves a 1.5 MB calloc from the heap once its threshold
    for mapping large blocks has risen (it rises when a large mapped block is freed, as onnxruntime
    does while it loads a model), and zeroes heap memory by writing it. SmolLM2 int4 at a 2048-token
    context: 14-17 MB less peak memory with a 131-token prompt and 13 MB with a 512-token one, at the
    same speed (benchmarks/README.md).
    """
    count = int(np.prod(shape))
    memory = mmap.mmap(-1, 4 * count * len(names))  # each array keeps it alive; unmapped when the last goes
    return {name: np.frombuffer(memory, np.float32, count, offset=4 * count * i).reshape(shape)
            for i, name in enumerate(names)}


class SharedBuffer:
    def __init__(self, session: ort.InferenceSession, buffers: dict[str, np.ndarray], vocab_size: int):
        self.session = session
        self.buffers = buffers  # "key.{i}" / "value.{i}" -> (1, kv_heads, context_length, head_size)
        self.binding = session.io_binding()
        for name, buf in buffers.items():
            kind, i = name.split(".")
            value = ort.OrtValue.ortvalue_from_numpy(buf)  # wraps numpy's memory, no copy
            self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
            self.binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
        self.vocab_size = vocab_size
        self.one_row = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, vocab_size), np.float32)
        # A decode step's inputs live in numpy arrays that stay bound: a step writes four numbers in place
        # instead of binding four new inputs (which copies each and costs more than the writes)
        self.step: dict[str, np.ndarray] = {
            "input_ids": np.zeros((1, 1), np.int64), "seqlens_k": np.zeros(1, np.int32),
            "total_sequence_length": np.zeros((), np.int32), "num_logits_to_keep": np.ones(1, np.int64)}
        self.step_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.step.items()}
        self.step_bound = False

    def run(self, ids: Sequence[int], past: int, keep: int) -> np.ndarray:
        """Logits (keep, vocab) of the last `keep` of `ids`, fed after `past` cached positions."""
        b = self.binding
        total = past + len(ids)
        if len(ids) == 1 and keep == 1:
            s = self.step
            s["input_ids"][0, 0], s["seqlens_k"][0], s["total_sequence_length"][()] = ids[0], total - 1, total
            if not self.step_bound:
                for name, value in self.step_values.items():
                    b.bind_ortvalue_input(name, value)
                b.bind_ortvalue_output("logits", self.one_row)
                self.step_bound = True
            self.session.run_with_iobinding(b)
            return self.one_row.numpy()[0].copy()  # numpy() views the bound buffer, which the next run overwrites
        self.step_bound = False
        b.bind_cpu_input("input_ids", np.asarray(ids, dtype=np.int64)[None, :])
        b.bind_cpu_input("seqlens_k", np.array([total - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        b.bind_cpu_input("num_logits_to_keep", np.array([keep], dtype=np.int64))
        logits = self.one_row if keep == 1 else \
            ort.OrtValue.ortvalue_from_shape_and_type((1, keep, self.vocab_size), np.float32)
        b.bind_ortvalue_output("logits", logits)
        self.session.run_with_iobinding(b)
        return logits.numpy()[0].copy()


class GrowingCache:
    def __init__(self, session: ort.InferenceSession, buffers: dict[str, np.ndarray]):
        self.session = session
        self.buffers = buffers
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, ids: Sequence[int], past: int, keep: int) -> np.ndarray:
        n = len(ids)
        feeds = {
            "input_ids": np.asarray(ids, dtype=np.int64)[None, :],
            "position_ids": np.arange(past, past + n, dtype=np.int64)[None, :],
            "num_logits_to_keep": np.array([keep], dtype=np.int64),
        }
        for name, buf in self.buffers.items():
            kind, i = name.split(".")
            feeds[f"past_key_values.{i}.{kind}"] = buf[:, :, :past]
        logits = None
        for name, value in zip(self.outputs, self.session.run(self.outputs, feeds), strict=True):
            if name == "logits":
                logits = value
            else:  # present.{i}.{kind}: (1, kv_heads, past + n, head_size)
                _, i, kind = name.split(".")
                self.buffers[f"{kind}.{i}"][:, :, : past + n] = value
        assert logits is not None
        return logits[0]


def buffers_for(num_layers: int, kv_heads: int, length: int, head_size: int) -> dict[str, np.ndarray]:
    """Zeroed key and value buffers for `length` positions, "key.{i}" / "value.{i}" per layer; InputError
    naming the size when the device cannot map that much."""
    names = [f"{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    shape = (1, kv_heads, length, head_size)  # (batch, kv_heads, seq, head_size)
    try:
        return allocate(names, shape)
    except (OSError, MemoryError, OverflowError) as e:
        need = 4 * len(names) * float(np.prod(shape, dtype=np.float64)) / 2**30
        raise InputError(f"the KV cache for a context of {length} tokens needs {need:.3g} GiB, "
                         f"which this device cannot map ({e}); pass a smaller context_length") from None


def for_graph(flavour: str, session: ort.InferenceSession, buffers: dict[str, np.ndarray],
              vocab_size: int) -> SharedBuffer | GrowingCache:
    """The cache strategy for a graph of `flavour` over `buffers` (a session rebuilt with another
    thread count takes the same buffers, and the tokens cached in them stay valid)."""
    if flavour == "portable":
        return GrowingCache(session, buffers)
    return SharedBuffer(session, buffers, vocab_size)
