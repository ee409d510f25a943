"""One table of quantization methods (edgekit/quantization.py), read everywhere: each row is a
`--quant` choice, a valid target default, a checked plan, a layer function, and a bundle whose
graph and manifest say what the row says."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edgekit.cli import main
from edgekit.device import Model
from edgekit.device.bundle import read_manifest
from edgekit.device.targets import TargetError, parse_target
from edgekit.host import ExportError, ExportOptions, export
from edgekit.host.options import plan_export
from edgekit.host.quant import layers
from edgekit.quantization import METHODS

TARGETS = Path(__file__).resolve().parents[1] / "targets"
CALIB = dict(calib_samples=4, calib_seq_len=64)  # the default text, small for speed


@pytest.fixture(scope="module")
def tiny_llama(make_tiny):
    return make_tiny("llama", tie_word_embeddings=True)[0]


@pytest.mark.parametrize("name", METHODS)
def test_each_method_exports_what_its_row_says(name, tiny_llama, tmp_path):
    row = METHODS[name]
    plan = plan_export(ExportOptions(quant=name)).quant
    assert plan is not None and plan.method is row
    assert (plan.spec.bits, plan.spec.group_size) == (row.bits[0], row.group_size_for(row.bits[0]))
    assert callable(getattr(layers, row.layer))

    bundle = export(tiny_llama, tmp_path / name, ExportOptions(quant=name, **(CALIB if row.calibrated else {})),
                    progress=lambda _: None)
    record = read_manifest(bundle).quantization
    assert (record.method, record.bits, record.group_size) == (name, row.bits[0], row.group_size_for(row.bits[0]))
    assert (record.extra["operator"], record.extra["activations"]) == (row.operator, row.activations)
    assert (record.extra["calibration"] is not None) == row.calibrated
    assert record.label.startswith(name)
    nodes = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node
    assert row.operator in {n.op_type for n in nodes}
    # the Linears reading the row's int8_inputs at 8 bits, the others at the row's bits (Llama: down_in = down_proj)
    assert record.extra["int8_linears"] == (["mlp.down_proj"] if "down_in" in row.int8_inputs else [])
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    for name_, b in bits.items():
        if name_.startswith("/model/layers."):
            assert b == (8 if "/mlp/down_proj/" in name_ and row.int8_inputs else row.bits[0]), name_
    completion = Model(bundle).generate("the robot", max_new_tokens=4)
    assert len(completion.token_ids) >= 1


@pytest.mark.parametrize("name", METHODS)
def test_each_method_is_a_valid_target_default(name):
    raw = json.loads((TARGETS / "rpi5.json").read_text())
    raw["quantization"] = {"method": name}
    assert parse_target(raw, "test.json").quantization["method"] == name


def test_cli_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, row in METHODS.items():
        assert f"{name}: {' '.join(row.summary.split())}" in help_text


@pytest.mark.parametrize("quantization,message", [
    ({"method": "gptq", "bits": 3}, "quantization.bits"),
    ({"method": "smoothquant", "bits": 4}, "must be 8 for smoothquant"),
    ({"method": "w8a8", "group_size": 32}, "quantization.group_size"),
    ({"method": "int4-best", "bits": 8}, "must be 4 for int4-best"),
    ({"method": "rtn", "bits": 4, "group_size": 100}, "quantization.group_size"),
    ({"method": "nf4"}, "must be one of none, rtn, gptq"),
])
def test_a_target_default_the_table_does_not_offer_is_refused(quantization, message):
    raw = json.loads((TARGETS / "rpi5.json").read_text())
    raw["quantization"] = quantization
    with pytest.raises(TargetError, match=message):
        parse_target(raw, "test.json")


@pytest.mark.parametrize("fields,message", [
    (dict(quant="int4-best", bits=8), "--quant int4-best is a 4-bit recipe; drop --bits 8 (or use --quant gptq"),
    (dict(quant="int4-best", awq_grid=4), "--awq-grid applies to --quant awq, not int4-best"),
    (dict(quant="w8a8", group_size=32), "w8a8 uses one scale per output channel"),
    (dict(quant="nf4"), "unknown quantization method 'nf4'; choose one of: none, rtn, gptq"),
    (dict(flavour="tensorrt"), "--flavour tensorrt is not a graph flavour"),
    (dict(context_length=1), "--context-length 1 must be at least 2"),
])
def test_the_plan_refuses_before_the_model_loads(fields, message, tmp_path):
    with pytest.raises(ExportError, match=message.replace("(", r"\(")):
        export(tmp_path / "no-such-model", tmp_path / "out", ExportOptions(**fields), progress=lambda _: None)
    assert not (tmp_path / "out").exists()
