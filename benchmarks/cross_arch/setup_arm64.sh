#!/usr/bin/env bash
# Make an arm64 (aarch64) Python environment on an x86_64 Debian host, run under qemu-user.
#
#   debootstrap --foreign ──► arm64 Debian bookworm base + python3 (.debs unpacked, nothing executed)
#   pip --platform manylinux_2_31_aarch64 ──► the aarch64 wheels of the device runtime's dependencies
#   qemu-aarch64-static -L ROOT ROOT/usr/bin/python3 ──► an arm64 Python that imports them
#
# No binfmt_misc registration and no chroot are needed (containers rarely allow either):
# qemu runs the arm64 interpreter directly, and -L points its loader at ROOT's libraries.
# Needs root for apt-get (once) and about 700 MB of disk.
#
# qemu must be 8.1 or newer: older qemu-user passes the host's x86 /proc/cpuinfo through,
# and onnxruntime's cpuinfo (since 1.2x) dereferences NULL on it at import (measured:
# SIGSEGV with Debian 12's qemu 7.2; works with 10.0 from bookworm-backports):
#
#   echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list
#   apt-get update && apt-get install -t bookworm-backports qemu-user-static && apt-get install debootstrap
#   benchmarks/cross_arch/setup_arm64.sh [ROOT]      # default ~/.cache/edgekit/arm64
set -euo pipefail

ROOT=${1:-${EDGEKIT_ARM64_ROOT:-$HOME/.cache/edgekit/arm64}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in qemu-aarch64-static debootstrap dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install qemu-user-static debootstrap" >&2; exit 1; }
done

if [ ! -e "$ROOT/usr/bin/python3" ]; then
    # --foreign only downloads and unpacks the essential packages; the rest (python3 and its
    # libraries) are downloaded to var/cache/apt/archives. The second stage would run arm64
    # maintainer scripts, which needs binfmt: instead unpack every downloaded .deb ourselves.
    debootstrap --foreign --arch arm64 --variant=minbase --include=python3,ca-certificates \
        bookworm "$ROOT" "$MIRROR"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT"
    done
fi

# The same onnxruntime version as the host, so the only difference is the architecture.
ORT_VERSION=${ORT_VERSION:-$(python3 -c 'import onnxruntime; print(onnxruntime.__version__)')}
SITE="$ROOT/opt/edgekit-site"
python3 -m pip install --quiet --upgrade --no-compile --target "$SITE" \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_31_aarch64 --implementation cp --python-version 311 --only-binary=:all: \
    "onnxruntime==$ORT_VERSION" numpy tokenizers llguidance jinja2 paho-mqtt

echo "arm64 environment ready: $ROOT"
PYTHONPATH="$SITE" qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3" -c \
    'import platform, onnxruntime, numpy, tokenizers, llguidance, jinja2, sys
print(platform.machine(), sys.version.split()[0], "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers(), "numpy", numpy.__version__)' \
    2>&1 | sed 's/^/  /' || true
