#!/usr/bin/env bash
# How long a start takes, from exec to the first 200 of /healthz, on a data
# directory after load: a new one, after SIGKILL at full load (the stores'
# replays), and after a clean stop.
#
#   host/benches/startup.sh LABEL=PATH...
#   host/benches/startup.sh main=/tmp/sw-main wal=target/release/switchyard
#
# Needs wrk (Debian package), curl, python3.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=host/benches/lib.sh
source "$HERE/lib.sh"
(($# > 0)) || set -- "switchyard=${CARGO_TARGET_DIR:-$REPO/target}/release/switchyard"

# Milliseconds until /healthz answers 200 (at most 30 s).
ready() {
	local port="$1" t0
	t0=$(date +%s%N)
	for _ in $(seq 1 3000); do
		[[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz")" == 200 ]] && break
		sleep 0.01
	done
	echo "$((($(date +%s%N) - t0) / 1000000)) ms"
}

for spec in "$@"; do
	label="${spec%%=*}" bin="${spec#*=}"
	dir="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-startup.XXXXXX")"
	port="$(free_port)"
	cfg="$(write_config "$dir" "$port" no true)"
	"$bin" serve --config "$cfg" >"$dir/start-1.log" 2>&1 &
	pid=$!
	echo "$label: new data directory: $(ready "$port")"
	wrk -t2 -c64 -d8s -s "$HERE/ingest.lua" "http://127.0.0.1:$port/webhooks/shop" | grep -i 'requests/sec'
	kill -9 "$pid"
	wait "$pid" 2>/dev/null
	"$bin" serve --config "$cfg" >"$dir/start-2.log" 2>&1 &
	pid=$!
	echo "$label: after SIGKILL at full load: $(ready "$port")"
	sleep 1
	kill -INT "$pid"
	wait "$pid" 2>/dev/null
	"$bin" serve --config "$cfg" >"$dir/start-3.log" 2>&1 &
	pid=$!
	echo "$label: after a clean stop: $(ready "$port")"
	kill -INT "$pid"
	wait "$pid" 2>/dev/null
	rm -rf "$dir"
done
