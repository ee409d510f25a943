"""The device side imports and generates in a process where torch and transformers cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "peft", "optimum") or name.startswith("edgekit.host"):
                raise ImportError(f"{name} is blocked: the device side must not import it")

    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_the_block_really_blocks():
    r = run_blocked("import torch")
    assert r.returncode != 0 and "blocked" in r.stderr


def test_model_generates_without_torch(tiny_bundle):
    r = run_blocked(f"""
        from edgekit.device import Model
        model = Model({str(tiny_bundle)!r})
        done = model.generate([{{"role": "user", "content": "Hello"}}], max_new_tokens=8, temperature=0)
        assert len(done.token_ids) == 8, done
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok", done.token_ids)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_cli_generate_runs_without_torch(tiny_bundle):
    r = run_blocked(f"""
        from edgekit.cli import main
        sys.exit(main(["generate", {str(tiny_bundle)!r}, "Hello", "--max-new-tokens", "5", "--stats"]))
    """)
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stderr  # the --stats line
