#!/usr/bin/env bash
# Memory on a large image: backs up, re-reads and restores a 50 GiB sparse image with 17 GiB of
# incompressible data (1 GiB islands every 3 GiB) against a fresh local node, and prints the
# agent's wall time and peak RSS for each step. The restored image is compared with `cmp` and
# its allocated size with the source's.
#
# Usage: bench/big-image.sh            (needs ~40 GiB free under $BIG_DIR)
#        BIG_GIB=8 bench/big-image.sh  (smaller run)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIG_DIR=${BIG_DIR:-/tmp/hashgrid-big}
BIG_GIB=${BIG_GIB:-50}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/hashgrid-target}

# shellcheck source=bench/node.sh
source "$REPO_ROOT/bench/node.sh"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[[ -x /usr/bin/time ]] || { log "/usr/bin/time is required (apt-get install time)"; exit 1; }

log "building release binaries"
(cd "$REPO_ROOT" && cargo build --release -q --bin hashgrid --bin hashgrid-node --bin hashgrid-testbed)
BIN=$CARGO_TARGET_DIR/release

rm -rf "$BIG_DIR"
mkdir -p "$BIG_DIR"
IMG=$BIG_DIR/image.raw
NODE_DIR=$BIG_DIR/node
cleanup() {
  stop_node
  rm -rf "$BIG_DIR"
}
trap cleanup EXIT

log "writing a ${BIG_GIB} GiB image: 1 GiB of random data every 3 GiB"
"$BIN/hashgrid-testbed" islands "$IMG" --bytes $((BIG_GIB << 30)) --island $((1 << 30)) --every $((3 << 30))
sync

start_node "$BIN/hashgrid-testbed" "$NODE_DIR" "$BIG_DIR/node.log" || { log "hashgrid-node did not start"; exit 1; }
ADDR=$NODE_ADDR
HG=("$BIN/hashgrid" --server "http://$ADDR" --token-file "$NODE_DIR/admin.token")

timed() {
  local label=$1
  shift
  /usr/bin/time -f "$label: %e s wall, agent peak RSS %M KB" "$@" >"$BIG_DIR/out.json"
}

timed "initial backup" "${HG[@]}" backup --image "$IMG" --dataset big --json
touch "$IMG" # a new mtime: the agent must read and chunk the whole image again
timed "re-read backup" "${HG[@]}" backup --image "$IMG" --dataset big --json
sync
timed "restore" "${HG[@]}" restore latest --dataset big --target "$BIG_DIR/restore" --json
printf 'node RSS after: %s KB\n' "$(ps -o rss= -p "$NODE_PID" | tr -d ' ')"
printf 'allocated KiB: source %s, restored %s\n' \
  "$(du -k "$IMG" | cut -f1)" "$(du -k "$BIG_DIR/restore/image.raw" | cut -f1)"
if cmp "$IMG" "$BIG_DIR/restore/image.raw"; then
  echo "restored image: identical"
else
  echo "restored image: DIFFERS"
  exit 1
fi
