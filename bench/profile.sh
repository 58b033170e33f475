#!/usr/bin/env bash
# Where a first backup's time goes: runs one first backup (or one restore of it) against a
# fresh local node under a system-wide `perf record` (software clock, so it works in VMs
# without hardware counters), then prints
#   - wall time, and CPU seconds of the agent, the node and everything else;
#   - the share of all CPU time (both cores, idle included) by process and by stage
#     (read and chunk, hash, compress, decompress, protobuf/gRPC, RocksDB, kernel I/O,
#     memory copies, idle...), from the sampled symbols.
#
# Usage: bench/profile.sh tree|image [backup|restore]
#   PROFILE_DIR   work dir (default /tmp/hashgrid-profile); the data is made there once
#   BENCH_FILES, BENCH_TREE_MIB, BENCH_IMAGE_MIB   data shape (defaults: the full benchmark's)
#   HASHGRID_BIN  prebuilt binaries (default: cargo build --release into CARGO_TARGET_DIR)
#   PERF_FREQ     samples per second per core (default 499)
#   PROFILE_TARGET  where a restore writes (default $PROFILE_DIR/run/restore; removed at exit)
#
# A restore creates every file anew: on ext4, inodes freed in the last minute are skipped
# when new ones are allocated, at a cost of several seconds of kernel time for a tree this
# size, so leave a minute after deleting a large tree (this script deletes its restored
# copy at exit) before profiling a restore.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHAT=${1:-tree}
STEP=${2:-backup}
[[ $WHAT == tree || $WHAT == image ]] || { echo "usage: $0 tree|image [backup|restore]" >&2; exit 2; }
[[ $STEP == backup || $STEP == restore ]] || { echo "usage: $0 tree|image [backup|restore]" >&2; exit 2; }
PROFILE_DIR=${PROFILE_DIR:-/tmp/hashgrid-profile}
BENCH_FILES=${BENCH_FILES:-69000}
BENCH_TREE_MIB=${BENCH_TREE_MIB:-2700}
BENCH_IMAGE_MIB=${BENCH_IMAGE_MIB:-3072}
PERF_FREQ=${PERF_FREQ:-499}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/hashgrid-target}

# shellcheck source=bench/node.sh
source "$REPO_ROOT/bench/node.sh"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
command -v perf >/dev/null || { log "perf is required (apt-get install linux-perf)"; exit 1; }
[[ -x /usr/bin/time ]] || { log "/usr/bin/time is required (apt-get install time)"; exit 1; }

if [[ -n ${HASHGRID_BIN:-} ]]; then
  BIN=$HASHGRID_BIN
else
  log "building release binaries"
  (cd "$REPO_ROOT" && cargo build --release -q --bin hashgrid --bin hashgrid-node --bin hashgrid-testbed)
  BIN=$CARGO_TARGET_DIR/release
fi

mkdir -p "$PROFILE_DIR"
DATA=$PROFILE_DIR/data-$WHAT-$BENCH_FILES-$BENCH_TREE_MIB-$BENCH_IMAGE_MIB
if [[ ! -e $DATA.done ]]; then
  log "making the $WHAT data (once)"
  rm -rf "$DATA"
  if [[ $WHAT == tree ]]; then
    "$BIN/hashgrid-testbed" tree "$DATA" --files "$BENCH_FILES" --bytes $((BENCH_TREE_MIB << 20)) >/dev/null
  else
    "$BIN/hashgrid-testbed" image "$DATA" --bytes $((BENCH_IMAGE_MIB << 20)) >/dev/null
  fi
  touch "$DATA.done"
fi

RUN=$PROFILE_DIR/run
TARGET=${PROFILE_TARGET:-$RUN/restore}
cleanup() {
  stop_node
  rm -rf "$TARGET"
}
trap cleanup EXIT
rm -rf "$RUN"
mkdir -p "$RUN"
start_node "$BIN/hashgrid-testbed" "$RUN/node" "$RUN/node.log" || { log "hashgrid-node did not start"; exit 1; }
ADDR=$NODE_ADDR
HG=("$BIN/hashgrid" --server "http://$ADDR" --token-file "$RUN/node/admin.token")
BACKUP=("${HG[@]}" backup --dataset profile --no-cache --json)
[[ $WHAT == image ]] && BACKUP+=(--image)
BACKUP+=("$DATA")

if [[ $STEP == restore ]]; then
  log "first backup (not profiled)"
  "${BACKUP[@]}" >/dev/null
  PROFILED=("${HG[@]}" restore latest --dataset profile --target "$TARGET" --json)
else
  PROFILED=("${BACKUP[@]}")
fi

# Warm caches, as the benchmark does: the source (or the node's packs) read once.
if [[ $STEP == backup ]]; then
  find "$DATA" -type f -print0 | xargs -0 cat >/dev/null
else
  find "$RUN/node" -type f -print0 | xargs -0 cat >/dev/null
fi
sync

node_cpu() { awk '{print $14 + $15}' "/proc/$NODE_PID/stat"; }
TICKS=$(getconf CLK_TCK)
before=$(node_cpu)
log "profiling: ${PROFILED[*]}"
perf record -q -F "$PERF_FREQ" -a -o "$RUN/perf.data" -- \
  /usr/bin/time -f '%e %U %S %M' -o "$RUN/time" "${PROFILED[@]}" >"$RUN/out.json"
after=$(node_cpu)
read -r WALL AGENT_USER AGENT_SYS AGENT_RSS <"$RUN/time"

perf script -i "$RUN/perf.data" -F pid,comm,ip,sym,dso 2>/dev/null |
  python3 "$REPO_ROOT/bench/profile_stages.py" \
    --agent-comm hashgrid --node-pid "$NODE_PID" --wall "$WALL" \
    --agent-cpu "$(echo "$AGENT_USER + $AGENT_SYS" | bc)" \
    --node-cpu "$(echo "($after - $before) / $TICKS" | bc -l)" \
    --agent-rss-kb "$AGENT_RSS" --label "$WHAT $STEP"
