#!/usr/bin/env sh
# Install the built wheels into a new virtualenv VENV (what the image runs, and what the
# install test checks): runsvc-client first, then runsvc, with their dependencies.
set -eu
venv="$1"
wheels="$2"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --disable-pip-version-check --quiet \
    "$wheels"/runsvc_client-*.whl "$wheels"/runsvc-*.whl
