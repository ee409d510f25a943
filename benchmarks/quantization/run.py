"""Quantization quality, size and time on SmolLM2-135M-Instruct, measured on the bundles.

Calibrates on one English text of ../shared/corpora and evaluates perplexity on the
others, with the device runtime (edgekit.device.perplexity: non-overlapping 512-token
windows) on each exported bundle, so every number is what a device would get:

    python benchmarks/quantization/run.py                      # all rows but ort-gptq4, ~40 min on 2 busy cores
    python benchmarks/quantization/run.py --only fp32 rtn4 gptq4

Rows: fp32, RTN/GPTQ/AWQ int4 g128, RTN int8 per-channel, SmoothQuant W8A8, plain W8A8,
GPTQ variants (symmetric, groups of 64, int4 lm_head), and the established libraries:
llm-compressor's GPTQ (llmc-gptq4-g64, its own venv: setup_peer_llmcompressor.sh) and
onnxruntime's MatMulNBits quantizer (RTN and GPTQ modes, on the fp32 edgekit bundle), all
on the same calibration samples. Then the issue's acceptance checks are printed, and
everything is written to results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

CORPORA = ROOT.parent / "shared" / "corpora"
CALIB = "mini-giants-paper.txt"
EVAL = ["gpt-alternatives-survey.txt", "llama-ecosystem-overview.txt"]
SAMPLES, SEQ_LEN, WINDOW = 32, 512, 512
EVAL_TOKENS = 8192  # 16 windows; the whole 17k-token evaluation text takes 4-10 min per bundle on a busy 2-core host

# name -> ExportOptions fields
ROWS = {
    "fp32": {},
    "rtn4": dict(quant="rtn", bits=4, group_size=128),
    "gptq4": dict(quant="gptq", bits=4, group_size=128),
    "awq4": dict(quant="awq", bits=4, group_size=128),
    "rtn8": dict(quant="rtn", bits=8, group_size=0),
    "smoothquant": dict(quant="smoothquant"),
    "w8a8": dict(quant="w8a8"),
    "gptq4-sym": dict(quant="gptq", bits=4, group_size=128, sym=True),  # to compare with ort-gptq4 (symmetric)
    "gptq4-head4": dict(quant="gptq", bits=4, group_size=128, lm_head_bits=4),  # --lm-head-bits 4: the speed option
    # llm-compressor refuses groups of 128 on SmolLM2's 576 input features: both GPTQs at 64
    "gptq4-g64": dict(quant="gptq", bits=4, group_size=64),
    "llmc-gptq4-g64": "llmc",
    "ort-rtn4": "ort",
    "ort-gptq4": "ort",
}


# onnxruntime's GPTQ mode ran at more than a minute per MatMul here (120 MatMuls: hours); run it with --only
SLOW_ROWS = {"ort-gptq4"}
# llm-compressor's own virtual environment (setup_peer_llmcompressor.sh): it pins an older transformers
LLMC_PYTHON = Path.home() / ".cache" / "edgekit" / "peer-llmc" / "bin" / "python"


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def export_row(name: str, spec: dict, work: Path) -> tuple[Path, float]:
    from edgekit.host import ExportOptions, export

    out = work / name
    options = ExportOptions(calib=str(CORPORA / CALIB), calib_samples=SAMPLES, calib_seq_len=SEQ_LEN, seed=0, **spec)
    export("smollm2-135m", out, options, progress=lambda m: print(f"  {name}: {m.strip()}", flush=True))
    manifest = json.loads((out / "edgekit.json").read_text())
    q = manifest["quantization"]
    return out, q.get("seconds", 0.0) if q.get("method") != "none" else 0.0


def ort_row(name: str, fp32: Path, work: Path) -> tuple[Path, float]:
    """onnxruntime's MatMulNBits quantizer on the fp32 bundle: int4, block 128, asymmetric,
    accuracy_level 4; GPTQ mode is fed the same 32 x 512 calibration windows."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    from edgekit.device.bundle import Quantization, read_manifest, write_manifest

    out = work / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fp32, out)
    model = onnx.load(str(out / "model.onnx"))
    t = time.perf_counter()
    if name == "ort-rtn4":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False, accuracy_level=4)
    else:
        from transformers import AutoTokenizer

        from edgekit.host.load import resolve
        from edgekit.host.quant.calibration import calibration_ids

        src = resolve("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
        ids = calibration_ids(tok, CORPORA / CALIB, SAMPLES, SEQ_LEN, 0).ids.numpy()
        arch = read_manifest(fp32).architecture

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rows = iter(ids)

            def get_next(self):
                row = next(self.rows, None)
                if row is None:
                    return None
                feed = {"input_ids": row[None, :].astype(np.int64),
                        "seqlens_k": np.array([SEQ_LEN - 1], np.int32),
                        "total_sequence_length": np.array(SEQ_LEN, np.int32),
                        "num_logits_to_keep": np.array([1], np.int64)}
                for i in range(arch.num_layers):
                    for kind in ("key", "value"):
                        feed[f"past_key_values.{i}.{kind}"] = np.zeros(
                            (1, arch.num_kv_heads, 0, arch.head_size), np.float32)
                return feed

            def rewind(self):
                self.rows = iter(ids)

        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01, block_size=128,
                                               actorder=False, perchannel=True)
    # GPTQ mode runs symmetric: its asymmetric path packs zero points for the whole matrix at once and
    # cannot reshape them per row when K / block is odd (576 / 128 = 5 blocks in SmolLM2), onnxruntime 1.32
    sym = name == "ort-gptq4"
    quant = mnq.MatMulNBitsQuantizer(model, block_size=128, is_symmetric=sym, accuracy_level=4,
                                     algo_config=config)
    quant.process()
    seconds = time.perf_counter() - t
    for p in out.glob("model.onnx*"):
        p.unlink()
    onnx.save_model(quant.model.model, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    manifest = read_manifest(out, verify=False)
    manifest.quantization = Quantization(method=name, bits=4, group_size=128, symmetric=sym, accuracy_level=4,
                                         extra={"tool": "onnxruntime.quantization.matmul_nbits_quantizer"})
    write_manifest(out, manifest)
    return out, seconds


def llmc_row(name: str, work: Path, group_size: int = 64) -> tuple[Path, float]:
    """llm-compressor's GPTQ (peer_llmcompressor.py, in its own venv) on the same calibration
    windows, its integer codes packed into the graph edgekit builds: same kernels, same
    float16 embedding and int8 lm_head, so only the choice of codes differs from gptq4-g64."""
    import subprocess

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.host import graph
    from edgekit.host.export import ExportOptions, write_bundle
    from edgekit.host.families import family_of
    from edgekit.host.load import fp32_weights, load
    from edgekit.host.options import plan_export
    from edgekit.host.quant import store_embeddings, store_layer
    from edgekit.host.quant.calibration import calibration_ids
    from edgekit.host.quant.nbits import NBitsWeight

    if not LLMC_PYTHON.exists():
        raise SystemExit(f"{name}: llm-compressor's venv is missing; run bash {HERE / 'setup_peer_llmcompressor.sh'}")
    loaded = load("smollm2-135m")
    model = loaded.model
    # the peer reads a plain Hugging Face folder; the shipped GGUF loads as a "gguf-quantized" model
    # that save_pretrained refuses, so copy its fp32 weights into a fresh one
    hf, ids, codes = work / "smollm2-hf", work / "calib_ids.npy", work / f"{name}.npz"
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(hf)
    np.save(ids, calibration_ids(loaded.tokenizer, CORPORA / CALIB, SAMPLES, SEQ_LEN, 0).ids.numpy())
    run = subprocess.run([str(LLMC_PYTHON), str(HERE / "peer_llmcompressor.py"), str(hf), str(ids), str(codes),
                          "--group-size", str(group_size)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{name}: llm-compressor failed:\n{run.stderr[-3000:]}")
    seconds = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]

    family = family_of(model)
    arch = family.architecture()
    weights = fp32_weights(model)
    npz = np.load(codes)
    graph_weights = dict(weights)
    for i, layer in enumerate(model.get_submodule(family.decoder_layers)):
        p = f"{family.decoder_layers}.{i}"
        quantized = {path: NBitsWeight(npz[f"{p}.{path}.codes"], npz[f"{p}.{path}.scales"],
                                       npz[f"{p}.{path}.zeros"], bits=4, block_size=group_size,
                                       in_features=layer.get_submodule(path).in_features) for path in family.linears}
        store_layer(graph_weights, p, layer, quantized)
    store_embeddings(graph_weights, weights, family)
    proto = graph.build(family.describe(graph_weights, arch), "fused")
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    write_bundle(out, loaded, arch, proto, plan_export(ExportOptions()),
                 quantization={"method": name, "bits": 4, "group_size": group_size, "symmetric": False,
                               "accuracy_level": 4, "tool": "llmcompressor GPTQModifier", "seconds": seconds})
    return out, seconds


def _recorded_seconds(bundle: Path) -> float:
    q = json.loads((bundle / "edgekit.json").read_text())["quantization"]
    return q.get("seconds", 0.0) if q.get("method") != "none" else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--work", default="/tmp/edgekit-quant-bench", help="where bundles are written")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already in --work")
    ap.add_argument("--max-eval-tokens", type=int, default=EVAL_TOKENS, help=f"default {EVAL_TOKENS}; 0 = all")
    args = ap.parse_args()
    from edgekit.device import Model
    from edgekit.device.perplexity import perplexity

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join((CORPORA / f).read_text() for f in EVAL)
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    names = args.only or [n for n in ROWS if n not in SLOW_ROWS]
    if any(ROWS[n] == "ort" for n in names) and not (work / "fp32" / "edgekit.json").exists():
        names = ["fp32", *[n for n in names if n != "fp32"]]
    for name in names:
        spec = ROWS[name]
        bundle = work / name
        if args.reuse and (bundle / "edgekit.json").exists():
            seconds = results.get(name, {}).get("quant_seconds") or _recorded_seconds(bundle)
        elif spec == "ort":
            bundle, seconds = ort_row(name, work / "fp32", work)
        elif spec == "llmc":
            bundle, seconds = llmc_row(name, work)
        else:
            bundle, seconds = export_row(name, spec, work)
        ppl = perplexity(Model(bundle, threads=2), text, WINDOW, args.max_eval_tokens or None)
        results[name] = {"perplexity": ppl.perplexity, "size_mb": folder_mb(bundle), "quant_seconds": seconds,
                         "eval_tokens": ppl.tokens, "eval_seconds": ppl.seconds}
        print(f"{name:14s} ppl {ppl.perplexity:8.3f}  size {folder_mb(bundle):7.1f} MB  quant {seconds:6.1f}s  "
              f"(eval {ppl.tokens} tokens, {ppl.seconds:.0f}s)", flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    return 0


def report(results: dict) -> None:
    fp = results.get("fp32")
    print(f"\ncalibration: {CALIB}, {SAMPLES} x {SEQ_LEN} tokens, seed 0; evaluation: {' + '.join(EVAL)}, "
          f"first {EVAL_TOKENS} tokens, non-overlapping {WINDOW}-token windows")
    print(f"| {'bundle':14s} | perplexity | vs fp32 | size MB | x fp32 | quantize s |")
    print(f"|{'-' * 16}|-----------:|--------:|--------:|-------:|-----------:|")
    for name, r in results.items():
        d = f"{(r['perplexity'] / fp['perplexity'] - 1) * 100:+.2f}%" if fp else ""
        x = f"{r['size_mb'] / fp['size_mb']:.3f}" if fp else ""
        print(f"| {name:14s} | {r['perplexity']:10.3f} | {d:>7s} | {r['size_mb']:7.1f} | {x:>6s} | "
              f"{r['quant_seconds']:10.1f} |")
    if not fp:
        return
    p = {k: v["perplexity"] for k, v in results.items()}
    checks = []
    if "rtn4" in p:
        gap = p["rtn4"] - p["fp32"]
        for m in ("gptq4", "awq4"):
            if m in p:
                checks.append((f"{m} recovers >= half of RTN4's increase ({(p['rtn4'] - p[m]) / gap:.0%})",
                               p[m] <= p["fp32"] + gap / 2))
        checks.append((f"int4 g128 size <= 0.35 x fp32 ({results['rtn4']['size_mb'] / fp['size_mb']:.3f})",
                       results["rtn4"]["size_mb"] <= 0.35 * fp["size_mb"]))
    if "smoothquant" in p:
        checks.append((f"SmoothQuant within 3% of fp32 ({p['smoothquant'] / p['fp32'] - 1:+.2%})",
                       p["smoothquant"] <= 1.03 * p["fp32"]))
        if "w8a8" in p:
            checks.append(("SmoothQuant better than plain W8A8", p["smoothquant"] < p["w8a8"]))
    if "rtn8" in p:
        checks.append((f"8-bit weight-only within 1% of fp32 ({p['rtn8'] / p['fp32'] - 1:+.2%})",
                       p["rtn8"] <= 1.01 * p["fp32"]))
    if "gptq4-sym" in p and "ort-gptq4" in p:
        checks.append(("edgekit GPTQ (symmetric) no worse than onnxruntime's GPTQ (symmetric)",
                       p["gptq4-sym"] <= p["ort-gptq4"]))
    if "gptq4-g64" in p and "llmc-gptq4-g64" in p:
        checks.append((f"edgekit GPTQ no worse than llm-compressor's GPTQ (int4 g64 asymmetric: "
                       f"{p['gptq4-g64']:.3f} vs {p['llmc-gptq4-g64']:.3f})", p["gptq4-g64"] <= p["llmc-gptq4-g64"]))
    if "gptq4" in p and "ort-gptq4" in p:
        checks.append(("edgekit GPTQ (default, asymmetric) no worse than onnxruntime's GPTQ",
                       p["gptq4"] <= p["ort-gptq4"]))
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")


if __name__ == "__main__":
    sys.exit(main())
