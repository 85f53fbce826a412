#!/usr/bin/env bash
# Resident memory of an idle `switchyard serve` with 1, 20 and 200 registered
# plugins, and what each plugin adds: (RSS(200) - RSS(1)) / 199.
#
# Every plugin is a copy of plugins/audit (release, wasm32-wasip2) under its
# own name, registered with `wasm = "<copy>.wasm"`; one route names the first.
# Two kinds of copies:
#
#   distinct    each copy carries a custom section with its name, so its bytes
#               and hash differ: compiled, cached and loaded as its own
#               component, as 200 different plugins would be
#   identical   byte-for-byte copies (one hash: one cache entry)
#
# For each count the server is started twice on the same data dir: the first
# start compiles the components into the cache; the second, the one measured,
# loads them from it (a restart, the usual case). It is measured once
# `/readyz` answers 200 and the RSS has been steady for a second: VmRSS from
# /proc/PID/status, with its RssAnon / RssFile split.
#
#   host/benches/idle-memory.sh              # build the release binary, measure
#   SKIP_BUILD=1 COUNTS="1 20 200" KINDS="distinct identical" host/benches/idle-memory.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
COUNTS="${COUNTS:-1 20 200}"
KINDS="${KINDS:-distinct identical}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
SWITCHYARD="$TARGET_DIR/release/switchyard"
PLUGIN_TARGET="$REPO/target/test-plugins"

if [[ -z "${SKIP_BUILD:-}" ]]; then
	echo "== building the release binary (cargo build --release -p switchyard --bin switchyard)"
	(cd "$REPO" && cargo build --release -p switchyard --bin switchyard)
fi
[[ -x "$SWITCHYARD" ]] || {
	echo "missing $SWITCHYARD (run without SKIP_BUILD)" >&2
	exit 1
}
echo "== building plugins/audit (wasm32-wasip2, release)"
cargo build --quiet --release --target wasm32-wasip2 \
	--manifest-path "$REPO/plugins/audit/Cargo.toml" --target-dir "$PLUGIN_TARGET"
AUDIT="$PLUGIN_TARGET/wasm32-wasip2/release/audit.wasm"

TMP="$(mktemp -d -t switchyard-idle.XXXXXX)"
SERVER_PID=""
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
}
cleanup() {
	stop_server
	rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Writes copy `i` of the audit component; `distinct` appends a custom section
# ("switchyard-bench-copy" = the copy's number), which changes the hash and
# nothing else (a custom section may follow the last section of a component).
write_copy() {
	local kind="$1" i="$2" out="$3"
	python3 - "$AUDIT" "$out" "$kind" "$i" <<'EOF'
import sys
src, out, kind, i = sys.argv[1:]
data = open(src, "rb").read()
def leb(n):
    b = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        if n:
            b.append(x | 0x80)
        else:
            b.append(x)
            return bytes(b)
if kind == "distinct":
    name = b"switchyard-bench-copy"
    payload = leb(len(name)) + name + str(i).encode()
    data += b"\x00" + leb(len(payload)) + payload
open(out, "wb").write(data)
EOF
}

write_config() {
	local dir="$1" port="$2" kind="$3" count="$4"
	mkdir -p "$dir/wasm"
	{
		cat <<EOF
[server]
listen = "127.0.0.1:$port"
data_dir = "$dir/data"

[[sources]]
name = "shop"
type_pointer = "/kind"

[[routes]]
name = "first"
to = ["p1"]
EOF
		for i in $(seq 1 "$count"); do
			write_copy "$kind" "$i" "$dir/wasm/p$i.wasm"
			printf '\n[[plugins]]\nname = "p%s"\nwasm = "%s"\n' "$i" "$dir/wasm/p$i.wasm"
		done
	} >"$dir/rules.toml"
}

rss_field() {
	awk -v f="$1:" '$1 == f { print $2 }' "/proc/$SERVER_PID/status"
}

# Starts the server on `dir`'s config and waits for /readyz; sets SERVER_PID.
start_server() {
	local dir="$1" port="$2" log="$3"
	"$SWITCHYARD" serve --config "$dir/rules.toml" >"$log" 2>&1 &
	SERVER_PID=$!
	for _ in $(seq 1 3000); do
		if ! kill -0 "$SERVER_PID" 2>/dev/null; then
			echo "server exited; its log:" >&2
			tail -n 30 "$log" >&2
			exit 1
		fi
		[[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz" || true)" == 200 ]] && return 0
		sleep 0.1
	done
	echo "server not ready after 300 s" >&2
	exit 1
}

# Waits until VmRSS is the same twice, a second apart; prints
# "rss anon file pss" (KiB; Pss from smaps_rollup: shared pages divided
# among the processes, and mappings, that share them).
steady_rss() {
	local prev="" cur
	for _ in $(seq 1 30); do
		cur="$(rss_field VmRSS)"
		[[ "$cur" == "$prev" ]] && break
		prev="$cur"
		sleep 1
	done
	echo "$cur $(rss_field RssAnon) $(rss_field RssFile) $(awk '$1 == "Pss:" { print $2 }' "/proc/$SERVER_PID/smaps_rollup")"
}

echo "== $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== audit.wasm: $(stat -c %s "$AUDIT") bytes"
printf '| copies | plugins | VmRSS KiB | RssAnon KiB | RssFile KiB | Pss KiB | start (cache warm) s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n'
declare -A RSS ANON FILE
for kind in $KINDS; do
	for count in $COUNTS; do
		dir="$TMP/$kind-$count"
		port="$(free_port)"
		write_config "$dir" "$port" "$kind" "$count"
		# First start: compiles every component into the cache.
		start_server "$dir" "$port" "$dir/cold.log"
		stop_server
		# Second start: loads from the cache; measured.
		t0="$(date +%s.%N)"
		start_server "$dir" "$port" "$dir/warm.log"
		t1="$(date +%s.%N)"
		read -r rss anon file pss <<<"$(steady_rss)"
		stop_server
		RSS["$kind-$count"]="$rss"
		ANON["$kind-$count"]="$anon"
		FILE["$kind-$count"]="$file"
		printf '| %s | %s | %s | %s | %s | %s | %.2f |\n' "$kind" "$count" "$rss" "$anon" "$file" "$pss" "$(echo "$t1 - $t0" | bc)"
	done
done
echo
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
set -- $COUNTS
first="$1"
last="${!#}"
if [[ "$first" != "$last" ]]; then
	per() { echo $((($2 - $1) / (last - first))); }
	for kind in $KINDS; do
		k1="$kind-$first" k2="$kind-$last"
		echo "$kind: (VmRSS($last) - VmRSS($first)) / $((last - first)) = $(per "${RSS[$k1]}" "${RSS[$k2]}") KiB per plugin" \
			"(anonymous $(per "${ANON[$k1]}" "${ANON[$k2]}"), file-backed $(per "${FILE[$k1]}" "${FILE[$k2]}"))"
	done
fi
