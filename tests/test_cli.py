"""The `edgekit` command as a user runs it: help, export, generate, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgekit.device.bundle import MANIFEST


def edgekit(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert fragment in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["export", "generate", "info"])
def test_each_command_has_help(command):
    r = edgekit(command, "--help")
    assert r.returncode == 0 and "usage: edgekit" in r.stdout


def test_export_a_hugging_face_folder_then_generate_streams_text(make_tiny, tmp_path):
    folder, _ = make_tiny("qwen2")
    r = edgekit("export", folder, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "[1/3] loading" in r.stderr and "[3/3] writing" in r.stderr  # progress
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["architecture"]["model_type"] == "qwen2"

    r = edgekit("generate", tmp_path / "b", "Hello robot", "--max-new-tokens", "6", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "ttft" in r.stderr
    r = edgekit("generate", tmp_path / "b", "--chat", "Hi", "--system", "Be brief.", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_missing_path_is_one_line(tmp_path):
    assert_one_line_error(edgekit("export", tmp_path / "nope", "--out", tmp_path / "b"), "no such file or folder")


def test_unsupported_architecture_lists_what_is_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    r = edgekit("export", tmp_path / "gpt2", "--out", tmp_path / "b")
    assert_one_line_error(r, "'gpt2' is not supported; supported: bloom, falcon, gemma")
    assert not (tmp_path / "b").exists()


def test_corrupt_gguf_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    assert_one_line_error(edgekit("export", bad, "--out", tmp_path / "b"), "not a valid GGUF file: damaged")
    assert not (tmp_path / "b").exists()


def test_generate_errors_are_one_line(tiny_bundle, tmp_path):
    assert_one_line_error(edgekit("generate", tmp_path, "hi"), "not a bundle")
    assert_one_line_error(edgekit("generate", tiny_bundle, "word " * 400), "context length")
    assert_one_line_error(edgekit("generate", tiny_bundle), "give either a PROMPT or --chat")


@pytest.mark.slow
def test_export_the_shipped_gguf_by_path_gives_the_same_bundle(smollm2_bundle, tmp_path):
    from edgekit.host.load import resolve

    src = resolve("smollm2-135m")
    r = edgekit("export", src.folder / src.gguf_file, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "[1/3] loading" in r.stderr and "it/s" not in r.stderr  # edgekit's progress, no library's bars
    by_path = json.loads((tmp_path / "b" / MANIFEST).read_text())["files"]
    by_name = json.loads((smollm2_bundle / MANIFEST).read_text())["files"]
    assert by_path == by_name  # byte-identical: export is deterministic

    r = edgekit("generate", tmp_path / "b", "--chat", "What is a Raspberry Pi?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Raspberry Pi" in r.stdout or "computer" in r.stdout.lower()


def test_version_is_the_package_version():
    from edgekit import __version__

    r = edgekit("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edgekit {__version__}"


@pytest.mark.parametrize("argv, says", [
    (["export"], "edgekit export: error: the following arguments are required: source, --out"),
    (["export", "x", "--out", "y", "--quant", "foo"], "edgekit export: error: argument --quant: invalid choice"),
    (["export", "x", "--out", "y", "--frob"], "edgekit export: error: unrecognized arguments: --frob"),
    (["generate", "b", "--temperature", "warm"], "edgekit generate: error: argument --temperature"),
    (["eval", "perplexity"], "edgekit eval perplexity: error: the following arguments are required"),
    (["frobnicate"], "edgekit: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_command_line_mistakes_are_one_line_with_the_commands_help(argv, says):
    r = edgekit(*argv)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr  # one line, no usage block
    assert r.stderr.startswith(says) and r.stderr.strip().endswith("--help)")


def test_a_checkpoint_missing_a_weight_is_refused_not_filled_with_random_values(make_tiny, tmp_path):
    """transformers initialises what a checkpoint lacks at random and only prints a report: the bundle was
    written (exit 0) with a random down projection."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = make_tiny("llama")
    cut = shutil.copytree(folder, tmp_path / "cut")
    weights = load_file(cut / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, cut / "model.safetensors", metadata={"format": "pt"})
    r = edgekit("export", cut, "--out", tmp_path / "b")
    assert_one_line_error(r, "the checkpoint has no model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, says", [
    (["generate", "{bundle}", "hi", "--threads", "100000"], "threads must be a whole number from 0"),  # hung
    (["export", "{folder}", "--out", "{tmp}/b", "--quant", "gptq", "--seed", "-1"], "--seed must be a whole number"),
    (["bench", "{bundle}", "--background-load", "100000"], "--background-load must be from 0 to"),
    (["bench", "{bundle}", "-p", "8,,9"], "expected comma-separated whole numbers"),  # the empty item was dropped
    (["generate", "{bundle}", "hi", "--tool-choice", "required"], "--tool-choice goes with --tools"),  # was ignored
])
def test_numbers_beyond_what_the_machine_can_do_are_one_line(argv, says, tiny_bundle, tiny_folder, tmp_path):
    r = edgekit(*[a.format(bundle=tiny_bundle, folder=tiny_folder, tmp=tmp_path) for a in argv])
    assert_one_line_error(r, says)


def test_a_hub_id_says_that_edgekit_never_downloads(tmp_path):
    r = edgekit("export", "HuggingFaceTB/SmolLM2-360M-Instruct", "--out", tmp_path / "b")
    assert_one_line_error(r, "edgekit never downloads models")
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-360M-Instruct --local-dir DIR" in r.stderr


def test_a_prompt_that_is_not_valid_text_is_one_line(tiny_bundle):
    # what Python makes of invalid UTF-8 bytes in argv: lone surrogates
    r = subprocess.run([sys.executable, "-m", "edgekit", "generate", str(tiny_bundle), "caf\udce9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("argv, says", [
    # a folder where a file is read, a file where a folder is written: what root (CI) cannot be denied
    (["export", "{bundle}", "--out", "{file}/b"], "--out {file}/b: cannot create its folder"),
    (["eval", "perplexity", "{bundle}", "--text", "{dir}"], "--text {dir}: no such file"),
    (["bench", "{bundle}", "-n", "2", "-r", "1", "--no-plot", "--report", "{file}"], "--report {file}: cannot write"),
    (["bench", "--compare", "{dir}", "{dir}"], "{dir}: cannot read it"),
    (["serve", "{bundle}", "--device-id", "d", "--username", "u", "--password-file", "{dir}"],
     "--password-file {dir}: cannot read it"),
    (["info", "{broken}"], "{broken}: not a bundle (edgekit.json is missing)"),
])
def test_a_path_edgekit_cannot_read_or_write_is_one_line(argv, says, tiny_bundle, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "broken" / MANIFEST).mkdir(parents=True)
    paths = {"bundle": tiny_bundle, "file": tmp_path / "file", "dir": tmp_path / "dir", "broken": tmp_path / "broken"}
    r = edgekit(*(a.format(**paths) for a in argv))
    assert_one_line_error(r, says.format(**paths))


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tiny_bundle):
    """`edgekit info B | head -1`: the closed pipe is the reader's choice, not an error with a traceback."""
    r = subprocess.run(f"{sys.executable} -m edgekit info {tiny_bundle} | head -c 1", shell=True,
                       capture_output=True, text=True, timeout=120)
    assert len(r.stdout) == 1 and r.stderr == ""
