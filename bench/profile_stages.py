#!/usr/bin/env python3
"""Groups `perf script -F pid,comm,ip,sym,dso` samples (system-wide, both cores, idle included)
by process (agent, node, other, idle) and by stage, and prints the shares with the CPU
seconds each stands for. Used by bench/profile.sh."""

import argparse
import collections
import re
import sys

# First match wins; the pattern is searched in "dso sym".
STAGES = [
    ("zstd compress", r"ZSTD_compress|ZSTD_encode|ZSTD_.*Block_|ZSTD_fill|ZSTD_ldm|HUF_compress|"
                      r"FSE_(build|write|compress|normalize)|HIST_|ZSTD_build|ZSTD_reset|ZSTD_.*Match|"
                      r"ZSTD_count|ZSTD_insert|ZSTD_selectEncodingType|ZSTD_seqToCodes|ZSTD_entropy|"
                      r"ZSTD_noCompress|ZSTD_rawLiteralsBlock"),
    ("zstd decompress", r"ZSTD_decompress|ZSTD_decode|HUF_decompress|HUF_.*[Dd]ecode|FSE_decode|"
                        r"FSE_read|ZSTD_DCtx|ZSTD_execSequence|ZSTD_buildFSETable|HUF_readStats"),
    ("blake3 hash", r"blake3"),
    ("fastcdc cut", r"fastcdc|chunker"),
    ("zero check", r"is_zero"),
    ("crc32c", r"crc32"),
    ("rocksdb", r"rocksdb|librocksdb"),
    ("memcpy/memset", r"memmove|memcpy|memset|__memcmp|memcmp"),
    ("malloc/free", r"malloc|_int_free|_int_realloc|cfree|\bfree\b|realloc|arena_|tcache|"
                    r"sysmalloc|alloc::raw_vec|__rust_alloc|__rust_dealloc|unlink_chunk"),
    ("protobuf", r"prost|encoded_len|encode_raw|merge_field|bytes::"),
    ("grpc/http2", r"h2::|hyper|tonic|tower|http_body"),
    ("tokio/sync", r"tokio|parking_lot|futures|crossbeam|rayon|std::sync|pthread|__lll|"
                   r"sched_yield|syscall|epoll"),
    ("kernel", r"kernel\.kallsyms|\[kernel|vmlinux"),
    ("hashgrid", r"hashgrid"),
]
COMPILED = [(name, re.compile(pat)) for name, pat in STAGES]


def stage_of(dso, sym):
    text = f"{dso} {sym}"
    for name, pat in COMPILED:
        if pat.search(text):
            return name
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent-comm", default="hashgrid")
    ap.add_argument("--node-comm", default="hashgrid-node")
    ap.add_argument("--node-pid", type=int, default=-1)
    ap.add_argument("--wall", type=float, required=True)
    ap.add_argument("--agent-cpu", type=float, required=True)
    ap.add_argument("--node-cpu", type=float, required=True)
    ap.add_argument("--agent-rss-kb", type=int, default=0)
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    samples = []
    agent_pids = set()
    node_pids = {args.node_pid}
    line_re = re.compile(r"^\s*(.*?)\s+(\d+)\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
    for line in sys.stdin:
        m = line_re.match(line)
        if not m:
            continue
        comm, pid, sym, dso = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if comm == args.agent_comm:
            agent_pids.add(pid)
        if comm == args.node_comm:
            node_pids.add(pid)
        samples.append((pid, comm, dso, sym))
    if not samples:
        sys.exit("no samples (is perf allowed to record system-wide?)")

    by_proc = collections.Counter()
    by_stage = {p: collections.Counter() for p in ("agent", "node", "other")}
    for pid, comm, dso, sym in samples:
        if pid == 0 or comm == "swapper":
            by_proc["idle"] += 1
            continue
        proc = "agent" if pid in agent_pids else "node" if pid in node_pids else "other"
        by_proc[proc] += 1
        by_stage[proc][stage_of(dso, sym)] += 1

    total = len(samples)
    cpu_total = 2 * args.wall  # both cores for the whole run

    def secs(n):
        return n / total * cpu_total

    print(f"== {args.label}: {args.wall:.2f} s wall, agent peak RSS {args.agent_rss_kb // 1024} MiB")
    print(f"measured CPU: agent {args.agent_cpu:.2f} s, node {args.node_cpu:.2f} s "
          f"(of {cpu_total:.2f} core-seconds)")
    print(f"{'where (sampled)':<24}{'share':>8}{'core-s':>9}")
    for proc in ("agent", "node", "other", "idle"):
        n = by_proc[proc]
        print(f"{proc:<24}{n / total:>8.1%}{secs(n):>9.2f}")
    for proc in ("agent", "node", "other"):
        if not by_proc[proc]:
            continue
        print(f"-- {proc} by stage")
        for stage, n in by_stage[proc].most_common():
            if n / total < 0.005:
                continue
            print(f"   {stage:<21}{n / total:>8.1%}{secs(n):>9.2f}")


if __name__ == "__main__":
    main()
