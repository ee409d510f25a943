#!/usr/bin/env bash
# llm-compressor, the peer GPTQ of run.py's llmc-gptq4-g64 row, in its own venv: it pins
# transformers <= 5.17 and edgekit's export extra has a newer one, so they cannot share one.
set -euo pipefail
venv="$HOME/.cache/edgekit/peer-llmc"
python3 -m venv "$venv"
# torch first and pinned: the CPU build (a plain "torch" pulls several GB of CUDA)
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q llmcompressor==0.14.0.1
"$venv/bin/python" -c "import llmcompressor, transformers; print('llm-compressor', llmcompressor.__version__, '/ transformers', transformers.__version__)"
