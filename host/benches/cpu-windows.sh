#!/usr/bin/env bash
# Where the CPU went while the 202 was slow: one server at a fixed rate, with
# a scheduler trace of the whole machine beside each request's latency.
#
# The server (the `no-routes` config of ingest.sh) gets WARM seconds of wrk at
# full load, then PIECES pieces of 4 s of oha at RATE req/s (RATE=half: half
# of the warm-up's full load) with latency correction, while `perf record`
# takes every context switch. Per window of 50 ms it prints the requests, the
# share over 5 ms and the CPU time each kind of thread had, per CPU:
#
#   http   the server's HTTP workers (tokio-rt-worker)
#   wal    the journal's writer and applier
#   store  fjall's flush and compaction workers
#   reaper the memtable reaper (frees a flushed memtable's memory)
#   load   the load tool (oha's threads)
#
# and a summary: how many of the requests over 5 ms came in or just after a
# window in which fjall's workers ran over 10 ms. Lines with
# over 20 % of their requests slow are marked `***`; the others are shown
# only with ALL=1.
#
# This is how the crowding in docs/benchmarks.md ("a seventh machine") was
# found: while a flush held one CPU at idle priority, the HTTP workers and the
# load tool shared the other.
#
#   host/benches/cpu-windows.sh                                   # target/release/switchyard
#   RATE=20000 PIECES=5 host/benches/cpu-windows.sh /tmp/sy-other
#
# Needs wrk, oha, python3 and perf (Debian's linux-perf) allowed to trace the
# scheduler (root, or kernel.perf_event_paranoid = -1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=host/benches/lib.sh
source "$HERE/lib.sh"
BIN="${1:-${CARGO_TARGET_DIR:-$REPO/target}/release/switchyard}"
RATE="${RATE:-half}"
PIECES="${PIECES:-3}"
WARM="${WARM:-10}"
require_tools wrk oha python3 perf
use_tmp cpu-windows

port="$(free_port)"
url="http://127.0.0.1:$port/webhooks/shop"
cfg="$(write_config "$TMP/server" "$port" no true)"
"$BIN" serve --config "$cfg" >"$TMP/server.log" 2>&1 &
PID=$!
wait_for_202 "$url" "$TMP/server.log"
full="$(wrk -t2 -c64 -d"${WARM}s" -s "$HERE/ingest.lua" "$url" | sed -n 's/.*rps=\([0-9]*\).*/\1/p')"
rate="$RATE"
[[ "$RATE" == half ]] && rate=$((full / 2))

perf record -q -k CLOCK_MONOTONIC -e sched:sched_switch -a -o "$TMP/sched.data" -- sleep $((PIECES * 4 + 2)) >/dev/null 2>&1 &
perf_pid=$!
sleep 0.5
# The server's threads, by id (the load tool's workers share their name; a
# thread the server starts after this, such as a blocking-pool one, counts as
# the load tool's if it shares it too).
ls "/proc/$PID/task" >"$TMP/tids"
now() { python3 -c 'import time; print(time.clock_gettime(time.CLOCK_MONOTONIC))'; }
for piece in $(seq 0 $((PIECES - 1))); do
	echo "$(now) $TMP/lat.$piece.csv" >>"$TMP/pieces"
	oha -z 4s -c 64 -q "$rate" --latency-correction --no-tui -m POST \
		-H 'content-type: application/json' -d "$BODY" "$url" --output-format csv >"$TMP/lat.$piece.csv" 2>/dev/null
done
wait "$perf_pid" || true
kill -TERM "$PID"
wait "$PID" 2>/dev/null || true
PID=""
perf script -i "$TMP/sched.data" -F cpu,time,trace 2>/dev/null >"$TMP/sched.txt"

python3 - "$TMP" "$full" "$rate" "${ALL:-}" <<'PY'
import collections, csv, re, sys
tmp, full, rate, show_all = sys.argv[1:]
W = 0.05
W_US = 50_000
server = {int(t) for t in open(f"{tmp}/tids").read().split()}

