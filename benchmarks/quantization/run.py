"""Quantization quality, size and time on SmolLM2-135M-Instruct, measured on the bundles.

Exports SmolLM2-135M-Instruct with each method, then evaluates every bundle with the device
runtime (edgekit.device.perplexity: non-overlapping 512-token windows, each from an empty
cache) on every text of texts.py: four English texts of other domains that ship with
Debian (a licence, a manual page, a GNU manual, release notes) and the two in-domain seed
documents. Evaluation is bounded: the first EVAL_TOKENS[text] tokens of each text.

    python benchmarks/quantization/run.py                       # the DEFAULT rows
    python benchmarks/quantization/run.py --only fp32 rtn-g128 gptq-g128
    python benchmarks/quantization/run.py --reuse --only gptq-g32   # re-evaluate a bundle already in --work
    python benchmarks/quantization/run.py --report              # print the table and checks from results.json

Calibration: "default" is edgekit's built-in text (CPython's pydoc topics: what a user gets
without --calib); rows ending in -narrow calibrate on one seed document
(--calib mini-giants-paper.txt), never evaluated on. int4-best is the preset
(--quant int4-best): with --calib it adds as many samples of the default text; without,
it calibrates on the default text alone (so int4-best and gptq-g32 are the same recipe).
Rows: fp32; RTN/GPTQ/AWQ int4 at groups of 32, 64 and 128 with both calibrations; the
earlier rows (int8, SmoothQuant, W8A8, GPTQ variants) and the established libraries:
llm-compressor's GPTQ (llmc-gptq4-g64, its own venv: setup_peer_llmcompressor.sh) and
onnxruntime's MatMulNBits quantizer (RTN and GPTQ modes, on the fp32 edgekit bundle).
Then the acceptance checks of issue #16 are printed, and everything is written to
results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import texts as texts_  # noqa: E402  (benchmarks/quantization/texts.py)

CORPORA = ROOT.parent / "shared" / "corpora"
CALIB = "mini-giants-paper.txt"  # the narrow --calib (texts.CALIB); also what llmc and ort rows calibrate on
NARROW = str(texts_.CALIB)
SAMPLES, SEQ_LEN, WINDOW = 32, 512, 512
# evaluation bound: the first 2048 tokens (4 windows of 512) of each text, 12288 tokens in all
# (under a minute per bundle on 2 cores; the export is what takes time)
EVAL_TOKENS = dict.fromkeys([*texts_.OUT_OF_DOMAIN, *texts_.IN_DOMAIN], 2048)
OOD = list(texts_.OUT_OF_DOMAIN)
IND = list(texts_.IN_DOMAIN)


def _int4_rows() -> dict:
    rows: dict = {}
    for g in (128, 32, 64):
        rows[f"rtn-g{g}"] = dict(quant="rtn", bits=4, group_size=g)  # calibration-free
        for m in ("gptq", "awq"):
            rows[f"{m}-g{g}"] = dict(quant=m, bits=4, group_size=g)
            rows[f"{m}-g{g}-narrow"] = dict(quant=m, bits=4, group_size=g, calib=NARROW)
    return rows


# name -> ExportOptions fields (calib absent: the default calibration text)
ROWS: dict = {
    "fp32": {},
    "int4-best": dict(quant="int4-best"),
    "int4-best-narrow": dict(quant="int4-best", calib=NARROW),
    "int4-best-head4": dict(quant="int4-best", lm_head_bits=4),  # --lm-head-bits 4: decode speed for quality
    **_int4_rows(),
    # the earlier rows, calibrated on the seed document as before
    "rtn8": dict(quant="rtn", bits=8, group_size=0),
    "smoothquant": dict(quant="smoothquant", calib=NARROW),
    "w8a8": dict(quant="w8a8"),
    "gptq4-sym": dict(quant="gptq", bits=4, group_size=128, sym=True, calib=NARROW),  # vs ort-gptq4 (symmetric)
    "gptq4-head4": dict(quant="gptq", bits=4, group_size=128, lm_head_bits=4, calib=NARROW),  # --lm-head-bits 4
    # llm-compressor refuses groups of 128 on SmolLM2's 576 input features: compare with gptq-g64-narrow
    "llmc-gptq4-g64": "llmc",
    "ort-rtn4": "ort",
    "ort-gptq4": "ort",
}
# what a run without --only does, in order of priority for the bar
DEFAULT = ["fp32", "rtn-g128", "gptq-g128", "int4-best", "int4-best-narrow", "gptq-g128-narrow", "awq-g128",
           "awq-g128-narrow", "rtn-g32", "gptq-g32", "rtn-g64", "gptq-g64", "awq-g32", "awq-g64"]
# llm-compressor's own virtual environment (setup_peer_llmcompressor.sh): it pins an older transformers
LLMC_PYTHON = Path.home() / ".cache" / "edgekit" / "peer-llmc" / "bin" / "python"


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def export_row(name: str, spec: dict, work: Path) -> tuple[Path, float]:
    from edgekit.host import ExportOptions, export

    out = work / name
    calib = dict(calib_samples=SAMPLES, calib_seq_len=SEQ_LEN) if spec.get("quant") else {}
    options = ExportOptions(seed=0, **calib, **spec)
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
    windows as gptq-g64-narrow, its integer codes packed into the graph edgekit builds: same
    kernels, same int8 embedding and int8 lm_head, so only the choice of codes differs."""
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
    from edgekit.quantization import METHODS

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
    loaded.tokenizer.save_pretrained(hf)  # llm-compressor builds its processor from the folder
    np.save(ids, calibration_ids(loaded.tokenizer, CORPORA / CALIB, SAMPLES, SEQ_LEN, 0,
                                 mix_default=METHODS["gptq"].mixed_calibration).ids.numpy())
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


