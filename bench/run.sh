#!/usr/bin/env bash
# hashgrid side-by-side benchmark against restic, borg, bupstash and rustic.
#
# Builds a deterministic data set (file tree + sparse disk image), then for
# every tool runs: initial backup, unchanged re-backup, (data change),
# changed re-backup, restore + verification. Prints a comparison table and
# writes $BENCH_DIR/results.json. See bench/README.md.
#
# Usage: bench/run.sh            (full run, ~1 GiB tree + 3 GiB image)
#        BENCH_QUICK=1 bench/run.sh   (smoke run, 2,000 files + 256 MiB image)
#        BENCH_TOOLS=restic,borg bench/run.sh   (subset of tools)
set -euo pipefail

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/node.sh
source "$SCRIPT_DIR/node.sh"

BENCH_QUICK=${BENCH_QUICK:-0}
if [[ $BENCH_QUICK == 1 ]]; then
  _def_files=2000 _def_image_mib=256
else
  _def_files=30000 _def_image_mib=3072
fi
BENCH_DIR=${BENCH_DIR:-/tmp/hashgrid-bench}
BENCH_SEED=${BENCH_SEED:-42}
BENCH_FILES=${BENCH_FILES:-$_def_files}
# ~35 KiB mean file size -> 30,000 files ~ 1 GiB
BENCH_TREE_MIB=${BENCH_TREE_MIB:-$(( (BENCH_FILES * 1024 + 15000) / 30000 ))}
BENCH_MAX_FILE_MIB=${BENCH_MAX_FILE_MIB:-4}
if [[ -n ${BENCH_IMAGE_GIB:-} ]]; then
  BENCH_IMAGE_MIB=$(awk -v g="$BENCH_IMAGE_GIB" 'BEGIN { printf "%d", g * 1024 }')
fi
BENCH_IMAGE_MIB=${BENCH_IMAGE_MIB:-$_def_image_mib}
BENCH_IMAGE_DATA_FRAC=${BENCH_IMAGE_DATA_FRAC:-0.64}  # share of the image holding non-zero data
BENCH_CHANGE_PCT=${BENCH_CHANGE_PCT:-2}               # % of tree files modified
BENCH_IMAGE_CHURN_PCT=${BENCH_IMAGE_CHURN_PCT:-1}     # % of the image overwritten
BENCH_TOOLS=${BENCH_TOOLS:-hashgrid,restic,borg,bupstash,rustic}
BENCH_KEEP_RESTORE=${BENCH_KEEP_RESTORE:-0}
BENCH_STRICT=${BENCH_STRICT:-0}   # 1: exit 2 when a spec target FAILs
BENCH_PASSWORD=${BENCH_PASSWORD:-hashgrid-bench-password}
HASHGRID_NODE_TIMEOUT=${HASHGRID_NODE_TIMEOUT:-60}

CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/hashgrid-target}

BENCH_DIR=$(realpath -m "$BENCH_DIR")
DATA_DIR=$BENCH_DIR/data        # pristine generated data (reused)
SRC_DIR=$BENCH_DIR/src          # working copy that gets backed up and changed
SRC_TREE=$SRC_DIR/tree
SRC_IMAGE=$SRC_DIR/image.raw
REPOS_DIR=$BENCH_DIR/repos
CACHE_DIR=$BENCH_DIR/cache
RESTORE_DIR=$BENCH_DIR/restore
RUN_DIR=$BENCH_DIR/run
LOG_DIR=$RUN_DIR/logs
RECORDS=$RUN_DIR/records.tsv
HELPER=$RUN_DIR/bench_helper.py

KINDS=(tree image)

declare -a TOOLS=()
declare -A TOOL_FAILED=()
declare -A TOOL_BIN=()
HASHGRID_NODE_PID=""
HASHGRID_DATA=$REPOS_DIR/hashgrid
HASHGRID_ADDR=""
EXIT_STATUS=0

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# rec TOOL STEP KIND KEY VALUE  -> one line in records.tsv
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RECORDS"; }

dir_bytes() { du -sb "$1" | cut -f1; }

src_path() { if [[ $1 == tree ]]; then printf '%s' "$SRC_TREE"; else printf '%s' "$SRC_IMAGE"; fi; }

# Find a peer binary on PATH or in ~/.cargo/bin.
find_bin() {
  local name=$1 p
  if p=$(command -v "$name" 2>/dev/null); then printf '%s' "$p"; return 0; fi
  if [[ -x $HOME/.cargo/bin/$name ]]; then printf '%s' "$HOME/.cargo/bin/$name"; return 0; fi
  return 1
}