def kind(comm, tid):
    if tid == 0:
        return "idle"
    if tid in server:
        if comm.startswith("tokio"):
            return "http"
        if comm.startswith("journal-"):
            return "wal"
        if comm.startswith("fjall"):
            return "store"
        if comm.startswith("memtable"):
            return "reaper"
        return "other"
    return "load" if comm.startswith(("tokio", "oha")) else "other"

switch = re.compile(r"\[(\d+)\]\s+([\d.]+):.*next_comm=(.*?) next_pid=(\d+)")
running = {}  # cpu -> (since, kind)
busy = collections.defaultdict(float)  # (window, cpu, kind) -> seconds
for line in open(f"{tmp}/sched.txt"):
    m = switch.search(line)
    if not m:
        continue
    # In whole microseconds: a float at a window's edge could stall the split.
    cpu, t = int(m[1]), round(float(m[2]) * 1e6)
    if cpu in running:
        t0, k = running[cpu]
        while t0 < t:
            w = t0 // W_US
            end = min(t, (w + 1) * W_US)
            busy[(w, cpu, k)] += (end - t0) / 1e6
            t0 = end
    running[cpu] = (t, kind(m[3], int(m[4])))
if not running:
    sys.exit("perf recorded no context switch: it needs root or kernel.perf_event_paranoid = -1")

rows = []
for line in open(f"{tmp}/pieces"):
    started, path = line.split()
    rows += [(float(started) + float(r["request-start"]), float(r["request-duration"]) * 1e3)
             for r in csv.DictReader(open(path)) if r["status"] == "202"]
if not rows:
    sys.exit("no answered requests")
per = collections.defaultdict(list)
for start, ms in rows:
    per[int(start / W)].append(ms)
cpus = sorted({c for _, c, _ in busy})
kinds = ["http", "wal", "store", "reaper", "load", "other", "idle"]
store = collections.defaultdict(float)
for (w, _, k), s in busy.items():
    if k == "store":
        store[w] += s

def near_store(w):
    return any(store[w - i] > 0.010 for i in range(3))

first = min(per)
print(f"full load {full} req/s; at {rate} req/s; windows of {W * 1e3:.0f} ms; "
      "CPU ms per window: " + " ".join(kinds))
for w in sorted(per):
    lat = per[w]
    slow = sum(x > 5 for x in lat)
    mark = "***" if slow > 0.2 * len(lat) else ""
    if not (mark or show_all):
        continue
    cols = " | ".join(f"cpu{c} " + " ".join(f"{busy[(w, c, k)] * 1e3:4.1f}" for k in kinds) for c in cpus)
    print(f"{(w - first) * W:6.2f} s {len(lat):5d} req {100 * slow / len(lat):5.1f} % over 5 ms "
          f"max {max(lat):5.1f} ms {mark:3s} {cols}")
lat = sorted(ms for _, ms in rows)
slow = [(s, ms) for s, ms in rows if ms > 5]
near = sum(near_store(int(s / W)) for s, _ in slow)
windows = len(per)
bursts = sum(1 for w in per if store[w] > 0.010)
total = collections.Counter()
for (_, _, k), s in busy.items():
    total[k] += s
print(f"{len(rows)} requests: p50 {lat[len(lat) // 2]:.2f} p99 {lat[int(len(lat) * .99)]:.2f} ms; "
      f"over 5 ms {len(slow)} ({100 * len(slow) / len(rows):.2f} %), of which {near} "
      f"({100 * near / max(1, len(slow)):.0f} %) in or up to 100 ms after a window where "
      f"fjall's workers ran over 10 ms ({bursts} of {windows} windows)")
print("CPU seconds in all: " + " ".join(f"{k} {total[k]:.2f}" for k in kinds))
PY
