# Shared by the ingest benchmarks (ingest.sh, half-rate.sh): sourced, with
# REPO set to the checkout.

# A free loopback port.
free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The body every benchmark posts (host/benches/ingest.lua posts the same).
BODY='{"kind":"order.created","customer":"c-1042","order":"o-77812","total":129.5,"currency":"EUR","items":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}]}'

# Writes a config for the real server and prints its path.
write_config() {
	local dir="$1" port="$2" routes="$3" fsync="$4" verify="${5:-no}" nats_url="${6:-}"
	mkdir -p "$dir"
	cat >"$dir/rules.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
build_dir = "$REPO/target/test-plugins"
fsync = $fsync

[[sources]]
name = "shop"
type_pointer = "/kind"
subject_pointer = "/customer"
$([[ "$verify" == yes ]] && printf '%s\n' 'verify = { scheme = "standard-webhooks", secret_env = "SY_BENCH_SECRET", tolerance = "2h" }' 'dedup_pointer = "/no-such-field"')

[[plugins]]
name = "audit"
wasm = "$REPO/plugins/audit"
timeout = "500ms"
memory = "16MiB"
EOF
	if [[ -n "$nats_url" ]]; then
		printf '\n[engine]\nkind = "nats"\nurl = "%s"\n' "$nats_url" >>"$dir/rules.toml"
	fi
	if [[ "$routes" == yes ]]; then
		cat >>"$dir/rules.toml" <<EOF

[[routes]]
name = "audit-all"
to = ["audit"]
EOF
	fi
	echo "$dir/rules.toml"
}

# Exits unless every tool named is on the PATH.
require_tools() {
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null || {
			echo "$tool is not installed" >&2
			exit 1
		}
	done
}

# Sets TMP to a fresh temporary folder named after $1, and PID (the server
# under test, set by the caller) to none; on exit the server is stopped and
# the folder removed.
use_tmp() {
	TMP="$(mktemp -d -t "switchyard-$1.XXXXXX")"
	PID=""
	trap stop_and_clean EXIT INT TERM
}
stop_and_clean() {
	[[ -n "$PID" ]] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
	rm -rf "$TMP"
}

# Waits until the server in PID answers a post of BODY to URL $1 with a 202;
# exits with the end of its log ($2) if it dies first or 120 s pass.
wait_for_202() {
	local _
	for _ in $(seq 1 600); do
		[[ "$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' --data "$BODY" "$1" || true)" == 202 ]] && return
		kill -0 "$PID" 2>/dev/null || {
			tail -n 20 "$2" >&2
			exit 1
		}
		sleep 0.2
	done
	echo "the server did not answer $1 with a 202 within 120 s; its log ends:" >&2
	tail -n 20 "$2" >&2
	exit 1
}
