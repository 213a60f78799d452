-- wrk script: POST /v1/usage, one record per request, a unique idempotency key on every request.
-- Usage: wrk -t2 -c32 -d10s -s bench/single.lua URL -- KEY_PREFIX
-- Prints one JSON line (requests/s, p50/p99 in ms, errors) at the end.
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = (args[1] or "k") .. "-" .. tid .. "-"
  counter = 0
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function request()
  counter = counter + 1
  local body = '{"resource":"11111111-1111-4111-8111-111111111111","dimension":"api_calls","quantity":1,"id":"'
    .. prefix .. counter .. '"}'
  return wrk.format(nil, "/v1/usage", nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"rps":%.1f,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"errors":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    e.connect + e.read + e.write + e.status + e.timeout))
end
