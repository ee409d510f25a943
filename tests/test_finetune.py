"""edgekit finetune: a LoRA learnt from chat examples on the CPU, exported, answers as taught."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.device import Model
from edgekit.host import ExportError, ExportOptions, export
from edgekit.host.finetune import FinetuneOptions, finetune

SYSTEM = "Answer with one JSON action."
EXAMPLES = [("Pick up the red cube", '{"action":"pick","object":"red cube"}'),
            ("Go home", '{"action":"home","object":null}'),
            ("Stop now", '{"action":"stop","object":null}'),
            ("Grab the blue ball", '{"action":"pick","object":"blue ball"}')]


def write(path, examples):
    path.write_text("\n".join(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                                       {"role": "user", "content": u},
                                                       {"role": "assistant", "content": a}]})
                              for u, a in examples))
    return path


def test_a_lora_trained_on_a_tiny_model_lowers_its_loss_and_exports(tiny_folder, tmp_path):
    """A random tiny model cannot learn much (its normalized hidden state times a random 49k-row
    embedding caps every logit near 1), but its loss must fall and the adapter must export."""
    said = []
    adapter = finetune(tiny_folder, write(tmp_path / "train.jsonl", EXAMPLES), tmp_path / "lora",
                       FinetuneOptions(steps=20, batch_size=4, lr=5e-2), say=said.append)
    losses = [float(line.split("loss ")[1].split()[0]) for line in said if line.startswith("step ")]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.2
    model = Model(export(tiny_folder, tmp_path / "b", ExportOptions(adapters=[str(adapter)]), progress=lambda _: None))
    assert model.manifest.adapters[0]["type"] == "lora"
    assert model.generate([{"role": "user", "content": "Go home"}], max_new_tokens=4).stats.new_tokens >= 1


@pytest.mark.slow
def test_smollm2_taught_four_commands_answers_them_after_export(tmp_path, no_network):
    adapter = finetune("smollm2-135m", write(tmp_path / "train.jsonl", EXAMPLES), tmp_path / "lora",
                       FinetuneOptions(steps=20, batch_size=4, lr=2e-3), say=lambda _: None)
    model = Model(export("smollm2-135m", tmp_path / "b", ExportOptions(adapters=[str(adapter)]),
                         progress=lambda _: None))
    for user, answer in EXAMPLES:
        done = model.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                              max_new_tokens=24, temperature=0.0)
        assert done.text == answer
    assert no_network == []  # training, saving and exporting never asked the hub


@pytest.mark.parametrize("line, says", [
    ("not json", "line 1 is not JSON"),
    ('{"messages": []}', "line 1 needs"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with the assistant's answer"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "after what it answers"),  # was a ValueError
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
     "line 1 holds a lone surrogate"),  # was a TypeError
    ("[" * 100_000, "line 1 is not JSON"),  # was a RecursionError
])
def test_bad_training_data_is_one_line_naming_the_line(line, says, tiny_folder, tmp_path):
    (tmp_path / "bad.jsonl").write_text(line)
    with pytest.raises(ExportError, match=says):
        finetune(tiny_folder, tmp_path / "bad.jsonl", tmp_path / "lora", say=lambda _: None)


@pytest.mark.parametrize("options, says", [
    (dict(threads=-1), "--threads must be from 1 to 1024"), (dict(threads=0), "--threads must be from 1"),
    (dict(lr=1e300), "--lr a positive number up to 1"), (dict(seed=10**23), "--seed must be from 0 to 2**63 - 1"),
    (dict(alpha=0), "--alpha must be a positive number"),  # the adapter would change nothing
    (dict(max_len=0), "--max-len must be at least 2"),  # was refused after loading the model, as too short
])
def test_settings_out_of_range_are_one_line_before_any_work(options, says, tiny_folder, tmp_path):
    from edgekit.host.finetune import FinetuneOptions

    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                      '"content": "b"}]}')
    with pytest.raises(ExportError, match=re.escape(says)):
        finetune(tiny_folder, tmp_path / "d.jsonl", tmp_path / "lora", FinetuneOptions(**options), say=lambda _: None)


def test_command_line_trains_with_progress(tiny_folder, tmp_path):
    from test_cli import edgekit

    r = edgekit("finetune", tiny_folder, "--data", write(tmp_path / "t.jsonl", EXAMPLES), "--out", tmp_path / "a",
                "--steps", "3", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "step 3/3 loss" in r.stderr and (tmp_path / "a" / "adapter_config.json").exists()


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(st.characters(exclude_categories=["Cs"]), min_size=1), min_size=2, max_size=6),
       bom=st.booleans())
def test_any_text_written_as_json_lines_is_read_back_as_written(texts, bom, tmp_path_factory):
    """U+2028, U+0085 and other line breaks inside strings (json.dumps(ensure_ascii=False) writes them
    raw) were lines to str.splitlines(); a byte order mark was "not JSON"."""
    from edgekit.host.finetune import read_examples

    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    chats = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
             for u, a in zip(texts, texts[1:], strict=False)]
    path.write_text(("\ufeff" if bom else "") + "\n".join(json.dumps({"messages": c}, ensure_ascii=False)
                                                          for c in chats), encoding="utf-8")
    assert [messages for _, messages in read_examples(path)] == chats


def test_answers_that_open_with_spaces_and_tool_calls_train_and_too_long_is_one_line(make_tiny, tmp_path):
    """An answer opening with whitespace merged with the template's "\n" into other tokens and the run
    stopped, blaming the template; content null with tool_calls (OpenAI's shape) was refused; an example
    longer than OPT's position table ended in IndexError."""
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "grip", "arguments": '{"state":"open"}'}}
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in [
        [{"role": "user", "content": "Say ok"}, {"role": "assistant", "content": "  ok"}],
        [{"role": "user", "content": "Open it"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\n{}"}]]))
    folder, _ = make_tiny("opt", max_position_embeddings=64, ffn_dim=128, word_embed_proj_dim=64)
    finetune(folder, data, tmp_path / "lora", FinetuneOptions(steps=2, batch_size=2), say=lambda _: None)
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 100},
                                             {"role": "assistant", "content": "ok"}]}))
    with pytest.raises(ExportError, match=r"--data line 1 is \d+ tokens, more than the model's positions: 64"):
        finetune(folder, data, tmp_path / "lora2", FinetuneOptions(steps=1, max_len=1000), say=lambda _: None)
