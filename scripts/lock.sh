#!/usr/bin/env bash
# Re-pin constraints.txt: resolve the export and test extras afresh in a throwaway venv and
# freeze what pip chose. Upgrading pins is a deliberate change: run the suite after it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -e ".[export,test]"
{
    echo "# Every package the export and test extras install, at the versions the suite was run with."
    echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) (Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m))."
    # torch's local version (+cpu) names a build, not a release: pin the release
    "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
