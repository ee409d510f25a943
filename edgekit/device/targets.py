"""Device profiles: one JSON file per device in targets/.

A profile says what a device is (CPU architecture and ISA, RAM), how to run a bundle
there (execution providers in order of preference, threads, onnxruntime session
entries, the MatMulNBits accuracy level that suits its ISA), and what to export for it
(graph flavour, default quantization). JSON, not TOML, because the device reads the
profile too (`edgekit check` on the device) and tomllib needs Python 3.11.

Where profiles are found, first match wins:

    $EDGEKIT_TARGETS        folders separated by os.pathsep: a user's own devices
    <checkout>/targets/     the repository's folder (source checkouts, editable installs)
    <sys.prefix>/share/edgekit/targets/   a pip-installed edgekit (pyproject's data-files)

`--target` also takes a path to a .json file. Adding a device is adding a file; a
malformed file raises TargetError naming the file and the field.

Standard library only: the device side imports this.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.quantization import METHODS

FLAVOURS = ("fused", "portable")
KNOWN_PROVIDERS = (
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
    "XnnpackExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider", "QNNExecutionProvider",
)
ARCHS = ("aarch64", "x86_64", "armv7l", "riscv64")


class TargetError(InputError):
    """A device profile that is missing or malformed."""


@dataclass
class Target:
    """One device profile, as validated from its JSON file."""

    name: str
    description: str
    cpu: dict  # arch, model, cores, isa (list of feature names)
    ram_gb: float
    execution_providers: list[str]  # in order of preference; the runtime takes the first it has
    graph_flavour: str  # fused | portable
    quantization: dict  # default method, bits, group_size (and e.g. sym) when the user gives no flag
    threads: int | None  # the most onnxruntime intra-op threads (device/threads.py); None: one per physical core
    matmulnbits_accuracy_level: int  # MatMulNBits compute type: 1 fp32, 4 int8 dot products
    session_config: dict[str, str]  # onnxruntime session config entries
    onnxruntime_package: str  # what a device installs
    os_reserved_gb: float = 0.5  # memory the OS and other processes keep
    gpu: dict | None = None
    ram_variants_gb: list[float] = field(default_factory=list)
    notes: str = ""
    path: str = ""  # the file it came from

    @property
    def arch(self) -> str:
        return self.cpu["arch"]

    def manifest_dict(self) -> dict:
        """The profile as a bundle's manifest records it (edgekit.json "target")."""
        d = asdict(self)
        d.pop("path")
        d["arch"] = self.arch  # flat, for readers that only want the architecture
        return d


# field name -> (accepted types, required)
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True),
    "description": ((str,), True),
    "cpu": ((dict,), True),
    "ram_gb": ((int, float), True),
    "execution_providers": ((list,), True),
    "graph_flavour": ((str,), True),
    "quantization": ((dict,), True),
    "threads": ((int, type(None)), True),
    "matmulnbits_accuracy_level": ((int,), True),
    "session_config": ((dict,), True),
    "onnxruntime_package": ((str,), True),
    "os_reserved_gb": ((int, float), False),
    "gpu": ((dict, type(None)), False),
    "ram_variants_gb": ((list,), False),
    "notes": ((str,), False),
}


