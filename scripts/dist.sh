#!/usr/bin/env sh
# Build the wheels and sdists of runsvc-client and runsvc into OUTDIR (default dist/).
# Used by `make dist`, the Dockerfile's build stage and the install test: one recipe.
# --no-isolation: the build backend (setuptools) comes from the current environment,
# so nothing is fetched while building.
set -eu
out="${1:-dist}"
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
mkdir -p "$out"
"$python" -m build --no-isolation --outdir "$out" "$here/clients"
"$python" -m build --no-isolation --outdir "$out" "$here"
