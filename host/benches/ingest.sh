#!/usr/bin/env bash
# Ingest throughput of `POST /webhooks/{source}`, side by side in one run:
#
#   bare         host/examples/bare_hyper.rs: same HTTP stack, body read and
#                JSON parse, 202 with an id; no storage (the baseline)
#   switchyard   the real server: fjall journal with group commit, one route
#                (`audit-all` → the audit plugin, fresh instance per delivery)
#   no-routes    the real server with no routes: journal only, no deliveries
#   nofsync      as `switchyard`, with `[server] fsync = false`: the same work
#                without waiting for the disk (what durability costs)
#   verified     as `no-routes`, with Standard Webhooks verification (v1 HMAC)
#                of every request (what verification costs)
#   nats         as `switchyard`, on the NATS JetStream engine (`[engine] kind =
#                "nats"`), against a nats-server started for the run (file
#                store, default sync settings)
#   nats-no-routes  as `no-routes`, on the NATS engine
#
# Then, for each server but `nofsync`, the latency of the 202 at half the
# throughput it just reached, at a fixed rate: with `oha -q --latency-correction`
# (`cargo install oha --locked`) if installed, else `hey -q` (Debian package
# `hey`, heavier: it adds milliseconds of its own at 64 connections). `bare`
# shows what the tool itself adds.
#
# for each connection count, with wrk (Debian package `wrk`) and the same body
# (host/benches/ingest.lua). Loopback only; each load runs DURATION seconds.
#
#   host/benches/ingest.sh                 # build release binaries, then measure
#   CONNS="16 64" DURATION=10 WRK_THREADS=2 SKIP_BUILD=1 host/benches/ingest.sh
#
# Everything (servers, wrk) shares the machine's cores: compare the rows of one
# run with each other, not with another machine's figures. To keep the load
# tool off the server's cores, pin them apart (taskset CPU lists):
#
#   SERVER_CPUS=1 LOAD_CPUS=0 SKIP_BUILD=1 host/benches/ingest.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=host/benches/lib.sh
source "$HERE/lib.sh"
CONNS="${CONNS:-16 64}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
WRK_THREADS="${WRK_THREADS:-2}"
VARIANTS="${VARIANTS:-bare switchyard nofsync no-routes verified nats nats-no-routes}"
SERVER_PIN=()
[[ -n "${SERVER_CPUS:-}" ]] && SERVER_PIN=(taskset -c "$SERVER_CPUS")
LOAD_PIN=()
[[ -n "${LOAD_CPUS:-}" ]] && LOAD_PIN=(taskset -c "$LOAD_CPUS")

command -v wrk >/dev/null || {
	echo "wrk is not installed: apt-get install -y wrk" >&2
	exit 1
}
command -v oha >/dev/null || command -v hey >/dev/null || {
	echo "neither oha (cargo install oha --locked) nor hey (apt-get install -y hey) is installed" >&2
	exit 1
}

if [[ -z "${SKIP_BUILD:-}" ]]; then
	echo "== building release binaries (cargo build --release -p switchyard --bins --examples)"
	(cd "$REPO" && cargo build --release -p switchyard --bins --examples)
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
SWITCHYARD="$TARGET_DIR/release/switchyard"
BARE="$TARGET_DIR/release/examples/bare_hyper"
for bin in "$SWITCHYARD" "$BARE"; do
	[[ -x "$bin" ]] || {
		echo "missing $bin (run without SKIP_BUILD)" >&2
		exit 1
	}
done

TMP="$(mktemp -d -t switchyard-ingest.XXXXXX)"
SERVER_PID=""
NATS_PID=""
stop_server() {
	if [[ -n "$SERVER_PID" ]]; then
		kill -TERM "$SERVER_PID" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$SERVER_PID" 2>/dev/null || true
		wait "$SERVER_PID" 2>/dev/null || true
		SERVER_PID=""
	fi
	# After the host, which drains first.
	if [[ -n "$NATS_PID" ]]; then
		kill -TERM "$NATS_PID" 2>/dev/null || true
		wait "$NATS_PID" 2>/dev/null || true
		NATS_PID=""
	fi
}
cleanup() {
	stop_server
	rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

# Waits until a POST is answered 202 (a switchyard start builds/compiles the plugin).
wait_ready() {
	local url="$1"
	for _ in $(seq 1 1200); do
		if ! kill -0 "$SERVER_PID" 2>/dev/null; then
			echo "server exited; its log:" >&2
			tail -n 30 "$LOG" >&2
			exit 1
		fi
		local code
		local signed=()
		if [[ -n "${SW_SIG:-}" ]]; then
			signed=(-H "webhook-id: $SW_ID" -H "webhook-timestamp: $SW_TS" -H "webhook-signature: $SW_SIG")
		fi
		code="$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
			"${signed[@]}" --data "$BODY" "$url" || true)"
		[[ "$code" == 202 ]] && return 0
		sleep 0.1
	done
	echo "server at $url not ready after 120 s" >&2
	exit 1
}

