# Sourced by the bench scripts: the one way they start a node.
#
# start_node TESTBED DATA_DIR LOG [TIMEOUT_SECS]
#   Starts hashgrid-node on DATA_DIR under `hashgrid-testbed node` (the harness the tests
#   and the demo use: it waits for the node's own readiness signal, prints "ADDR PID", and
#   stops the node cleanly on SIGTERM). Sets NODE_ADDR (host:port), NODE_PID (the node's pid)
#   and HARNESS_PID (kill it to stop the node). Returns 1, with the log's tail on stderr,
#   when the node does not start.
start_node() {
  local testbed=$1 data=$2 logf=$3 timeout=${4:-60}
  local ready
  ready=$(mktemp -u "${TMPDIR:-/tmp}/hashgrid-node-ready.XXXXXX")
  mkfifo "$ready"
  mkdir -p "$data"
  "$testbed" node "$data" --log "$logf" --timeout-secs "$timeout" -- \
    --listen 127.0.0.1:0 --metrics-listen off >"$ready" 2>>"$logf" &
  HARNESS_PID=$!
  NODE_ADDR=""
  NODE_PID=""
  read -r NODE_ADDR NODE_PID <"$ready" || true
  rm -f "$ready"
  if [[ -z $NODE_ADDR ]]; then
    tail -n 30 "$logf" >&2 || true
    return 1
  fi
}

# stop_node: stops the node start_node started (if any) and waits for it.
stop_node() {
  [[ -z ${HARNESS_PID:-} ]] || kill "$HARNESS_PID" 2>/dev/null || true
  HARNESS_PID=""
  wait 2>/dev/null || true
}
