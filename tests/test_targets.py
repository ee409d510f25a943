"""Device profiles, export per target, the operator and memory checks, and the provider choice."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgekit.cli import main
from edgekit.device import Model, check
from edgekit.device.session import choose_provider
from edgekit.device.targets import TargetError, available_targets, load_target
from edgekit.host import ExportError, ExportOptions, export
from edgekit.host.options import plan_export
from edgekit.quantization import METHODS

REQUIRED = {"rpi4": 4, "rpi5": 8, "jetson-orin-nano": 8, "jetson-agx-orin": 32, "x86-avx2": 8, "x86-avx512": 16}
REPO = Path(__file__).resolve().parents[1]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def multi_target(tiny_folder, tmp_path_factory) -> Path:
    """`edgekit export TINY --target rpi4,jetson-orin-nano --out DIR`: one bundle per target."""
    out = tmp_path_factory.mktemp("targets")
    assert main(["export", str(tiny_folder), "--target", "rpi4,jetson-orin-nano", "--out", str(out)]) == 0
    return out


def test_the_shipped_profiles_cover_the_required_devices():
    for name, ram in REQUIRED.items():
        t = load_target(name)
        assert t.ram_gb == ram
        assert t.execution_providers[-1] == "CPUExecutionProvider"
        assert t.cpu["arch"] in ("aarch64", "x86_64") and t.cpu["isa"]
    assert load_target("jetson-agx-orin").ram_variants_gb == [32, 64]
    assert load_target("x86-avx512").cpu["isa"].count("avx512vnni") == 1
    assert load_target("jetson-orin-nano").graph_flavour == "portable"  # TensorRT has no contrib operators
    assert load_target("rpi4").matmulnbits_accuracy_level == 1  # Cortex-A72: no int8 dot product
    assert load_target("rpi5").matmulnbits_accuracy_level == 4


def _write(folder: Path, name: str, **changes) -> Path:
    raw = json.loads((REPO / "targets" / "rpi5.json").read_text())
    raw.update(name=name, **changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del raw[k]
    path = folder / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_user_adds_a_device_with_a_file(tmp_path, monkeypatch):
    _write(tmp_path, "my-board", ram_gb=2, description="a 2 GB board")
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path))
    assert "my-board" in available_targets()
    assert load_target("my-board").ram_gb == 2
    assert load_target(str(tmp_path / "my-board.json")).description == "a 2 GB board"  # or by path


@pytest.mark.parametrize("changes, field", [
    ({"ram_gb": ...}, "'ram_gb' is missing"),
    ({"graph_flavour": "fast"}, "'graph_flavour' must be one of fused, portable"),
    ({"execution_providers": ["NPUExecutionProvider"]}, "'execution_providers' has unknown provider"),
    ({"quantization": {"method": "rtn", "bits": 3, "group_size": 32}}, "'quantization.bits' must be 4 or 8"),
    ({"session_config": {"session.intra_op.allow_spinning": 0}}, "'session_config.session.intra_op.allow_spinning'"),
    ({"threads": "four"}, "'threads' must be int or null"),
    ({"cpu": {"arch": "arm64", "cores": 4, "isa": []}}, "'cpu.arch' must be one of"),
    ({"ram": 4}, "'ram' is not a profile field"),
    # accepted, then a traceback after quantizing (8.0 == 8), or nonsense the memory check took as is
    ({"quantization": {"method": "rtn", "bits": 8.0}}, "'quantization.bits' must be an integer"),
    ({"quantization": {"method": "rtn", "group_size": 32.0}}, "'quantization.group_size' must be an integer"),
    ({"quantization": {"method": "rtn", "sym": "no"}}, "'quantization.sym' must be true or false"),
    ({"quantization": {"method": "rtn", "bitz": 4}}, "'quantization.bitz' is not a quantization field"),
    ({"quantization": {"method": "none", "bits": 4}}, "'quantization' sets bits with method none"),
    ({"ram_gb": float("inf")}, "'ram_gb' must be a positive number of GB"),
    ({"ram_gb": float("nan")}, "'ram_gb' must be a positive number of GB"),
    ({"os_reserved_gb": -100}, "'os_reserved_gb' must be from 0 to less than ram_gb"),
    ({"ram_variants_gb": ["a"]}, "'ram_variants_gb' must be a list of positive numbers"),
])
def test_a_malformed_profile_names_the_field(tmp_path, monkeypatch, capsys, changes, field):
    path = _write(tmp_path, "bad", **changes)
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path))
    with pytest.raises(TargetError) as e:
        load_target("bad")
    assert f"bad.json: field {field}" in str(e.value)
    # the CLI prints it as one line, before loading any model
    assert main(["export", "smollm2-135m", "--out", str(tmp_path / "out"), "--target", str(path)]) == 2
    assert field in capsys.readouterr().err


def test_a_profile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "latin.json").write_bytes(json.dumps({"name": "latin", "description": "caf\u00e9"}).encode()
                                          .replace(b"\\u00e9", "\u00e9".encode("latin-1")))
    assert main(["export", "x", "--out", str(tmp_path / "o"), "--target", str(tmp_path / "latin.json")]) == 2
    assert "latin.json: not UTF-8 text" in capsys.readouterr().err


def test_unknown_target_lists_the_known_ones(capsys):
    assert main(["export", "x", "--out", "/tmp/never", "--target", "rpi5,rpi9"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'rpi9'" in err and "rpi4" in err and "jetson-orin-nano" in err


def test_target_defaults_apply_where_no_flag_is_given():
    def planned(**fields):
        p = plan_export(ExportOptions(**fields))
        return None if p.quant is None else (p.quant.method.name, p.quant.spec.bits, p.quant.spec.group_size,
                                             p.quant.spec.sym)

    rpi5 = METHODS[load_target("rpi5").quantization["method"]]  # int4-best: GPTQ int4 g32
    bits, group = rpi5.bits[0], rpi5.group_size_for(rpi5.bits[0])
    assert planned(target="rpi5") == (rpi5.name, bits, group, False)
    assert plan_export(ExportOptions(target="rpi5")).target["threads"] == 4
    assert planned(target="jetson-orin-nano")[3] is True  # TensorRT wants zero zero-points
    assert planned(target="jetson-orin-nano", quant="rtn")[3] is True  # whatever the method (was dropped)
    with pytest.raises(ExportError, match="--fit-context .* add --target"):  # was silently ignored
        plan_export(ExportOptions(fit_context=True))
    assert planned(target="rpi5", quant="none") is None  # explicit flags win
    assert planned(target="rpi5", quant="rtn") == ("rtn", 4, 128, False)  # the method's own defaults
    assert planned(target="rpi5", bits=8) == ("gptq", 8, 0, False)  # int4-best is 4-bit: the method it is a recipe of
    assert planned(target="rpi5", quant="gptq", group_size=64) == ("gptq", 4, 64, False)
    assert planned() is None and plan_export(ExportOptions()).target["name"] == "x86-avx2"  # no target: fp32


def test_export_for_several_targets_writes_one_bundle_each(multi_target):
    assert sorted(p.name for p in multi_target.iterdir()) == ["jetson-orin-nano", "rpi4"]
    rpi4 = Model(multi_target / "rpi4")
    m = rpi4.manifest
    assert m.target.name == "rpi4" and m.target.threads == 4
    assert m.target.execution_providers == ["CPUExecutionProvider"]
    assert m.target.session_config == {"session.intra_op.allow_spinning": "0"}
    assert m.quantization.method == load_target("rpi4").quantization["method"] and m.graph.flavour == "fused"
    assert "com.microsoft::MatMulNBits" in m.graph.operators
    graph = onnx.load(str(multi_target / "rpi4" / "model.onnx"), load_external_data=False)
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {1}  # the target's, for its ISA
    assert m.quantization.accuracy_level == 1  # and the manifest says what the graph does

    nano = Model(multi_target / "jetson-orin-nano")
    assert nano.manifest.graph.flavour == "portable"
    assert all(op.startswith("ai.onnx::") for op in nano.manifest.graph.operators)
    assert "ai.onnx::DequantizeLinear" in nano.manifest.graph.operators
    assert len(nano.generate("The robot", max_new_tokens=4, temperature=0.0).token_ids) == 4


def test_operator_check_reports_fallbacks_and_failures(multi_target):
    fused_ops = Model(multi_target / "rpi4").manifest.graph.operators
    portable_ops = Model(multi_target / "jetson-orin-nano").manifest.graph.operators
    jetson = load_target("jetson-orin-nano").execution_providers

    r = check.check_operators(portable_ops, jetson)
    assert not r.fallbacks and not r.unsupported and set(r.placement.values()) == {"TensorrtExecutionProvider"}
    r = check.check_operators(fused_ops, jetson)  # the fused graph on a Jetson: contrib operators leave TensorRT
    assert r.placement["com.microsoft::MatMulNBits"] == "CUDAExecutionProvider"
    assert r.placement["com.microsoft::GroupQueryAttention"] == "CPUExecutionProvider"
    assert "float16/bfloat16 only" in r.fallbacks["com.microsoft::GroupQueryAttention"]
    r = check.check_operators(fused_ops + ["com.microsoft::NoSuchOp"], ["CPUExecutionProvider"])
    assert list(r.unsupported) == ["com.microsoft::NoSuchOp"] and "no CPU kernel" in r.summary()


def test_the_targets_command_lists_every_shipped_profile(capsys):
    """It raised KeyError 'bits' once the profiles took the int4-best preset (no bits, no group size)."""
    from edgekit.device.targets import available_targets

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in available_targets()) and "int4-best" in out


@pytest.mark.parametrize("flag, value", [("--context-length", "-5"), ("--context-length", "0"),
                                         ("--prompt-tokens", "-1"), ("--ram-gb", "-1"), ("--ram-gb", "nan")])
def test_check_refuses_impossible_numbers_in_one_line(flag, value, multi_target, capsys):
    assert main(["check", str(multi_target / "rpi4"), flag, value]) == 2  # -5 tokens "fitted", nan GB was exit 1
    assert "error" in capsys.readouterr().err


def test_check_command_says_whether_it_fits(multi_target, capsys):
    bundle = multi_target / "rpi4"
    assert main(["check", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "operators run on CPUExecutionProvider" in out
    assert "verdict  will run on rpi4" in out

    m = Model(bundle, verify=False).manifest
    weights = check.bundle_weight_bytes(bundle)
    need_64 = check.estimate_memory(m.architecture, weights, "fused", 64, quantized=True, accuracy_level=1).total_mb
    need_full = check.estimate_memory(m.architecture, weights, "fused", quantized=True, accuracy_level=1).total_mb
    assert need_64 < need_full
    ram_gb = 0.6 + (need_64 + need_full) / 2 / 1024  # room for 64 tokens, not for the whole context
    assert main(["check", str(bundle), "--ram-gb", f"{ram_gb:.6f}"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["check", str(bundle), "--ram-gb", f"{ram_gb:.6f}", "--fit-context"]) == 0
    assert "fits with context length" in capsys.readouterr().out


def test_the_verdict_is_data_a_device_program_can_read(multi_target):
    verdict = check.check_bundle(multi_target / "rpi4")
    assert verdict.runs and verdict.fits and verdict.target["name"] == "rpi4" and not verdict.operators.unsupported
    assert verdict.lines()[-1] == "verdict  will run on rpi4"
    tiny = check.check_bundle(multi_target / "rpi4", ram_gb=0.1, fit_context=True)  # less than the OS keeps
    assert not tiny.fits and tiny.fitting_context is None and not tiny.runs
    assert "does not fit at any context length" in "\n".join(tiny.lines())
    elsewhere = check.check_bundle(multi_target / "rpi4", target="jetson-orin-nano")
    assert elsewhere.target["name"] == "jetson-orin-nano" and "built for rpi4" in elsewhere.notes[0]


def test_export_refuses_a_bundle_that_does_not_fit_or_shrinks_its_context(tiny_bundle, tiny_folder, tmp_path,
                                                                          monkeypatch):
    # a device whose memory holds the runtime, the weights and 64 tokens of context, not all 256
    arch = Model(tiny_bundle, verify=False).manifest.architecture
    weights = check.bundle_weight_bytes(tiny_bundle)  # the same model in fp32
    budget = (check.estimate_memory(arch, weights, "fused", 64).total_mb +
              check.estimate_memory(arch, weights, "fused", 256).total_mb) / 2
    _write(tmp_path, "tiny-board", ram_gb=0.5 + budget / 1024, os_reserved_gb=0.5)
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path))
    options = ExportOptions(target="tiny-board", quant="none")
    with pytest.raises(ExportError, match=f"tiny-board: needs about .* MB at context length 256 but {budget:.0f} MB"):
        export(tiny_folder, tmp_path / "refused", options, progress=quiet)
    assert not (tmp_path / "refused").exists()
    options = ExportOptions(target="tiny-board", quant="none", fit_context=True)
    bundle = export(tiny_folder, tmp_path / "fitted", options, progress=quiet)
    ctx = Model(bundle).manifest.architecture.context_length
    assert 64 <= ctx < 256
    assert Model(bundle).generate("The robot", max_new_tokens=4).token_ids


def test_check_agrees_with_export_fit_context_at_the_limit(tiny_folder, tmp_path, monkeypatch):
    """check sized the weights by the files (13-30 KB more than the initializers export sized them by), so it
    refused a bundle --fit-context had fitted with less than that to spare."""
    monkeypatch.setenv("EDGEKIT_TARGETS", str(tmp_path))
    _write(tmp_path, "tiny-board", ram_gb=64, os_reserved_gb=0.5)
    roomy = export(tiny_folder, tmp_path / "roomy", ExportOptions(target="tiny-board", quant="none"), progress=quiet)
    m = Model(roomy, verify=False).manifest
    assert m.graph.weight_bytes is not None
    need = check.estimate_memory(m.architecture, m.graph.weight_bytes, "fused", 128).total_mb
    _write(tmp_path, "tiny-board", ram_gb=0.5 + (need + 0.001) / 1024, os_reserved_gb=0.5)  # 1 KB to spare at 128
    options = ExportOptions(target="tiny-board", quant="none", fit_context=True)
    fitted = export(tiny_folder, tmp_path / "fitted", options, progress=quiet)
    assert Model(fitted, verify=False).manifest.architecture.context_length == 128
    assert check.check_bundle(fitted).fits
    assert main(["check", str(fitted)]) == 0


def test_runtime_takes_the_first_available_provider_and_falls_back_with_a_warning(multi_target, caplog):
    assert choose_provider(["CPUExecutionProvider"]) == "CPUExecutionProvider"
    with caplog.at_level(logging.WARNING, logger="edgekit"):
        assert choose_provider(["TensorrtExecutionProvider", "CUDAExecutionProvider"]) == "CPUExecutionProvider"
    assert "first execution provider TensorrtExecutionProvider is not in this onnxruntime" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgekit"):
        model = Model(multi_target / "jetson-orin-nano")  # TensorRT, CUDA, CPU: only CPU is installed here
    assert model.provider == "CPUExecutionProvider"
    assert "execution provider: CPUExecutionProvider" in caplog.text  # it says which it picked
    assert "using CPUExecutionProvider" in caplog.text  # and warns that it is not the target's first choice


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of this
# pytest process (which holds SmolLM2) would report the parent's peak
RSS_SCRIPT = """
import re, sys
import numpy as np
from edgekit.device import Model
model = Model(sys.argv[1])
ids = np.random.default_rng(0).integers(100, 1000, int(sys.argv[2])).tolist()
logits, _ = model.prefill(ids)
for _ in range(4):
    logits = model.step(int(logits.argmax()))
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
"""


@pytest.mark.slow
def test_memory_estimate_is_within_15_percent_of_measured_peak_rss(smollm2_bundle):
    """SmolLM2-135M fp32 (fused, context 2048) with a prompt that nearly fills the context,
    measured in a fresh process on this machine (docs/targets.md has the other bundles)."""
    prompt_tokens = 2000
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2_bundle), str(prompt_tokens)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    measured = float(out.stdout.split()[-1])
    m = Model(smollm2_bundle, verify=False).manifest
    est = check.estimate_memory(m.architecture, check.bundle_weight_bytes(smollm2_bundle), "fused",
                                prompt_tokens=prompt_tokens)
    print(f"prompt {prompt_tokens}: estimated {est.total_mb:.0f} MB, measured {measured:.0f} MB")
    assert abs(est.total_mb - measured) <= 0.15 * measured


ARM64_ROOT = Path(os.environ.get("EDGEKIT_ARM64_ROOT", Path.home() / ".cache/edgekit/arm64"))


@pytest.mark.slow
@pytest.mark.skipif(not (ARM64_ROOT / "usr/bin/python3").exists() or not shutil.which("qemu-aarch64-static"),
                    reason="no arm64 environment: run benchmarks/cross_arch/setup_arm64.sh")
def test_a_bundle_gives_the_same_tokens_on_aarch64_under_qemu(multi_target):
    """The rpi4 bundle (fp32 compute) with onnxruntime's aarch64 wheel on an emulated Cortex-A72."""
    bundle = multi_target / "rpi4"
    script = REPO / "benchmarks" / "cross_arch" / "greedy.py"
    x86 = json.loads(subprocess.run([sys.executable, str(script), str(bundle), "--tokens", "8"],
                                    capture_output=True, text=True, check=True, cwd=REPO).stdout)
    env = {**os.environ, "PYTHONPATH": f"{ARM64_ROOT}/opt/edgekit-site:{REPO}"}
    arm = json.loads(subprocess.run(
        ["qemu-aarch64-static", "-cpu", "cortex-a72", "-L", str(ARM64_ROOT), str(ARM64_ROOT / "usr/bin/python3"),
         str(script), str(bundle), "--tokens", "8"],
        capture_output=True, text=True, check=True, cwd=REPO, env=env, timeout=900).stdout)
    assert (x86["machine"], arm["machine"]) == ("x86_64", "aarch64")
    assert arm["tokens"] == x86["tokens"] and len(arm["tokens"]) == 8