# Starts one server of a variant on a free port; sets SERVER_PID, URL, LOG.
start_server() {
	local variant="$1" run="$2"
	local port
	port="$(free_port)"
	URL="http://127.0.0.1:$port/webhooks/shop"
	LOG="$TMP/$run.log"
	case "$variant" in
	bare)
		"${SERVER_PIN[@]}" "$BARE" "127.0.0.1:$port" 2>"$LOG" &
		;;
	switchyard | no-routes | nofsync | verified | nats | nats-no-routes)
		local routes=yes fsync=true verify=no nats_url=""
		[[ "$variant" == *no-routes || "$variant" == verified ]] && routes=no
		[[ "$variant" == nofsync ]] && fsync=false
		[[ "$variant" == verified ]] && verify=yes
		if [[ "$variant" == nats* ]]; then
			command -v nats-server >/dev/null || {
				echo "nats-server is not installed: apt-get install -y nats-server" >&2
				exit 1
			}
			local nport
			nport="$(free_port)"
			mkdir -p "$TMP/$run/js"
			"${SERVER_PIN[@]}" nats-server -js -a 127.0.0.1 -p "$nport" -sd "$TMP/$run/js" >"$TMP/$run.nats.log" 2>&1 &
			NATS_PID=$!
			nats_url="nats://127.0.0.1:$nport"
			for _ in $(seq 1 100); do
				(echo >"/dev/tcp/127.0.0.1/$nport") 2>/dev/null && break
				sleep 0.1
			done
		fi
		local cfg
		cfg="$(write_config "$TMP/$run" "$port" "$routes" "$fsync" "$verify" "$nats_url")"
		# Default logging (info, plugin lines included), as a user would run it.
		"${SERVER_PIN[@]}" "$SWITCHYARD" serve --config "$cfg" >"$LOG" 2>&1 &
		;;
	esac
	SERVER_PID=$!
	wait_ready "$URL"
}

# Deliveries made so far: the audit plugin logs one line per delivery.
deliveries() {
	grep -c 'audit: type=' "$LOG" 2>/dev/null || true
}

# Waits until the delivery count stops moving; prints the seconds it took.
wait_drained() {
	local start now prev cur
	start="$(date +%s.%N)"
	prev="$(deliveries)"
	while true; do
		sleep 1
		cur="$(deliveries)"
		[[ "$cur" == "$prev" ]] && break
		prev="$cur"
		now="$(date +%s.%N)"
		if (($(echo "$now - $start > 300" | bc) == 1)); then break; fi
	done
	now="$(date +%s.%N)"
	# minus the one quiet second that showed it was done
	echo "$now - $start - 1" | bc | awk '{ printf "%.1f", ($1 < 0 ? 0 : $1) }'
}

echo "== $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
echo "== wrk -t$WRK_THREADS, ${DURATION}s per run after ${WARMUP}s warm-up; body: ${#BODY} bytes"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# One signature for every request of the `verified` runs (the dedup key is a
# field the body lacks, so each request is stored as a new event).
export SY_BENCH_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SIGNED_ID="msg_bench"
SIGNED_TS="$(date +%s)"
SIGNED_SIG="$(python3 -c '
import base64, hashlib, hmac, sys
key = base64.b64decode(sys.argv[1].split("_", 1)[1])
msg = (sys.argv[2] + "." + sys.argv[3] + ".").encode() + sys.argv[4].encode()
print("v1," + base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode())
' "$SY_BENCH_SECRET" "$SIGNED_ID" "$SIGNED_TS" "$BODY")"
sign_env() {
	if [[ "$1" == verified ]]; then
		export SW_ID="$SIGNED_ID" SW_TS="$SIGNED_TS" SW_SIG="$SIGNED_SIG"
	else
		unset SW_ID SW_TS SW_SIG
	fi
}

