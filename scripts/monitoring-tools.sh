#!/usr/bin/env bash
# Make sure promtool and amtool (Debian's prometheus and prometheus-alertmanager
# packages) are installed for the rule and config tests. Installs them when
# missing and apt-get can; under CI=true a failure to install is an error,
# otherwise a warning (the tests that need them then skip).
set -euo pipefail

log() { echo "monitoring-tools: $*" >&2; }

if command -v promtool >/dev/null && command -v amtool >/dev/null; then
    exit 0
fi

install() {
    command -v apt-get >/dev/null || return 1
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || return 1
        sudo="sudo -n"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y --no-install-recommends prometheus prometheus-alertmanager \
        || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends \
            prometheus prometheus-alertmanager; }
}

log "installing promtool and amtool (Debian: prometheus, prometheus-alertmanager)"
if install >&2 && command -v promtool >/dev/null && command -v amtool >/dev/null; then
    exit 0
fi
if [[ "${CI:-}" == "true" ]]; then
    log "promtool/amtool could not be installed (CI=true: this is an error)"
    exit 1
fi
log "promtool/amtool could not be installed: the rule and config tests will be skipped"