# run_timed TOOL STEP KIND STDOUT_FILE CMD...
# Runs CMD with stdout to STDOUT_FILE and stderr appended to the tool log,
# records wall/user/sys/maxrss. Returns the command's exit status.
run_timed() {
  local tool=$1 step=$2 kind=$3 out=$4
  shift 4
  local tf=$RUN_DIR/time.$tool.$step.$kind log=$LOG_DIR/$tool.log t0 t1 wall rc=0
  local user sys rss
  printf '\n### %s %s %s: %s\n' "$(date +%T)" "$step" "$kind" "$*" >>"$log"
  t0=$(date +%s.%N)
  /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" >"$out" 2>>"$log" || rc=$?
  t1=$(date +%s.%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  read -r _ user sys rss < <(tail -n1 "$tf") || true
  rec "$tool" "$step" "$kind" wall "$wall"
  rec "$tool" "$step" "$kind" user "${user:-0}"
  rec "$tool" "$step" "$kind" sys "${sys:-0}"
  rec "$tool" "$step" "$kind" maxrss_kb "${rss:-0}"
  rec "$tool" "$step" "$kind" rc "$rc"
  if ((rc != 0)); then
    log "  $tool $step $kind FAILED (exit $rc) after ${wall}s; last lines of $log:"
    tail -n 15 "$log" | sed 's/^/      /' >&2
  else
    log "  $tool $step $kind: ${wall}s, peak RSS $(( ${rss:-0} / 1024 )) MiB"
  fi
  return "$rc"
}

tool_failed() {
  local tool=$1 why=$2
  TOOL_FAILED[$tool]=1
  EXIT_STATUS=1
  rec "$tool" - - error "$why"
  log "  $tool marked as failed ($why); its remaining steps are skipped"
}

cleanup() {
  if [[ -n $HASHGRID_NODE_PID ]]; then
    hashgrid_stop_node || true
  fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------------------
# Embedded Python helper: data generation, change step, report.
# ---------------------------------------------------------------------------
write_helper() {
  cat >"$HELPER" <<'PYEOF'
import json, os, sys


# ------------------------------------------------------------------ report
def fmt_s(v):
    return "%.2f" % v if v is not None else "-"


def fmt_mib(v):
    return "%.1f" % (v / 1048576) if v is not None else "-"


def fmt_mib2(v):
    return "%.2f" % (v / 1048576) if v is not None else "-"


def fmt_rss(v):
    return "%.0f" % v if v is not None else "-"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def report(run_dir, out_json):
    meta = json.load(open(os.path.join(run_dir, "meta.json")))
    tools = meta["tools"]
    base = meta["baseline"]
    recs = {}
    errors = {}
    for line in open(os.path.join(run_dir, "records.tsv")):
        tool, step, kind, key, val = line.rstrip("\n").split("\t", 4)
        if key == "error":
            errors[tool] = val
            continue
        try:
            v = int(val)
        except ValueError:
            try:
                v = float(val)
            except ValueError:
                v = val
        recs[(tool, step, kind, key)] = v

    def get(tool, step, kind, key):
        v = recs.get((tool, step, kind, key))
        if key == "wall" and recs.get((tool, step, kind, "rc"), 0) != 0:
            return None
        return v

    def wall(tool, step, kind):
        if kind == "total":
            a, b = get(tool, step, "tree", "wall"), get(tool, step, "image", "wall")
            return None if a is None or b is None else a + b
        return get(tool, step, kind, "wall")

    def rss_mib(tool, step, kind):
        # Peak RSS of a step that failed says nothing about the tool.
        v = recs.get((tool, step, kind, "maxrss_kb"))
        if v is None or recs.get((tool, step, kind, "rc"), 0) != 0:
            return None
        return v / 1024.0

    # repo size after each backup sub-step, growth per step
    order = [(s, k) for s in ("initial", "unchanged", "changed") for k in ("tree", "image")]

    def sizes(tool, key="repo_bytes"):
        out, prev = {}, recs.get((tool, "empty", "-", key), 0) or 0
        for s, k in order:
            v = recs.get((tool, s, k, key))
            out[(s, k, "after")] = v
            out[(s, k, "growth")] = None if v is None or prev is None else v - prev
            prev = v
        for s in ("initial", "unchanged", "changed"):
            a, b = out[(s, "tree", "growth")], out[(s, "image", "growth")]
            out[(s, "total", "growth")] = None if a is None or b is None else a + b
            out[(s, "total", "after")] = out[(s, "image", "after")]
        return out

    size_tbl = {t: sizes(t) for t in tools}
    hg_stats = sizes("hashgrid", "stored_bytes") if "hashgrid" in tools else None

    W0, W = 18, 17
    lines = []
    P = lines.append
    d = meta["data"]
    P("")
    P("hashgrid benchmark  (%s)" % meta["started"])
    P("data: tree %d files / %.1f MiB (%d dirs, %d text-like files, %d duplicates); "
      "image %.0f MiB apparent, %.0f MiB allocated" % (
          d["tree"]["files"], d["tree"]["bytes"] / 1048576, d["tree"]["dirs"],
          d["tree"]["text_files"], d["tree"]["duplicates"],
          d["image"]["apparent_bytes"] / 1048576, d["image"]["allocated_bytes"] / 1048576))
    c = meta.get("change") or {}
    if c:
        P("change: %d files rewritten, %d appended, %d added, %d deleted; image: %d x 4 KiB "
          "blocks + %d x 1 MiB regions (%.1f MiB)" % (
              c["rewritten"], c["appended"], c["added"], c["deleted"], c["image_blocks_4k"],
              c["image_regions_1m"], c["image_bytes_written"] / 1048576))
    P("tools: " + ", ".join("%s (%s)" % (t, meta["versions"].get(t, "?")) for t in tools))
    if errors:
        for t, e in errors.items():
            P("!! %s FAILED: %s" % (t, e))
    hdr = "%-*s" % (W0, "step") + "".join(
        ("%*s" % (W, t)) for t in tools)
    rsuffix = "tool/%s" % base

    def row(label, vals, fmt, base_val, min_abs=0):
        # min_abs: no ratio when both values are below it (ratios of ~0 are noise)
        cells = []
        for t, v in vals:
            s = fmt(v)
            if t != base:
                r = None
                if v is not None and max(abs(v), abs(base_val or 0)) >= min_abs:
                    r = ratio(v, base_val)
                s += " %6s" % (("%.1fx" % r) if r is not None else "")
            cells.append("%*s" % (W, s))
        return ("%-*s" % (W0, label) + "".join(cells)).rstrip()

    P("")
    P("== wall-clock seconds  (ratio = %s; >1x means %s is faster) ==" % (rsuffix, base))
    P(hdr)
    for step in ("initial", "unchanged", "changed", "restore"):
        for kind in ("tree", "image", "total"):
            vals = [(t, wall(t, step, kind)) for t in tools]
            P(row("%-9s %s" % (step, kind), vals, fmt_s, wall(base, step, kind)))
    P("")
    P("== client peak RSS, MiB, beside each step's time  (ratio = %s; >1x means %s uses less) =="
      % (rsuffix, base))
    P(hdr)
    for step in ("initial", "unchanged", "changed", "restore"):
        for kind in ("tree", "image"):
            vals = [(t, rss_mib(t, step, kind)) for t in tools]
            P(row("%-9s %s" % (step, kind), vals, fmt_rss, rss_mib(base, step, kind)))
    P("")
    P("== repository size after step, MiB (du -sb) ==")
    P(hdr)
    for s, k in order:
        vals = [(t, size_tbl[t][(s, k, "after")]) for t in tools]
        P(row("%-9s %s" % (s, k), vals, fmt_mib, size_tbl[base][(s, k, "after")]))
    P("")
    P("== repository growth per step, MiB  (ratio = %s; >1x means %s stores less; no ratio below 1 MiB) =="
      % (rsuffix, base))
    P(hdr)
    for s in ("initial", "unchanged", "changed"):
        for k in ("tree", "image", "total"):
            vals = [(t, size_tbl[t][(s, k, "growth")]) for t in tools]
            P(row("%-9s %s" % (s, k), vals, fmt_mib2, size_tbl[base][(s, k, "growth")], 1 << 20))
    if hg_stats:
        P("")
        P("hashgrid stats stored_bytes (MiB) after / growth:  " + "  ".join(
            "%s %s: %s / %s" % (s, k, fmt_mib(hg_stats[(s, k, "after")]), fmt_mib(hg_stats[(s, k, "growth")]))
            for s, k in order))
    P("")
    P("== restore verification ==")
    for t in tools:
        P("%-10s tree: %-8s image: %s" % (t, recs.get((t, "restore", "tree", "verify"), "-"),
                                          recs.get((t, "restore", "image", "verify"), "-")))

    # ------------------------------------------------------------ targets
    targets = []
    if "hashgrid" in tools and "restic" in tools:
        def tgt(name, value, ok, detail):
            targets.append({"target": name, "pass": bool(ok), "value": value, "detail": detail})

        for step in ("initial", "unchanged", "changed", "restore"):
            for kind in ("tree", "image"):
                h, r = wall("hashgrid", step, kind), wall("restic", step, kind)
                rr = ratio(r, h)
                need = 5.0 if step == "unchanged" else 2.0
                what = "backup" if step != "restore" else "restore"
                name = "%s %s %s >= %.0fx faster than restic" % (
                    step if step != "restore" else "", kind, what, need)
                tgt(name.strip(), rr, rr is not None and rr >= need,
                    "restic %s s / hashgrid %s s" % (fmt_s(r), fmt_s(h)))
        hg = size_tbl["hashgrid"][("changed", "total", "growth")]
        rg = size_tbl["restic"][("changed", "total", "growth")]
        rr = ratio(hg, rg) if hg is not None and rg else None
        tgt("changed re-backup stored growth <= 0.5x restic's (du -sb)", rr,
            rr is not None and rr <= 0.5,
            "hashgrid %s MiB / restic %s MiB" % (fmt_mib(hg), fmt_mib(rg)))
        P("")
        P("== spec targets (hashgrid vs restic) ==")
        for t in targets:
            v = t["value"]
            P("%s  %-58s %8s   (%s)" % ("PASS" if t["pass"] else "FAIL", t["target"],
                                         ("%.2fx" % v) if v is not None else "n/a", t["detail"]))
    else:
        P("")
        P("(spec targets need both hashgrid and restic in BENCH_TOOLS; skipped)")

    # ------------------------------------------------------------ json
    res = {"started": meta["started"], "params": meta["params"], "data": meta["data"],
           "change": meta.get("change"), "baseline": base, "versions": meta["versions"],
           "errors": errors, "tools": {}, "targets": targets}
    for t in tools:
        tt = {}
        for step in ("initial", "unchanged", "changed", "restore"):
            for kind in ("tree", "image"):
                e = {"wall_s": wall(t, step, kind)}
                for key in ("user", "sys", "maxrss_kb", "rc"):
                    e[key] = recs.get((t, step, kind, key))
                if step != "restore":
                    e["repo_bytes_after"] = size_tbl[t][(step, kind, "after")]
                    e["repo_growth_bytes"] = size_tbl[t][(step, kind, "growth")]
                    if t == "hashgrid" and hg_stats:
                        e["stored_bytes_after"] = hg_stats[(step, kind, "after")]
                        e["stored_growth_bytes"] = hg_stats[(step, kind, "growth")]
                        jf = os.path.join(run_dir, "hashgrid.%s.%s.out" % (step, kind))
                        try:
                            e["client_stats"] = json.load(open(jf)).get("stats")
                        except Exception:
                            pass
                else:
                    e["verify"] = recs.get((t, step, kind, "verify"))
                tt["%s_%s" % (step, kind)] = e
        res["tools"][t] = tt
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    P("")
    P("== summary (also in %s) ==" % out_json)
    summ = {"baseline": base, "wall_s": {}, "growth_mib": {}, "targets_failed": sum(not t["pass"] for t in targets),
            "targets_total": len(targets)}
    for t in tools:
        summ["wall_s"][t] = {("%s_%s" % (s, k)): (round(wall(t, s, k), 2) if wall(t, s, k) is not None else None)
                             for s in ("initial", "unchanged", "changed", "restore") for k in ("tree", "image")}
        summ["growth_mib"][t] = {s: (round(size_tbl[t][(s, "total", "growth")] / 1048576, 1)
                                     if size_tbl[t][(s, "total", "growth")] is not None else None)
                                 for s in ("initial", "unchanged", "changed")}
        summ.setdefault("peak_rss_mib", {})[t] = {
            ("%s_%s" % (s, k)): (round(rss_mib(t, s, k)) if rss_mib(t, s, k) is not None else None)
            for s in ("initial", "unchanged", "changed", "restore") for k in ("tree", "image")}
    P(json.dumps(summ, separators=(",", ":")))
    print("\n".join(lines))
    return 0


def find_key(v, key):
    if isinstance(v, dict):
        if key in v:
            return v[key]
        v = list(v.values())
    if isinstance(v, list):
        for x in v:
            r = find_key(x, key)
            if r is not None:
                return r
    return None


def main():
    cmd = sys.argv[1]
    a = sys.argv[2:]
    if cmd == "report":
        sys.exit(report(a[0], a[1]))
    elif cmd == "json-get":  # json-get FILE KEY[.KEY...]; a missing single key is searched for recursively
        v = json.load(open(a[0]))
        keys = a[1].split(".")
        if len(keys) == 1 and not (isinstance(v, dict) and keys[0] in v):
            v = find_key(v, keys[0])
            if v is None:
                sys.exit("key %s not found in %s" % (keys[0], a[0]))
        else:
            for k in keys:
                v = v[k]
        print(v)
    elif cmd == "meta":  # meta RUN_DIR key json-value  (merge into meta.json)
        p = os.path.join(a[0], "meta.json")
        m = json.load(open(p)) if os.path.exists(p) else {}
        m[a[1]] = json.loads(a[2])
        json.dump(m, open(p, "w"), indent=1)
    else:
        sys.exit("unknown helper command " + cmd)


main()
PYEOF
}

helper() { python3 "$HELPER" "$@"; }
meta() { helper meta "$RUN_DIR" "$1" "$2"; }

# ---------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------
prepare_data() {
  local params stamp=$DATA_DIR/.params
  params="v2 seed=$BENCH_SEED files=$BENCH_FILES tree_mib=$BENCH_TREE_MIB max_file_mib=$BENCH_MAX_FILE_MIB"
  params+=" image_mib=$BENCH_IMAGE_MIB image_data_frac=$BENCH_IMAGE_DATA_FRAC"
  # fingerprint of the generators (the testbed binary that holds them)
  params+=" gen=$(sha256sum <"$TESTBED" | cut -c1-16)"
  if [[ -f $stamp && $(head -n1 "$stamp") == "$params" && -d $DATA_DIR/tree && -f $DATA_DIR/image.raw ]]; then
    log "reusing data set in $DATA_DIR ($params)"
  else
    log "generating data set in $DATA_DIR ($params)"
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR"
    local t0=$SECONDS
    # tree and image in parallel (2 cores)
    "$TESTBED" tree "$DATA_DIR/tree" --seed "$BENCH_SEED" --files "$BENCH_FILES" \
      --bytes $((BENCH_TREE_MIB * 1048576)) --max-file $((BENCH_MAX_FILE_MIB * 1048576)) \
      >"$DATA_DIR/tree.json" &
    local tree_pid=$!
    "$TESTBED" image "$DATA_DIR/image.raw" --seed "$BENCH_SEED" \
      --bytes $((BENCH_IMAGE_MIB * 1048576)) --data-fraction "$BENCH_IMAGE_DATA_FRAC" \
      >"$DATA_DIR/image.json" ||
      { kill "$tree_pid" 2>/dev/null || true; die "image generation failed"; }
    wait "$tree_pid" || die "tree generation failed"
    printf '%s\n' "$params" >"$stamp"
    log "data set generated in $((SECONDS - t0))s: tree $(cat "$DATA_DIR/tree.json")"
    log "  image $(cat "$DATA_DIR/image.json")"
  fi
  meta data "{\"tree\": $(cat "$DATA_DIR/tree.json"), \"image\": $(cat "$DATA_DIR/image.json")}"

  log "copying pristine data to working copy $SRC_DIR"
  local t0=$SECONDS
  rm -rf "$SRC_DIR"
  mkdir -p "$SRC_DIR"
  cp -a "$DATA_DIR/tree" "$SRC_TREE"
  cp -a --sparse=always "$DATA_DIR/image.raw" "$SRC_IMAGE"
  sync
  log "  copied in $((SECONDS - t0))s"
}

warm_cache() {
  # read the whole source once so every tool starts from the same (warm) page cache
  find "$SRC_DIR" -type f -print0 | xargs -0 cat | cat >/dev/null
}

apply_change() {
  log "applying change to $SRC_DIR"
  local out
  out=$("$TESTBED" change --tree "$SRC_TREE" --image "$SRC_IMAGE" --seed "$BENCH_SEED" \
    --files-percent "$BENCH_CHANGE_PCT" --image-percent "$BENCH_IMAGE_CHURN_PCT") ||
    die "change step failed"
  log "  $out"
  meta change "$out"
  sync
}

# ---------------------------------------------------------------------------
# Tool adapters: <tool>_setup, <tool>_backup STEP KIND, <tool>_restore KIND DEST
# (prints the path of the restored tree/image), <tool>_repo
# ---------------------------------------------------------------------------

# ---- hashgrid ---------------------------------------------------------------
# The directory holding hashgrid, hashgrid-node and hashgrid-testbed: $HASHGRID_BIN, else
# built once with cargo.
BINDIR=""
find_bindir() {
  [[ -z $BINDIR ]] || return 0
  if [[ -n ${HASHGRID_BIN:-} ]]; then
    BINDIR=$HASHGRID_BIN
  else
    BINDIR=$CARGO_TARGET_DIR/release
    log "building hashgrid: cargo build --release (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    if ! (cd "$REPO_ROOT" && CARGO_TARGET_DIR=$CARGO_TARGET_DIR cargo build --release) \
      >"$LOG_DIR/hashgrid-build.log" 2>&1; then
      tail -n 30 "$LOG_DIR/hashgrid-build.log" >&2
      die "cargo build --release failed (full log: $LOG_DIR/hashgrid-build.log)"
    fi
  fi
  [[ -x $BINDIR/hashgrid-testbed ]] || die "hashgrid-testbed not found in $BINDIR"
  TESTBED=$BINDIR/hashgrid-testbed
}

hashgrid_detect() {
  find_bindir
  [[ -x $BINDIR/hashgrid && -x $BINDIR/hashgrid-node ]] ||
    die "hashgrid binaries not found in $BINDIR (expected hashgrid and hashgrid-node)"
  TOOL_BIN[hashgrid]=$BINDIR/hashgrid
}
hashgrid_version() { "${TOOL_BIN[hashgrid]}" --version 2>/dev/null | head -n1 || echo unknown; }
hashgrid_repo() { printf '%s' "$HASHGRID_DATA"; }

# The node runs under `hashgrid-testbed node`, the harness the tests and the demo use: it
# prints the address once the node serves and stops the node cleanly on SIGTERM.
hashgrid_start_node() {
  if ! start_node "$TESTBED" "$HASHGRID_DATA" "$LOG_DIR/hashgrid-node.log" "$HASHGRID_NODE_TIMEOUT"; then
    HASHGRID_NODE_PID=""
    die "hashgrid-node did not start (log: $LOG_DIR/hashgrid-node.log)"
  fi
  HASHGRID_NODE_PID=$HARNESS_PID
  HASHGRID_ADDR=$NODE_ADDR
  log "hashgrid-node (harness pid $HASHGRID_NODE_PID) listening on $HASHGRID_ADDR"
}

hashgrid_stop_node() {
  [[ -n $HASHGRID_NODE_PID ]] || return 0
  local pid=$HASHGRID_NODE_PID
  HASHGRID_NODE_PID=""
  kill -TERM "$pid" 2>/dev/null || return 0
  wait "$pid" 2>/dev/null || log "hashgrid-node did not stop cleanly (log: $LOG_DIR/hashgrid-node.log)"
}

hg() { "${TOOL_BIN[hashgrid]}" --server "http://$HASHGRID_ADDR" --token-file "$HASHGRID_DATA/admin.token" "$@"; }

# The agent's tree cache lives with the other tools' caches (empty at the start of a run).
hashgrid_setup() {
  export HASHGRID_CACHE_DIR=$CACHE_DIR/hashgrid
  hashgrid_start_node
}

hashgrid_backup() {
  local step=$1 kind=$2 out=$RUN_DIR/hashgrid.$1.$2.out
  if [[ $kind == tree ]]; then
    run_timed hashgrid "$step" "$kind" "$out" "${TOOL_BIN[hashgrid]}" --server "http://$HASHGRID_ADDR" \
      --token-file "$HASHGRID_DATA/admin.token" backup "$SRC_TREE" --dataset tree --json || return
  else
    run_timed hashgrid "$step" "$kind" "$out" "${TOOL_BIN[hashgrid]}" --server "http://$HASHGRID_ADDR" \
      --token-file "$HASHGRID_DATA/admin.token" backup --image "$SRC_IMAGE" --dataset image --json || return
  fi
  cat "$out" >>"$LOG_DIR/hashgrid.log"
}

hashgrid_after_backup() {
  local step=$1 kind=$2 sb
  if hg stats --json >"$RUN_DIR/hashgrid.stats.$step.$kind.json" 2>>"$LOG_DIR/hashgrid.log" &&
    sb=$(helper json-get "$RUN_DIR/hashgrid.stats.$step.$kind.json" stored_bytes 2>>"$LOG_DIR/hashgrid.log"); then
    rec hashgrid "$step" "$kind" stored_bytes "$sb"
  else
    log "  (hashgrid stats --json failed or has no stored_bytes; see $LOG_DIR/hashgrid.log)"
  fi
}

hashgrid_restore() {
  local kind=$1 dest=$2
  run_timed hashgrid restore "$kind" "$RUN_DIR/hashgrid.restore.$kind.out" "${TOOL_BIN[hashgrid]}" \
    --server "http://$HASHGRID_ADDR" --token-file "$HASHGRID_DATA/admin.token" \
    restore latest --dataset "$kind" --target "$dest" --json || return
  if [[ $kind == tree ]]; then RESTORED=$dest$SRC_TREE; else RESTORED=$dest/$(basename "$SRC_IMAGE"); fi
}

# ---- restic -----------------------------------------------------------------
RESTIC_BACKUP_FLAGS=()
restic_detect() { TOOL_BIN[restic]=$(find_bin restic); }
restic_version() { restic version | head -n1; }
restic_repo() { printf '%s' "$REPOS_DIR/restic"; }
restic_setup() {
  export RESTIC_PASSWORD=$BENCH_PASSWORD RESTIC_CACHE_DIR=$CACHE_DIR/restic
  local init_flags=()
  if restic init --help 2>&1 | grep -q -- '--repository-version'; then
    init_flags+=(--repository-version 2) # compressed format (compression "auto" is the default)
  fi
  if restic backup --help 2>&1 | grep -q -- '--no-scan'; then
    RESTIC_BACKUP_FLAGS+=(--no-scan)
  fi
  restic -r "$(restic_repo)" init "${init_flags[@]}" >>"$LOG_DIR/restic.log" 2>&1
}
restic_backup() {
  local step=$1 kind=$2
  run_timed restic "$step" "$kind" "$RUN_DIR/restic.$step.$kind.out" \
    restic -r "$(restic_repo)" backup "${RESTIC_BACKUP_FLAGS[@]}" --host hashgrid-bench "$(src_path "$kind")"
}
restic_restore() {
  local kind=$1 dest=$2 path
  path=$(src_path "$kind")
  run_timed restic restore "$kind" "$RUN_DIR/restic.restore.$kind.out" \
    restic -r "$(restic_repo)" restore latest --host hashgrid-bench --path "$path" --target "$dest" || return
  RESTORED=$dest$path
}

# ---- borg -------------------------------------------------------------------
borg_detect() { TOOL_BIN[borg]=$(find_bin borg); }
borg_version() { borg --version | head -n1; }
borg_repo() { printf '%s' "$REPOS_DIR/borg"; }
borg_setup() {
  export BORG_BASE_DIR=$CACHE_DIR/borg BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
    BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
  borg init -e none "$(borg_repo)" >>"$LOG_DIR/borg.log" 2>&1
}
borg_backup() {
  local step=$1 kind=$2
  run_timed borg "$step" "$kind" "$RUN_DIR/borg.$step.$kind.out" \
    borg create --compression zstd,3 "$(borg_repo)::$kind-$step" "$(src_path "$kind")"
}
borg_restore() {
  local kind=$1 dest=$2 path extra=()
  path=$(src_path "$kind")
  [[ $kind == image ]] && extra=(--sparse)
  # borg extracts the stored relative path (leading / stripped) into the cwd
  run_timed borg restore "$kind" "$RUN_DIR/borg.restore.$kind.out" \
    env -C "$dest" borg extract "${extra[@]}" "$(borg_repo)::$kind-changed" || return
  RESTORED=$dest/${path#/}
}

# ---- bupstash ----------------------------------------------------------------
declare -A BUPSTASH_LAST=()
bupstash_detect() { TOOL_BIN[bupstash]=$(find_bin bupstash); }
bupstash_version() { "${TOOL_BIN[bupstash]}" version 2>/dev/null | head -n1 || echo unknown; }
bupstash_repo() { printf '%s' "$REPOS_DIR/bupstash"; }
bupstash_setup() {
  export BUPSTASH_REPOSITORY
  BUPSTASH_REPOSITORY=$(bupstash_repo)
  export BUPSTASH_KEY=$CACHE_DIR/bupstash/bench.key
  export BUPSTASH_QUERY_CACHE=$CACHE_DIR/bupstash/query-cache
  mkdir -p "$CACHE_DIR/bupstash"
  {
    "${TOOL_BIN[bupstash]}" init &&
      "${TOOL_BIN[bupstash]}" new-key -o "$BUPSTASH_KEY"
  } >>"$LOG_DIR/bupstash.log" 2>&1
}
bupstash_backup() {
  local step=$1 kind=$2 out=$RUN_DIR/bupstash.$1.$2.out
  # one send log per data set (bupstash's stat cache for unchanged files)
  run_timed bupstash "$step" "$kind" "$out" "${TOOL_BIN[bupstash]}" put \
    --no-progress --print-stats --send-log "$CACHE_DIR/bupstash/$kind.sendlog" "name=$kind" "step=$step" "$(src_path "$kind")" || return
  BUPSTASH_LAST[$kind]=$(tr -d '[:space:]' <"$out")
  [[ -n ${BUPSTASH_LAST[$kind]} ]] || { log "  bupstash put printed no id"; return 1; }
}
bupstash_restore() {
  local kind=$1 dest=$2 id=${BUPSTASH_LAST[$1]:-}
  [[ -n $id ]] || { log "  no bupstash id recorded for $kind"; return 1; }
  if [[ $kind == tree ]]; then
    run_timed bupstash restore "$kind" "$RUN_DIR/bupstash.restore.$kind.out" \
      "${TOOL_BIN[bupstash]}" restore --no-progress --into "$dest" "id=$id" || return
    RESTORED=$dest
  else
    RESTORED=$dest/$(basename "$SRC_IMAGE")
    run_timed bupstash restore "$kind" "$RESTORED" "${TOOL_BIN[bupstash]}" get --no-progress "id=$id"
  fi
}

# ---- rustic ------------------------------------------------------------------
declare -A RUSTIC_LAST=()
rustic_detect() { TOOL_BIN[rustic]=$(find_bin rustic); }
rustic_version() { "${TOOL_BIN[rustic]}" --version 2>/dev/null | head -n1 || echo unknown; }
rustic_repo() { printf '%s' "$REPOS_DIR/rustic"; }
rustic_setup() {
  export RUSTIC_REPOSITORY RUSTIC_PASSWORD=$BENCH_PASSWORD RUSTIC_CACHE_DIR=$CACHE_DIR/rustic
  RUSTIC_REPOSITORY=$(rustic_repo)
  # keep rustic away from any user config profile
  export RUSTIC_NO_PROGRESS=true
  "${TOOL_BIN[rustic]}" init >>"$LOG_DIR/rustic.log" 2>&1
}
rustic_backup() {
  local step=$1 kind=$2 out=$RUN_DIR/rustic.$1.$2.out
  run_timed rustic "$step" "$kind" "$out" "${TOOL_BIN[rustic]}" backup --json --no-scan \
    --host hashgrid-bench "$(src_path "$kind")" || return
  RUSTIC_LAST[$kind]=$(helper json-get "$out" id 2>>"$LOG_DIR/rustic.log") || {
    log "  could not read the snapshot id from rustic backup --json"
    return 1
  }
}
rustic_restore() {
  local kind=$1 dest=$2 id=${RUSTIC_LAST[$1]:-} path extra=()
  path=$(src_path "$kind")
  [[ -n $id ]] || { log "  no rustic snapshot id recorded for $kind"; return 1; }
  [[ $kind == image ]] && extra=(--sparse by-content)
  run_timed rustic restore "$kind" "$RUN_DIR/rustic.restore.$kind.out" \
    "${TOOL_BIN[rustic]}" restore "${extra[@]}" "$id" "$dest" || return
  RESTORED=$dest$path
}

# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
record_repo_size() {
  local tool=$1 step=$2 kind=$3 bytes
  bytes=$(dir_bytes "$("${tool}_repo")")
  rec "$tool" "$step" "$kind" repo_bytes "$bytes"
  if [[ $tool == hashgrid ]]; then hashgrid_after_backup "$step" "$kind"; fi
}

# warm PATH: read a file or tree into the page cache, so every tool starts a timed step
# with the same cache state (whoever runs first after the data is copied would otherwise pay
# for page reclaim, and each tool's own writes decide what is cached for its restore).
warm() {
  find "$1" -type f -print0 | xargs -0 -r cat >/dev/null 2>&1 || true
}

do_backup_step() {
  local step=$1 tool kind
  log "== step: $step backup"
  for tool in "${TOOLS[@]}"; do
    [[ -z ${TOOL_FAILED[$tool]:-} ]] || continue
    for kind in "${KINDS[@]}"; do
      sync
      warm "$(src_path "$kind")"
      if ! "${tool}_backup" "$step" "$kind"; then
        tool_failed "$tool" "$step $kind backup failed (see $LOG_DIR/$tool.log)"
        break
      fi
      record_repo_size "$tool" "$step" "$kind"
    done
  done
}

verify_restore() {
  local tool=$1 kind=$2 restored=$3
  local vlog=$LOG_DIR/$tool.verify.$kind.log
  local ok=1
  if [[ $kind == tree ]]; then
    if [[ ! -d $restored ]]; then
      echo "restored tree $restored does not exist" >"$vlog"
      ok=0
    elif ! diff -r --no-dereference -q "$SRC_TREE" "$restored" >"$vlog" 2>&1; then
      ok=0
    fi
  else
    if [[ ! -f $restored ]]; then
      echo "restored image $restored does not exist" >"$vlog"
      ok=0
    elif ! cmp "$SRC_IMAGE" "$restored" >"$vlog" 2>&1; then
      ok=0
    fi
  fi
  if ((ok)); then
    rec "$tool" restore "$kind" verify ok
    log "  $tool restore $kind verified identical"
  else
    rec "$tool" restore "$kind" verify MISMATCH
    EXIT_STATUS=1
    log "  $tool restore $kind DIFFERS from source (kept in $restored):"
    head -n 10 "$vlog" | sed 's/^/      /' >&2
  fi
  return $((1 - ok))
}

do_restore_step() {
  local tool kind dest verified=()
  log "== step: restore latest snapshots"
  # Restored trees are removed only after every tool has restored: on ext4 the inode
  # allocator skips inodes freed within the last minute (longer while their table blocks
  # are dirty), so creating 30,000 files right after deleting 30,000 costs one tool 10x in
  # system time that the others do not pay. A restored image is one inode and is removed
  # once verified (five tools' copies would need up to 15 GiB more disk).
  for tool in "${TOOLS[@]}"; do
    [[ -z ${TOOL_FAILED[$tool]:-} ]] || continue
    for kind in "${KINDS[@]}"; do
      dest=$RESTORE_DIR/$tool/$kind
      rm -rf "$dest"
      mkdir -p "$dest"
      sync
      warm "$("${tool}_repo")"
      RESTORED=""
      if ! "${tool}_restore" "$kind" "$dest"; then
        tool_failed "$tool" "restore $kind failed (see $LOG_DIR/$tool.log)"
        break
      fi
      if verify_restore "$tool" "$kind" "$RESTORED" && [[ $BENCH_KEEP_RESTORE != 1 ]]; then
        if [[ $kind == image ]]; then rm -rf "$dest"; sync; else verified+=("$dest"); fi
      fi
    done
  done
  ((${#verified[@]} == 0)) || rm -rf "${verified[@]}"
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
main() {
  command -v python3 >/dev/null || die "python3 is required"
  [[ -x /usr/bin/time ]] || die "/usr/bin/time is required (apt-get install time)"

  mkdir -p "$BENCH_DIR"
  rm -rf "$RUN_DIR" "$REPOS_DIR" "$CACHE_DIR" "$RESTORE_DIR"
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$REPOS_DIR" "$CACHE_DIR" "$RESTORE_DIR"
  : >"$RECORDS"
  write_helper

  # ---- select tools
  local tool requested=() versions="{" sep=""
  IFS=', ' read -r -a requested <<<"$BENCH_TOOLS"
  for tool in "${requested[@]}"; do
    [[ -n $tool ]] || continue
    case $tool in
      hashgrid) hashgrid_detect ;;
      restic | borg | bupstash | rustic)
        if ! "${tool}_detect"; then
          log "skipping $tool: not found on PATH or in ~/.cargo/bin"
          continue
        fi
        ;;
      *) die "unknown tool '$tool' in BENCH_TOOLS (known: hashgrid,restic,borg,bupstash,rustic)" ;;
    esac
    TOOLS+=("$tool")
    versions+="$sep\"$tool\": \"$("${tool}_version" | tr -dc '[:alnum:] ._:/()+-')\""
    sep=", "
  done
  versions+="}"
  ((${#TOOLS[@]} > 0)) || die "no tools to benchmark"
  local baseline=${BENCH_BASELINE:-}
  if [[ -z $baseline ]]; then
    baseline=${TOOLS[0]}
    for tool in "${TOOLS[@]}"; do [[ $tool == hashgrid ]] && baseline=hashgrid; done
  fi
  log "tools: ${TOOLS[*]} (baseline for ratios: $baseline)"

  local tools_json
  tools_json=$(printf '"%s",' "${TOOLS[@]}")
  meta started "\"$(date -Is)\""
  meta tools "[${tools_json%,}]"
  meta baseline "\"$baseline\""
  meta versions "$versions"
  meta params "$(printf '{"dir":"%s","seed":%s,"files":%s,"tree_mib":%s,"max_file_mib":%s,"image_mib":%s,"image_data_frac":%s,"change_pct":%s,"image_churn_pct":%s,"quick":%s,"nproc":%s}' \
    "$BENCH_DIR" "$BENCH_SEED" "$BENCH_FILES" "$BENCH_TREE_MIB" "$BENCH_MAX_FILE_MIB" \
    "$BENCH_IMAGE_MIB" "$BENCH_IMAGE_DATA_FRAC" "$BENCH_CHANGE_PCT" "$BENCH_IMAGE_CHURN_PCT" \
    "$BENCH_QUICK" "$(nproc)")"

  # ---- data
  find_bindir
  prepare_data

  # ---- repositories
  for tool in "${TOOLS[@]}"; do
    log "setting up $tool repository"
    if ! "${tool}_setup"; then
      tool_failed "$tool" "repository setup failed (see $LOG_DIR/$tool.log)"
      continue
    fi
    rec "$tool" empty - repo_bytes "$(dir_bytes "$("${tool}_repo")")"
    if [[ $tool == hashgrid ]]; then
      local sb=0
      if hg stats --json >"$RUN_DIR/hashgrid.stats.empty.json" 2>>"$LOG_DIR/hashgrid.log"; then
        sb=$(helper json-get "$RUN_DIR/hashgrid.stats.empty.json" stored_bytes 2>/dev/null) || sb=0
      fi
      rec hashgrid empty - stored_bytes "$sb"
    fi
  done

  # ---- steps (each step for every tool, always in the same tool order)
  warm_cache
  do_backup_step initial
  do_backup_step unchanged
  apply_change
  warm_cache
  do_backup_step changed
  do_restore_step

  hashgrid_stop_node
  log "== report"
  helper report "$RUN_DIR" "$BENCH_DIR/results.json" | tee "$RUN_DIR/report.txt"
  if [[ $BENCH_STRICT == 1 ]] && grep -q '^FAIL' "$RUN_DIR/report.txt"; then
    ((EXIT_STATUS != 0)) || EXIT_STATUS=2
  fi
  log "logs: $LOG_DIR   results: $BENCH_DIR/results.json"
  return "$EXIT_STATUS"
}

main "$@"
