-- wrk script for host/benches/ingest.sh: POST one fixed JSON webhook body,
-- count non-202 answers, and print the figures the script parses.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"kind":"order.created","customer":"c-1042","order":"o-77812","total":129.5,' ..
  '"currency":"EUR","items":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}]}'

-- The `verified` variant: Standard Webhooks headers signed once by the script
-- (ingest.sh exports them).
if os.getenv("SW_SIG") then
  wrk.headers["webhook-id"] = os.getenv("SW_ID")
  wrk.headers["webhook-timestamp"] = os.getenv("SW_TS")
  wrk.headers["webhook-signature"] = os.getenv("SW_SIG")
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  not_accepted = 0
end

function response(status, headers, body)
  if status ~= 202 then
    not_accepted = not_accepted + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("not_accepted")
  end
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT requests=%d seconds=%.2f rps=%.0f p50_us=%d p90_us=%d p99_us=%d max_us=%d non202=%d errors=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    bad, summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout))
end