def test_worker_threads_spin_briefly_unless_the_target_or_caller_says_otherwise(tiny_bundle, tmp_path):
    """Unbounded spinning loses half the speed when another process shares the cores; the runtime
    spins at most 10 µs (device/session.py), and a profile or the caller can turn spinning off."""
    def spinning(model: Model) -> tuple[str, str]:
        options = model.session.get_session_options()
        return (options.get_session_config_entry("session.intra_op.allow_spinning"),
                options.get_session_config_entry("session.intra_op.spin_duration_us"))

    assert spinning(Model(tiny_bundle)) == ("1", "10")
    assert spinning(Model(tiny_bundle, session_config={"session.intra_op.allow_spinning": "0"})) == ("0", "10")
    spins = tmp_path / "spins"
    shutil.copytree(tiny_bundle, spins)
    manifest = json.loads((spins / "edgekit.json").read_text())
    manifest["target"]["session_config"] = {"session.intra_op.spin_duration_us": "50"}
    (spins / "edgekit.json").write_text(json.dumps(manifest))
    assert spinning(Model(spins, verify=False)) == ("1", "50")  # the profile's (the hashes cover the other files)


def test_check_takes_a_bundle_built_from_a_profile_file_at_its_word(tiny_folder, tmp_path):
    """Its profile is in no targets folder: the manifest records it (was "unknown target")."""
    path = _write(tmp_path, "my-board", ram_gb=2, quantization={"method": "none"}, graph_flavour="fused")
    bundle = export(tiny_folder, tmp_path / "b", ExportOptions(target=str(path)), progress=lambda _: None)
    verdict = check.check_bundle(bundle)
    assert verdict.runs and verdict.target["name"] == "my-board" and verdict.target["ram_gb"] == 2