def parse_target(raw: Any, source: str = "<profile>") -> Target:
    """Validate a profile's JSON object. Raises TargetError naming `source` and the field."""

    def bad(field_name: str, why: str) -> TargetError:
        return TargetError(f"{source}: field '{field_name}' {why}")

    if not isinstance(raw, dict):
        raise TargetError(f"{source}: a profile is a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SCHEMA))
    if unknown:
        raise bad(unknown[0], f"is not a profile field (fields: {', '.join(_SCHEMA)})")
    for name, (types, required) in _SCHEMA.items():
        if name not in raw:
            if required:
                raise bad(name, "is missing")
            continue
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, types):  # bool is an int: refuse it explicitly
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise bad(name, f"must be {want}, got {json.dumps(value)}")

    cpu = raw["cpu"]
    if cpu.get("arch") not in ARCHS:
        raise bad("cpu.arch", f"must be one of {', '.join(ARCHS)}, got {json.dumps(cpu.get('arch'))}")
    if not isinstance(cpu.get("isa"), list) or not all(isinstance(x, str) for x in cpu["isa"]):
        raise bad("cpu.isa", "must be a list of ISA feature names, e.g. [\"neon\", \"asimddp\"]")
    if not isinstance(cpu.get("cores"), int) or cpu["cores"] < 1:
        raise bad("cpu.cores", f"must be a positive integer, got {json.dumps(cpu.get('cores'))}")
    if not 0 < raw["ram_gb"] < 1e6:  # NaN and Infinity too (Python's JSON reads them)
        raise bad("ram_gb", f"must be a positive number of GB, got {raw['ram_gb']}")
    if not 0 <= raw.get("os_reserved_gb", 0) < raw["ram_gb"]:
        raise bad("os_reserved_gb", f"must be from 0 to less than ram_gb, got {raw['os_reserved_gb']}")
    if not all(type(v) in (int, float) and 0 < v < 1e6 for v in raw.get("ram_variants_gb", [])):
        raise bad("ram_variants_gb", f"must be a list of positive numbers of GB, got "
                                     f"{json.dumps(raw['ram_variants_gb'])}")
    eps = raw["execution_providers"]
    if not eps or not all(isinstance(e, str) for e in eps):
        raise bad("execution_providers", "must be a non-empty list of onnxruntime provider names")
    for e in eps:
        if e not in KNOWN_PROVIDERS:
            raise bad("execution_providers", f"has unknown provider {e!r} (known: {', '.join(KNOWN_PROVIDERS)})")
    if raw["graph_flavour"] not in FLAVOURS:
        raise bad("graph_flavour", f"must be one of {', '.join(FLAVOURS)}, got {json.dumps(raw['graph_flavour'])}")
    q = raw["quantization"]
    extra = sorted(set(q) - {"method", "bits", "group_size", "sym"})
    if extra:
        raise bad(f"quantization.{extra[0]}", "is not a quantization field (method, bits, group_size, sym)")
    for key in ("bits", "group_size"):  # 8.0 == 8 would pass the checks below and fail in the quantizer
        if key in q and type(q[key]) is not int:
            raise bad(f"quantization.{key}", f"must be an integer, got {json.dumps(q[key])}")
    if not isinstance(q.get("sym", False), bool):
        raise bad("quantization.sym", f"must be true or false, got {json.dumps(q['sym'])}")
    if q.get("method") != "none" and q.get("method") not in METHODS:
        raise bad("quantization.method",
                  f"must be one of none, {', '.join(METHODS)}, got {json.dumps(q.get('method'))}")
    if q["method"] == "none" and set(q) - {"method"}:
        raise bad("quantization", f"sets {', '.join(sorted(set(q) - {'method'}))} with method none (nothing to set)")
    if q["method"] != "none":
        method = METHODS[q["method"]]
        bits = q.get("bits", method.bits[0])
        if bits not in method.bits:
            raise bad("quantization.bits", f"must be {' or '.join(map(str, method.bits))} for {method.name}, "
                                           f"got {json.dumps(bits)}")
        gs = q.get("group_size", method.group_size_for(bits))
        if gs not in method.group_sizes:
            raise bad("quantization.group_size",
                      f"must be one of {', '.join(map(str, method.group_sizes))} for {method.name} "
                      f"(0: per output channel), got {json.dumps(gs)}")
    if raw["threads"] is not None and raw["threads"] < 1:
        raise bad("threads", f"must be a positive integer or null, got {raw['threads']}")
    if raw["matmulnbits_accuracy_level"] not in (0, 1, 2, 3, 4):
        raise bad("matmulnbits_accuracy_level", f"must be 0..4, got {raw['matmulnbits_accuracy_level']}")
    for k, v in raw["session_config"].items():
        if not isinstance(v, str):
            raise bad(f"session_config.{k}",
                      f"must be a string (onnxruntime config entries are strings), got {json.dumps(v)}")
    return Target(**raw, path=source)


def target_dirs() -> list[Path]:
    """The folders searched for profiles, in order."""
    dirs = [Path(p) for p in os.environ.get("EDGEKIT_TARGETS", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parents[2] / "targets")  # the repository's top-level folder
    dirs.append(Path(sys.prefix) / "share" / "edgekit" / "targets")  # pip install (data-files)
    return [d for d in dirs if d.is_dir()]


def available_targets() -> dict[str, Path]:
    """Profile name -> file, first match in target_dirs() winning."""
    found: dict[str, Path] = {}
    for d in target_dirs():
        for p in sorted(d.glob("*.json")):
            found.setdefault(p.stem, p)
    return found


def load_target(spec: str | Path) -> Target:
    """A profile by name (rpi5) or by path (./my-board.json). Raises TargetError when it
    cannot be found or does not validate."""
    spec = str(spec)
    path = Path(spec)
    if not (spec.endswith(".json") and path.is_file()):
        known = available_targets()
        if spec not in known:
            where = ", ".join(str(d) for d in target_dirs()) or "no targets folder found"
            raise TargetError(
                f"unknown target {spec!r}; known: {', '.join(sorted(known)) or 'none'} (searched {where}); "
                "add a profile file to targets/ or a folder in EDGEKIT_TARGETS"
            )
        path = known[spec]
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise TargetError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TargetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TargetError(f"{path}: not valid JSON ({e})") from None
    target = parse_target(raw, str(path))
    if target.name != path.stem:
        raise TargetError(f"{path}: field 'name' is {target.name!r} but the file is {path.name}; make them match")
    return target


def load_targets(specs: str) -> list[Target]:
    """Comma-separated names or paths -> profiles, in order, without duplicates."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise TargetError("--target is empty; give a profile name such as rpi5 (see `edgekit targets`)")
    if len(set(names)) != len(names):
        raise TargetError(f"--target names a profile twice: {specs}")
    return [load_target(n) for n in names]
