# Helpers shared by up.sh and down.sh (sourced, not run). Expects REPO to be set.
# shellcheck shell=bash

STATE="$(realpath -m "${Q2L_STACK_DIR:-$REPO/results/cluster}")"
# The processes up.sh starts long-lived and records (each a session leader; PostgreSQL is tracked by its own
# postmaster.pid).
SERVICES=(ray-node2 ray-head mlflow moto)
# Every process of the stack carries this marker, so down.sh also finds strays (e.g. Ray job drivers, which
# run in sessions of their own).
MARK="Q2L_STACK_MEMBER=$STATE"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
die() {
    echo "error: $*" >&2
    exit 1
}
log_time() { echo "$1 $(elapsed "$2")" >>"$STATE/timings"; }

# True when nothing listens on the TCP port (on any address).
port_free() { ! ss -Htln "sport = :$1" | grep -q .; }

# Run a server in the background in its own session (so its whole tree can be stopped together), with the
# stack marker in its environment; record its pid (= its session and process group id).
start_bg() {
    local name="$1"
    shift
    setsid env "$MARK" "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name.pid"
}

pid_of() { cat "$STATE/pids/$1.pid" 2>/dev/null; }
alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

# Wait until URL answers at all (any HTTP status), failing early if the service's process died.
wait_http() {
    local url="$1" name="$2" timeout="${3:-60}" start code
    start=$(now)
    while :; do
        alive "$(pid_of "$name")" || die "$name exited while starting; last lines of $STATE/logs/$name.log:
$(tail -n 20 "$STATE/logs/$name.log")"
        code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$url" || true)
        [[ "$code" != "000" ]] && return 0
        [[ $(elapsed "$start" | cut -d. -f1) -ge $timeout ]] && die "$name did not answer on $url within ${timeout}s (log: $STATE/logs/$name.log)"
        sleep 0.5
    done
}

# Wait until the Ray cluster behind the dashboard at URL reports N alive nodes.
wait_ray_nodes() {
    local url="$1" token="$2" want="$3" timeout="${4:-60}" start n
    start=$(now)
    while :; do
        for name in ray-head ray-node2; do
            alive "$(pid_of "$name")" || die "$name exited while starting; see $STATE/logs/$name.log"
        done
        n=$(curl -s -m 5 -H "Authorization: Bearer $(cat "$token")" "$url/api/v0/nodes?limit=100" |
            grep -o '"state": *"ALIVE"' | wc -l || true)
        [[ "$n" -ge "$want" ]] && return 0
        [[ $(elapsed "$start" | cut -d. -f1) -ge $timeout ]] && die "Ray has $n of $want nodes alive after ${timeout}s (logs: $STATE/logs/ray-*.log)"
        sleep 1
    done
}

postmaster_pid() { head -n 1 "$STATE/pg/data/postmaster.pid" 2>/dev/null; }

# True when every recorded service and PostgreSQL are running.
stack_alive() {
    local name
    for name in "${SERVICES[@]}"; do
        alive "$(pid_of "$name")" || return 1
    done
    alive "$(postmaster_pid)"
}

# Run a PostgreSQL tool: PostgreSQL refuses to run as root, so root runs it as the postgres user (in folders
# that user owns); anyone else runs it as themselves.
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- env "$MARK" "$@"
    else
        env "$MARK" "$@"
    fi
}
