#!/usr/bin/env bash
# Stop what cluster/local/up.sh started: the Ray head and SeaweedFS (data and credentials stay in
# MTSEG_LOCAL_DIR, default runs/local-cluster, for the next up.sh; delete the directory to reset).
#
# Only this head's processes are stopped, found by its temp dir on their command line; `ray stop`
# would also stop every other Ray of this user on the machine.
set -uo pipefail

DIR=${MTSEG_LOCAL_DIR:-runs/local-cluster}
[ -d "$DIR" ] || { echo "down.sh: $DIR does not exist: nothing to stop"; exit 0; }
DIR=$(cd "$DIR" && pwd)

stop_pids() {  # SIGTERM, up to 15 s of grace, then SIGKILL
    local pids=("$@") alive
    [ ${#pids[@]} -gt 0 ] || return 0
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in $(seq 1 60); do
        alive=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        [ ${#alive[@]} -eq 0 ] && return 0
        sleep 0.25
    done
    kill -KILL "${alive[@]}" 2>/dev/null
    return 0
}

ray_pids=()
for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [ "$pid" = "$$" ] && continue
    if tr '\0' ' ' < "$proc/cmdline" 2>/dev/null | grep -qF -- "$DIR/ray"; then
        ray_pids+=("$pid")
    fi
done
stop_pids "${ray_pids[@]}"
rm -f "$DIR/ray.address"
echo "ray: stopped (${#ray_pids[@]} processes)"

if [ -f "$DIR/weed.pid" ]; then
    pid=$(cat "$DIR/weed.pid")
    # weed was started in its own session (setsid): its process group id is its pid.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    stop_pids "$pid"
    rm -f "$DIR/weed.pid"
    echo "seaweedfs: stopped"
fi