class LoadSampler:
    """The host's 1-minute load average, sampled every `every` seconds while a row runs."""

    def __init__(self, every: float = 15.0):
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def mean(self) -> float:
        self._stop.set()
        return sum(self.samples) / len(self.samples)


def evaluate(bundle: Path, corpus: dict[str, str]) -> dict:
    from edgekit.device import Model
    from edgekit.device.perplexity import perplexity

    model = Model(bundle, threads=2)
    out = {}
    for name, text in corpus.items():
        r = perplexity(model, text, WINDOW, EVAL_TOKENS[name])
        out[name] = {"perplexity": r.perplexity, "tokens": r.tokens, "seconds": round(r.seconds, 1)}
    return out


def mean(ppl: dict, names: list[str]) -> float:
    return sum(ppl[n]["perplexity"] for n in names) / len(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(ROWS), help=f"rows to run (default: {' '.join(DEFAULT)})")
    ap.add_argument("--work", default="/tmp/edgekit-quant-bench", help="where bundles are written")
    ap.add_argument("--reuse", action="store_true", help="re-evaluate bundles already in --work instead of exporting")
    ap.add_argument("--report", action="store_true", help="only print the table and checks of results.json")
    ap.add_argument("--results", default=str(HERE / "results.json"),
                    help="the results file to update (one per process when runs go in parallel)")
    args = ap.parse_args()
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.report:
        report(results)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = texts_.texts()
    names = args.only or DEFAULT
    if any(ROWS[n] == "ort" for n in names) and not (work / "fp32" / "edgekit.json").exists():
        names = ["fp32", *[n for n in names if n != "fp32"]]
    for name in names:
        spec = ROWS[name]
        bundle = work / name
        load = LoadSampler()
        reused = args.reuse and (bundle / "edgekit.json").exists()
        if reused:  # its quantize time is the one its manifest recorded; the load then is unknown
            seconds = _recorded_seconds(bundle)
        elif spec == "ort":
            bundle, seconds = ort_row(name, work / "fp32", work)
        elif spec == "llmc":
            bundle, seconds = llmc_row(name, work)
        else:
            bundle, seconds = export_row(name, spec, work)
        export_load = None if reused else round(load.mean(), 2)
        t = time.perf_counter()
        ppl = evaluate(bundle, corpus)
        q = json.loads((bundle / "edgekit.json").read_text())["quantization"]
        results[name] = {"texts": ppl, "ood_mean": mean(ppl, OOD), "in_domain_mean": mean(ppl, IND),
                         "size_mb": folder_mb(bundle), "quant_seconds": seconds, "load": export_load,
                         "calibration": (q.get("calibration") or {}).get("source"),
                         "eval_seconds": round(time.perf_counter() - t, 1)}
        print(f"{name:18s} " + " ".join(f"{n}={v['perplexity']:.2f}" for n, v in ppl.items())
              + f"  ood mean {results[name]['ood_mean']:.2f}  size {folder_mb(bundle):.1f} MB  quant {seconds:.1f}s"
              f"  load {export_load}  (eval {results[name]['eval_seconds']:.0f}s)", flush=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    return 0


def _ppl(results: dict, name: str, text: str) -> float:
    return results[name]["texts"][text]["perplexity"]


def _load(r: dict) -> str:
    return "-" if r.get("load") is None else f"{r['load']:.1f}"


def report(results: dict) -> None:
    results = {k: v for k, v in results.items() if "texts" in v}  # rows of this evaluation
    fp = results.get("fp32")
    cols = [*OOD, "ood mean", *IND]
    print(f"\nevaluation: first {EVAL_TOKENS[OOD[0]]} tokens of each out-of-domain text, first "
          f"{EVAL_TOKENS[IND[0]]} of each in-domain one, non-overlapping {WINDOW}-token windows; "
          f"calibration {SAMPLES} x {SEQ_LEN} tokens, seed 0 (default text, or -narrow: {CALIB} "
          "and as many of the default text)")
    print("| bundle | " + " | ".join(cols) + " | vs fp32 (ood mean) | size MB | x fp32 | quantize s | load |")
    print("|---|" + "---:|" * (len(cols) + 5))
    for name in [n for n in ROWS if n in results]:
        r = results[name]
        vals = [_ppl(results, name, t) for t in OOD] + [r["ood_mean"]] + [_ppl(results, name, t) for t in IND]
        d = f"{(r['ood_mean'] / fp['ood_mean'] - 1) * 100:+.1f}%" if fp else ""
        x = f"{r['size_mb'] / fp['size_mb']:.3f}" if fp else ""
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals)
              + f" | {d} | {r['size_mb']:.1f} | {x} | {r['quant_seconds']:.0f} | {_load(r)} |")
    for ok, text in checks(results):
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")


