#!/usr/bin/env bash
# CPU time a running server spends per request at full load: wrk (64
# connections, the body of host/benches/ingest.lua) against URL for SECS
# seconds, and the server's user + system time from /proc/PID/stat before and
# after, divided by the requests answered.
#
#   host/benches/cpu-per-request.sh PID URL [SECS]
#
# Compare servers (or builds) in alternation on the same machine: on two
# shared cores, the figures move by ±10 % between identical runs.
set -euo pipefail
pid="$1"
url="$2"
secs="${3:-8}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tick="$(getconf CLK_TCK)"
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
out="$(wrk -t2 -c64 -d"${secs}s" -s "$here/ingest.lua" "$url" | grep RESULT)"
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
n="$(sed 's/.*requests=\([0-9]*\).*/\1/' <<<"$out")"
rps="$(sed 's/.*rps=\([0-9]*\).*/\1/' <<<"$out")"
python3 -c "
u = ($u1 - $u0) / $tick; s = ($s1 - $s0) / $tick; n = $n
print(f'req/s={$rps} user_us/req={u / n * 1e6:.1f} sys_us/req={s / n * 1e6:.1f} '
      f'total_us/req={(u + s) / n * 1e6:.1f} server_cores={(u + s) / $secs:.2f}')"
