-- wrk script: POST /v1/usage with a JSON array of N records (default 1000), each with a unique idempotency key.
-- Usage: wrk -t1 -c4 -d10s -s bench/batch.lua URL -- KEY_PREFIX [N]
-- Prints one JSON line (requests/s, records/s, p50/p99 in ms, errors) at the end.
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = (args[1] or "b") .. "-" .. tid .. "-"
  n = tonumber(args[2] or "1000")
  counter = 0
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local head = '{"resource":"11111111-1111-4111-8111-111111111111","dimension":"api_calls","quantity":1,"id":"'

function request()
  local parts = {}
  for i = 1, n do
    counter = counter + 1
    parts[i] = head .. prefix .. counter .. '"}'
  end
  return wrk.format(nil, "/v1/usage", nil, "[" .. table.concat(parts, ",") .. "]")
end

function done(summary, latency, requests)
  local e = summary.errors
  local n = tonumber(threads[1]:get("n"))
  local secs = summary.duration / 1e6
  io.write(string.format(
    '{"requests":%d,"records":%d,"seconds":%.3f,"rps":%.2f,"records_per_s":%.0f,"p50_ms":%.3f,"p99_ms":%.3f,"errors":%d}\n',
    summary.requests, summary.requests * n, secs, summary.requests / secs, summary.requests * n / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.status + e.timeout))
end
