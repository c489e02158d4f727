#!/usr/bin/env bash
# Run the fedtl Flower app with `flwr run` against a SuperLink in simulation mode that this
# script starts (runtime dependency installation off: the app is installed in this venv)
# and always stops again.
#
#   simulations/flwr_run_local.sh OUT_DIR [SITES] [ROUNDS] [extra run-config, e.g. "data.path='x.npz'"]
set -euo pipefail
script_args="$*"
out=$(realpath -m "${1:?usage: $0 OUT_DIR [SITES] [ROUNDS] [RUN_CONFIG]}")
sites=${2:-10}
rounds=${3:-40}
extra=${4:-}
here=$(cd "$(dirname "$0")/.." && pwd)
export FLWR_HOME=${FLWR_HOME:-$(mktemp -d)}
export FLWR_TELEMETRY_ENABLED=0
port=${FEDTL_SUPERLINK_PORT:-39191}  # Flower 1.41+: Fleet, Control and Runtime APIs share one port
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedtl-local"

[superlink.fedtl-local]
address = "127.0.0.1:${port}"
insecure = true
TOML
export FEDTL_RUN_MARKER="flwr-run-local-$$-$RANDOM"
setsid flower-superlink --insecure --simulation --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "${port}" \
  > "$FLWR_HOME/superlink.log" 2>&1 &
link_pid=$!
export -n FEDTL_RUN_MARKER  # only the SuperLink's tree carries it, not this script's helpers
# Every process started from here inherits this marker; at exit all of them are stopped,
# including those (Ray's) that leave the SuperLink's process group.
marked() { grep -lsz "^FEDTL_RUN_MARKER=${FEDTL_RUN_MARKER}\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true; }
# Ray's agents rename themselves (setproctitle overwrites /proc/PID/environ, so the marker is
# gone) and outlive the raylet for seconds: the SuperLink's descendants are also remembered by
# PID and start time before anything is stopped.
descendants() {
  ps -e -o pid= -o ppid= | awk -v root="$1" '{ up[$1] = $2 }
    END { for (p in up) { q = p; n = 0; while ((q in up) && q != root && n++ < 64) q = up[q]; if (q == root) print p } }'
}
started() {  # start time of a live (non-zombie) process, empty otherwise
  local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  set -- ${stat##*) }
  [ "$1" = Z ] || echo "${20}"
}
tracked=""
track() {
  local p t
  for p in "$link_pid" $(descendants "$link_pid") $(marked); do
    t=$(started "$p"); [ -n "$t" ] && tracked="$tracked $p:$t"
  done
}
alive() {
  local e
  for e in $tracked; do [ "$(started "${e%%:*}")" = "${e#*:}" ] && echo "${e%%:*}"; done | sort -u
}
stop_all() {
  set +e
  track
  kill -TERM -- "-$link_pid" 2>/dev/null
  for _ in $(seq 16); do  # 8 s of SIGTERM, then SIGKILL: stopped within 15 s
    track
    pids=$(alive)
    [ -z "$pids" ] && return 0
    kill -TERM $pids 2>/dev/null
    sleep 0.5
  done
  pids=$(alive); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  return 0
}
flwr_pid=
on_signal() {  # SIGINT / SIGTERM / SIGHUP: stop `flwr run` and the SuperLink's whole tree, say how to resume
  trap - EXIT INT TERM HUP
  [ -n "$flwr_pid" ] && kill -TERM "$flwr_pid" 2>/dev/null
  stop_all
  [ -n "$flwr_pid" ] && kill -KILL "$flwr_pid" 2>/dev/null
  echo "error: stopped by SIG$1; every process this script started was stopped. Resume the run from its checkpoint:" \
       "$0 ${script_args} with RUN_CONFIG \"output.resume=true\" (same OUT_DIR, SITES and ROUNDS)" >&2
  exit "$2"
}
trap stop_all EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP
for _ in $(seq 60); do
  (echo > "/dev/tcp/127.0.0.1/${port}") 2>/dev/null && break
  sleep 0.5
done
cd "$here"
# OUT_DIR as a TOML basic string (Flower reads --run-config with a regex, then as TOML): any quote survives
out_toml=${out//\\/\\u005c}
out_toml=${out_toml//\"/\\u0022}
# a simulation's demo data is asked for here, explicitly: a ServerApp never falls back to it on its own
case " $extra" in
  *" data.path="*) ;;
  *) extra="data.path=\"$(python -c 'from fedtl.data import BUNDLED_PNEUMONIAMNIST as p; print(p)')\" $extra" ;;
esac
# in the background, so that a signal to this script is handled at once (bash runs traps between commands)
flwr run . fedtl-local --stream \
  --federation-config "num-supernodes=${sites}" \
  --run-config "federation.sites=${sites} federation.rounds=${rounds} output.dir=\"${out_toml}\" ${extra}" &
flwr_pid=$!
wait "$flwr_pid"
test -f "$out/summary.json" && cat "$out/summary.json"
