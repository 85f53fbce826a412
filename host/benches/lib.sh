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
