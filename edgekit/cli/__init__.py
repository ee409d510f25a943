"""The `edgekit` command: one module per command in this package, each with register(subparsers).

Device commands (generate, info, bench, eval, serve, ask, targets, check) import only the
device side; host commands (export, finetune) import torch and transformers when they run,
not before. An EdgekitError is printed as one line on stderr with exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import edgekit
from edgekit.errors import EdgekitError, UserError

# The commands, in --help's order; each module adds its own with register(subparsers).
COMMANDS: list[str] = ["export", "finetune", "generate", "info", "bench", "eval", "mqtt", "targets"]

# What a device command's --threads means when left out (edgekit/device/threads.py)
THREADS_DEFAULT = ("as many as the cores other processes leave free, up to one per physical core, the target's "
                   "count and the container's CPU quota")


def host_side_missing(command: str, e: ImportError) -> UserError:
    """What a host command (export, finetune) says on an install without the export extra."""
    return UserError(f"{command} needs the host side ({e}); from the edgekit checkout: "
                     "pip install -c constraints.txt -e '.[export]'")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line that points to the command's own --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="edgekit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    parser.add_argument("--version", action="version", version=f"edgekit {edgekit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"edgekit.cli.{name}").register(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand, whose flags the user was giving
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="edgekit: %(message)s", stream=sys.stderr)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgekit info B | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 0
    except Exception as e:  # user-facing errors are one line (with -v, the traceback); bugs keep their traceback
        if isinstance(e, EdgekitError) and not args.verbose:
            print(f"edgekit {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