RESULTS="$TMP/results"
: >"$RESULTS"
for c in $CONNS; do
	for variant in $VARIANTS; do
		run="$variant-c$c"
		sign_env "$variant"
		start_server "$variant" "$run"
		"${LOAD_PIN[@]}" wrk -t"$WRK_THREADS" -c"$c" -d"${WARMUP}s" -s "$HERE/ingest.lua" "$URL" >/dev/null
		[[ "$variant" == switchyard || "$variant" == nofsync || "$variant" == nats ]] && wait_drained >/dev/null
		before="$(deliveries)"
		out="$("${LOAD_PIN[@]}" wrk -t"$WRK_THREADS" -c"$c" -d"${DURATION}s" --latency -s "$HERE/ingest.lua" "$URL")"
		line="$(grep '^RESULT' <<<"$out")"
		extra=""
		if [[ "$variant" == switchyard || "$variant" == nofsync || "$variant" == nats ]]; then
			during=$(($(deliveries) - before))
			drain="$(wait_drained)"
			after=$(($(deliveries) - before))
			extra=" delivered_during=$during delivered_total=$after drain_s=$drain"
		fi
		if [[ "$variant" != nofsync ]]; then
			# Half the rate just reached, at a fixed rate over the same
			# connections. oha (with coordinated-omission correction) is the
			# lighter tool; hey (its -q is per connection) is the fallback.
			rps="$(sed 's/.*rps=\([0-9]*\).*/\1/' <<<"$line")"
			signed=()
			if [[ "$variant" == verified ]]; then
				signed=(-H "webhook-id: $SIGNED_ID" -H "webhook-timestamp: $SIGNED_TS" -H "webhook-signature: $SIGNED_SIG")
			fi
			if command -v oha >/dev/null; then
				# In pieces of 4 s, each a fresh oha, as half-rate.sh does: one
				# long oha stalls as its result buffers double.
				rm -f "$TMP"/half.*.csv
				for ((left = DURATION, piece = 0; left > 0; left -= 4, piece++)); do
					"${LOAD_PIN[@]}" oha -z "$((left < 4 ? left : 4))s" -c "$c" -q "$((rps / 2))" --latency-correction --no-tui \
						-m POST -T application/json "${signed[@]}" -d "$BODY" "$URL" --output-format csv >"$TMP/half.$piece.csv"
				done
				read -r half_rps half_p50 half_p99 half_bad < <(python3 - "$DURATION" "$TMP"/half.*.csv <<'PY'
import csv, sys
rows = [r for p in sys.argv[2:] for r in csv.DictReader(open(p))]
lat = sorted(float(r["request-duration"]) * 1e3 for r in rows)
q = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] if lat else 0
bad = sum(r["status"] != "202" for r in rows)
print(f"{len(rows) / float(sys.argv[1]):.0f} {q(.5):.3f} {q(.99):.3f} {bad}")
PY
				)
			else
				per_conn="$(awk -v r="$rps" -v c="$c" 'BEGIN { q = r / 2 / c; printf "%.1f", (q < 1 ? 1 : q) }')"
				lat="$("${LOAD_PIN[@]}" hey -z "${DURATION}s" -c "$c" -q "$per_conn" -m POST -T application/json "${signed[@]}" -d "$BODY" "$URL")"
				half_p50="$(awk '/ 50% in/ { printf "%.3f", $3 * 1000 }' <<<"$lat")"
				half_p99="$(awk '/ 99% in/ { printf "%.3f", $3 * 1000 }' <<<"$lat")"
				half_rps="$(awk '/Requests\/sec/ { printf "%.0f", $2 }' <<<"$lat")"
				half_bad="$(awk '/^[ \t]+\[[0-9]+\]/ && $1 != "[202]" { n += $2 } END { print n + 0 }' <<<"$lat")"
			fi
			extra="$extra half_rps=$half_rps half_p50_ms=$half_p50 half_p99_ms=$half_p99 half_non202=$half_bad"
			[[ "$variant" == switchyard || "$variant" == nats ]] && wait_drained >/dev/null
		fi
		stop_server
		echo "$run $line$extra" | tee -a "$RESULTS"
	done
done

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "== summary (rps = requests/s; latency in ms; ratio = rps / bare rps at the same connection count)"
awk '
function field(name,   i, kv) {
	for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == name) return kv[2] }
	return ""
}
{
	split($1, parts, "-c"); variant = parts[1]; c = parts[2]
	rps[variant, c] = field("rps"); p50[variant, c] = field("p50_us"); p99[variant, c] = field("p99_us")
	bad[variant, c] = field("non202") + field("errors"); drain[variant, c] = field("drain_s")
	if (field("half_rps") != "") half[variant, c] = sprintf("%7s req/s: p50 %6s ms, p99 %6s ms, %s not 202", field("half_rps"), field("half_p50_ms"), field("half_p99_ms"), field("half_non202"))
	if (!(c in seen)) { seen[c] = 1; order[++n] = c }
	if (!(variant in vseen)) { vseen[variant] = 1; vorder[++m] = variant }
}
END {
	printf "%-12s %6s %10s %9s %9s %8s %8s %8s\n", "server", "conns", "req/s", "p50 ms", "p99 ms", "ratio", "failed", "drain s"
	for (i = 1; i <= n; i++) {
		c = order[i]
		for (j = 1; j <= m; j++) {
			v = vorder[j]
			if (!((v, c) in rps)) continue
			ratio = (("bare", c) in rps && rps["bare", c] > 0) ? sprintf("%.2f", rps[v, c] / rps["bare", c]) : "-"
			printf "%-12s %6s %10.0f %9.2f %9.2f %8s %8d %8s\n", v, c, rps[v, c], p50[v, c] / 1000, p99[v, c] / 1000, ratio, bad[v, c], (drain[v, c] == "" ? "-" : drain[v, c])
		}
	}
	print ""
	print "== latency of the 202 at half of each server own rate (oha or hey; the bare row shows the tool own share)"
	for (i = 1; i <= n; i++) {
		c = order[i]
		for (j = 1; j <= m; j++) {
			v = vorder[j]
			if ((v, c) in half) printf "%-12s %6s conns: %s\n", v, c, half[v, c]
		}
	}
}' "$RESULTS"