def checks(results: dict) -> list[tuple[bool, str]]:
    """Issue #16's bar, on the rows present."""
    out: list[tuple[bool, str]] = []
    fp = results.get("fp32")
    every = OOD + IND
    # GPTQ and AWQ never worse than RTN on any text, at each group size and calibration measured
    for g in (32, 64, 128):
        rtn = f"rtn-g{g}"
        if rtn not in results:
            continue
        for m in ("gptq", "awq"):
            for suffix in ("", "-narrow"):
                name = f"{m}-g{g}{suffix}"
                if name not in results:
                    continue
                worse = [f"{t} {_ppl(results, name, t):.2f} > {_ppl(results, rtn, t):.2f}" for t in every
                         if _ppl(results, name, t) > _ppl(results, rtn, t)]
                out.append((not worse, f"{name} never worse than {rtn} on any text"
                            + (f" (worse on {'; '.join(worse)})" if worse else "")))
    # g128: >= 50% of RTN's increase recovered, on the out-of-domain mean and on each text
    if fp and "rtn-g128" in results:
        rtn = results["rtn-g128"]
        for name in ("gptq-g128", "gptq-g128-narrow", "awq-g128", "awq-g128-narrow"):
            if name not in results:
                continue
            r = results[name]
            rec = {"ood mean": (rtn["ood_mean"] - r["ood_mean"]) / (rtn["ood_mean"] - fp["ood_mean"])}
            for t in OOD:
                rec[t] = ((_ppl(results, "rtn-g128", t) - _ppl(results, name, t))
                          / (_ppl(results, "rtn-g128", t) - _ppl(results, "fp32", t)))
            out.append((min(rec.values()) >= 0.5, f"{name} recovers >= 50% of rtn-g128's increase ("
                        + ", ".join(f"{k} {v:.0%}" for k, v in rec.items()) + ")"))
    # the best recipe: +10% of fp32 on every out-of-domain text, <= 0.3x the size, <= 300 s
    if fp:
        for name in ("int4-best", "int4-best-narrow"):
            if name not in results:
                continue
            r = results[name]
            over = {t: _ppl(results, name, t) / _ppl(results, "fp32", t) - 1 for t in OOD}
            out.append((max(over.values()) <= 0.10, f"{name} within +10% of fp32 on every out-of-domain text ("
                        + ", ".join(f"{t} {v:+.1%}" for t, v in over.items()) + ")"))
            x = r["size_mb"] / fp["size_mb"]
            out.append((x <= 0.3, f"{name} size <= 0.3x fp32 ({x:.3f})"))
            out.append((r["quant_seconds"] <= 300, f"{name} quantizes in <= 300 s ({r['quant_seconds']:.0f} s, "
                        f"load average {_load(r)} on 2 cores)"))
    if "gptq-g64-narrow" in results and "llmc-gptq4-g64" in results:
        a, b = results["gptq-g64-narrow"]["ood_mean"], results["llmc-gptq4-g64"]["ood_mean"]
        out.append((a <= b, f"edgekit GPTQ g64 no worse than llm-compressor's GPTQ g64, same calibration samples "
                    f"(ood mean {a:.2f} vs {b:.2f})"))
    if fp and "smoothquant" in results:
        d = results["smoothquant"]["ood_mean"] / fp["ood_mean"] - 1
        out.append((d <= 0.03, f"SmoothQuant within 3% of fp32 (ood mean {d:+.2%})"))
        if "w8a8" in results:
            out.append((results["smoothquant"]["ood_mean"] < results["w8a8"]["ood_mean"],
                        "SmoothQuant better than plain W8A8"))
    if fp and "rtn8" in results:
        d = results["rtn8"]["ood_mean"] / fp["ood_mean"] - 1
        out.append((d <= 0.01, f"8-bit weight-only within 1% of fp32 (ood mean {d:+.2%})"))
    return out


if __name__ == "__main__":
    sys.exit(main())
