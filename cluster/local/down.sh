#!/usr/bin/env bash
# Stop the stack that cluster/local/up.sh started (same Q2L_STACK_DIR), and nothing else:
# each recorded service by its own session/process group (never `ray stop`, which stops every Ray on the
# machine), PostgreSQL with pg_ctl, then any stray process carrying this stack's marker in its environment.
# Idempotent: with nothing running it says so. Logs stay in the state folder until the next up.sh.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=cluster/local/common.sh
source "$HERE/common.sh"

T_START=$(now)
stopped=0

# True while any process is in process group $1.
group_alive() { ps -eo pgid= | grep -qx " *$1"; }

# Wait up to $2 s for process group $1 to be gone; true when it is.
wait_group() {
    local start
    start=$(now)
    while group_alive "$1" && [[ $(elapsed "$start" | cut -d. -f1) -lt $2 ]]; do sleep 0.2; done
    ! group_alive "$1"
}

# After its leader got SIGTERM (`ray start --block` then shuts its node down in order), wait up to $2 s
# for process group $1, then SIGTERM the whole group, 5 s later SIGKILL what is left.
finish_group() {
    local pgid="$1" grace="$2"
    wait_group "$pgid" "$grace" && return 0
    echo "  process group $pgid still running after ${grace}s: terminating the group"
    kill -TERM -- "-$pgid" 2>/dev/null
    wait_group "$pgid" 5 && return 0
    echo "  killing process group $pgid"
    kill -KILL -- "-$pgid" 2>/dev/null
    wait_group "$pgid" 5
}

# Every service is told to stop first and then waited for, so they shut down side by side.
groups=()
for name in "${SERVICES[@]}"; do
    pid="$(pid_of "$name")"
    if alive "$pid"; then
        echo "stopping $name (process group $pid)"
        kill -TERM "$pid" 2>/dev/null
        groups+=("$pid")
    fi
    rm -f "$STATE/pids/$name.pid"
done

pg="$(postmaster_pid)"
if alive "$pg"; then
    echo "stopping postgres (postmaster $pg)"
    as_pg "$(cat "$STATE/pids/pg_bin")/pg_ctl" -D "$STATE/pg/data" -m fast -w -t 30 stop >/dev/null ||
        kill -KILL "$pg" 2>/dev/null
    stopped=$((stopped + 1))
fi
for pgid in "${groups[@]}"; do
    finish_group "$pgid" 30
    stopped=$((stopped + 1))
done

# Strays: processes of this stack outside the recorded groups (Ray job drivers start their own sessions).
strays() {
    grep -lzxF "$MARK" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
}
left=$(strays)
if [[ -n "$left" ]]; then
    echo "stopping stray processes of this stack: $(echo $left)"
    kill -TERM $left 2>/dev/null
    sleep 2
    left=$(strays)
    [[ -n "$left" ]] && kill -KILL $left 2>/dev/null
    stopped=$((stopped + 1))
fi

if [[ $stopped -eq 0 ]]; then
    echo "stack not running (state: $STATE)"
else
    log_time "down" "$T_START"
    echo "stack down in $(elapsed "$T_START") s"
fi
rm -f "$STATE/stack.env"
