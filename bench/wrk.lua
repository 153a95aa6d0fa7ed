-- wrk script shared by every path: method and body from the environment,
-- optional fencing headers, optional lock spreading, JSON summary at the end.
local method = os.getenv("WRK_METHOD") or "GET"
local body = nil
if method == "PUT" then body = string.rep("x", tonumber(os.getenv("WRK_BODY") or "1024")) end
local fence = os.getenv("WRK_FENCE")          -- "lock:token": send fencing headers ourselves
local spread = tonumber(os.getenv("WRK_LOCKS") or "0")  -- >0: path and lock per request over N locks
local seq = tonumber(os.getenv("WRK_SEQ") or "0") == 1  -- walk the locks in order instead of at random
local counter = tonumber(os.getenv("WRK_OFFSET") or "0")  -- where a sequential walk starts
local one_lock = tonumber(os.getenv("WRK_ONE_LOCK") or "0") == 1  -- spread paths, all under lock0
local close = tonumber(os.getenv("WRK_CLOSE") or "0") == 1  -- a new connection per request (wrk reconnects)

request = function()
  local headers = {}
  local path = wrk.path
  if spread > 0 then
    local i
    if seq then counter = counter + 1; i = counter % spread else i = math.random(0, spread - 1) end
    path = "/k/" .. i .. "/obj"
    headers["Fencing-Lock"] = one_lock and "lock0" or ("lock" .. i)
    headers["Fencing-Token"] = "1"
  elseif fence then
    local l, t = fence:match("([^:]+):(%d+)")
    headers["Fencing-Lock"] = l
    headers["Fencing-Token"] = t
  end
  if close then headers["Connection"] = "close" end
  return wrk.format(method, path, headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean))
end
