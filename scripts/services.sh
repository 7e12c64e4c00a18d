#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis servers the tests use are reachable.
#
# The servers are taken from RUNSVC_TEST_DATABASE_URL and RUNSVC_TEST_REDIS_URL
# (host and port only). A local server at the default address that is installed
# but not running is started. When a server is neither reachable nor
# installed, this fails under CI=true and only warns otherwise (the tests then
# skip what needs it). Quiet when everything is already up.
set -euo pipefail

DATABASE_URL="${RUNSVC_TEST_DATABASE_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/test}"
REDIS_URL="${RUNSVC_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
WAIT_SECONDS="${RUNSVC_SERVICES_WAIT:-30}"

log() { echo "services: $*" >&2; }

# host_port URL DEFAULT_PORT -> prints "HOST PORT"
host_port() {
    local url="$1" default_port="$2" rest host port
    rest="${url#*://}"     # drop the scheme
    rest="${rest%%/*}"     # drop the path
    rest="${rest%%\?*}"    # drop a query
    rest="${rest##*@}"     # drop user:password@
    if [[ "$rest" == \[* ]]; then # [ipv6]:port
        host="${rest%%]*}"
        host="${host#[}"
        port="${rest#*]}"
        port="${port#:}"
    elif [[ "$rest" == *:* ]]; then
        host="${rest%%:*}"
        port="${rest##*:}"
    else
        host="$rest"
        port=""
    fi
    echo "${host:-127.0.0.1} ${port:-$default_port}"
}

is_local() {
    case "$1" in
        127.0.0.1 | localhost | ::1) return 0 ;;
        *) return 1 ;;
    esac
}

# wait_for NAME CHECK_COMMAND... : retry the check for up to WAIT_SECONDS.
wait_for() {
    local name="$1" deadline
    shift
    deadline=$((SECONDS + WAIT_SECONDS))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$name did not answer within ${WAIT_SECONDS}s"
            return 1
        fi
        sleep 1
    done
}

# unavailable NAME MESSAGE...: fail under CI, warn otherwise.
failures=0
unavailable() {
    local name="$1"
    shift
    if [[ "${CI:-}" == "true" ]]; then
        log "ERROR: $name is not available: $*"
        failures=$((failures + 1))
    else
        log "WARNING: $name is not available: $* (tests that need it will be skipped)"
    fi
}

pg_ready() { pg_isready -q -h "$1" -p "$2"; }

# Without pg_isready, fall back to a plain TCP connect.
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

ensure_postgres() {
    local host port check
    read -r host port < <(host_port "$DATABASE_URL" 5432)
    if command -v pg_isready >/dev/null 2>&1; then
        check=pg_ready
    else
        check=tcp_open
    fi
    if "$check" "$host" "$port"; then
        return 0
    fi
    if ! is_local "$host" || [[ "$port" != 5432 ]]; then
        unavailable PostgreSQL "nothing accepts connections at $host:$port" \
            "(only a local server at 127.0.0.1:5432 is started by this script)"
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ ! -d /etc/postgresql ]] ||
        [[ -z "$(ls /etc/postgresql 2>/dev/null)" ]]; then
        unavailable PostgreSQL "not running at $host:$port and not installed" \
            "(install the Debian package postgresql, or set RUNSVC_TEST_DATABASE_URL)"
        return 0
    fi
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    log "starting PostgreSQL $version (cluster main)"
    if ! pg_ctlcluster --skip-systemctl-redirect "$version" main start; then
        log "pg_ctlcluster could not start PostgreSQL $version main"
    fi
    if ! wait_for PostgreSQL "$check" "$host" "$port"; then
        unavailable PostgreSQL "started, but $host:$port does not accept connections"
    fi
}

# A server that asks for a password (NOAUTH) is up as well.
redis_ping() {
    local out
    out="$(redis-cli -h "$1" -p "$2" ping 2>&1)" || true
    [[ "$out" == PONG || "$out" == *NOAUTH* ]]
}

ensure_redis() {
    local host port check
    read -r host port < <(host_port "$REDIS_URL" 6379)
    if command -v redis-cli >/dev/null 2>&1; then
        check=redis_ping
    else
        check=tcp_open
    fi
    if "$check" "$host" "$port"; then
        return 0
    fi
    if ! is_local "$host" || [[ "$port" != 6379 ]]; then
        unavailable Redis "nothing answers at $host:$port" \
            "(only a local server at 127.0.0.1:6379 is started by this script)"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        unavailable Redis "not running at $host:$port and not installed" \
            "(install the Debian package redis-server, or set RUNSVC_TEST_REDIS_URL)"
        return 0
    fi
    log "starting redis-server on 127.0.0.1:6379"
    mkdir -p /var/lib/redis /var/log/redis
    if ! redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log; then
        log "redis-server could not be started (see /var/log/redis/ci.log)"
    fi
    if ! wait_for Redis "$check" "$host" "$port"; then
        unavailable Redis "started, but $host:$port does not answer"
    fi
}

ensure_postgres
ensure_redis

if ((failures > 0)); then
    log "$failures service(s) missing; CI=true, so this is an error"
    exit 1
fi
exit 0
