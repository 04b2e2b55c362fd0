-- wrk script: send `depth` GET requests for the URL's path in one write (HTTP pipelining, the
-- shape of TechEmpower's plaintext test). wrk counts every response, so requests/s is responses/s.
--
--   wrk -t1 -c256 -d10s -s benches/pipeline.lua http://127.0.0.1:8080/plaintext -- 16
--
-- `shardnet bench --mode http --wrk -d 16` embeds this file and runs wrk the same way.
init = function(args)
  local depth = tonumber(args[1]) or 1
  local r = {}
  for i = 1, depth do
    r[i] = wrk.format()
  end
  req = table.concat(r)
end

request = function()
  return req
end
