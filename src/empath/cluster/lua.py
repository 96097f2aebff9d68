"""The Lua scripts that make the shared policy atomic in Redis (DESIGN §11).

Every script reads Redis's own clock (``TIME``), never a node's: nodes' clocks
may drift, Redis's is one.  Since Redis 5 scripts are replicated by effects, so
reading the time inside a script is allowed.  Keys:

* ``<prefix>rate:<domain>`` — a string, the GCRA *theoretical arrival time* of
  the domain's bucket in microseconds of Redis time;
* ``<prefix>conn:<domain>`` — a sorted set of connection leases, member
  ``<node>/<instance>/<n>``, score = expiry in ms of Redis time;
* ``<prefix>breakers`` — a hash, field = domain, value = JSON of a breaker that
  is not Closed (a Closed breaker has no field): ``s`` "open"|"half", ``u`` end
  of Open (ms), ``p`` the probe's token ("" = none), ``pu`` the end of the probe
  claim's lease (ms: ``lease_secs`` after the claim, renewed by the holder while its
  probe runs, so a dead holder's claim lapses within a lease), ``n`` probe successes
  so far;
* ``<prefix>bfail:<domain>`` — a sorted set of recent temporary failures
  (score = ms), while Closed;
* ``<prefix>wait:<domain>`` — set for 2 s when a node was refused a lease: the
  domain is *contended*, so holders give old leases back instead of reusing them.

GCRA (the generic cell rate algorithm) is a token bucket kept as one number:
with emission interval ``T = 1/rate`` and room for ``burst`` tokens, ``k``
tokens may be taken at ``now`` when ``max(tat, now) + k·T - now <= burst·T``;
taking them moves ``tat`` on by ``k·T``.  A fresh (or expired) key is a full
bucket.  Nodes take tokens in small batches (see ``empath.cluster.view``).
"""

from __future__ import annotations

from typing import Final

_NOW_US: Final = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
"""

# KEYS[1] rate key.  ARGV: interval_us, burst, want.
# Returns {granted, wait_us}: wait_us > 0 only when nothing was granted.
TAKE_TOKENS: Final = (
    _NOW_US
    + """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_us then tat = now_us end
local room = math.floor((now_us + burst * interval - tat) / interval + 1e-9)
local got = math.min(want, room)
if got <= 0 then
  return {0, math.max(1, math.ceil(tat + interval - burst * interval - now_us))}
end
tat = tat + got * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
           math.ceil((tat - now_us) / 1000) + 1000)
return {got, 0}
"""
)

# KEYS[1] conn key, KEYS[2] the domain's "someone waits" key.
# ARGV: max, ttl_ms, member1, member2, ...
# Adds as many of the members as fit under max; returns how many were added.  A
# refusal marks the domain contended for 2 s, so holders stop reusing old leases.
ACQUIRE_SLOTS: Final = (
    _NOW_US
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local ttl = tonumber(ARGV[2])
local added = 0
for i = 3, #ARGV do
  if added >= free then break end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  added = added + 1
end
if added > 0 then redis.call('PEXPIRE', KEYS[1], ttl * 2) end
if added < #ARGV - 2 then redis.call('SET', KEYS[2], '1', 'PX', 2000) end
return added
"""
)

# KEYS: conn keys.  ARGV: ttl_ms, then per key a count and that many members.
# Renews (re-adds after a Redis restart) every lease this node holds.
RENEW_SLOTS: Final = (
    _NOW_US
    + """
local ttl = tonumber(ARGV[1])
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[k], now + ttl, ARGV[i])
    i = i + 1
  end
  redis.call('PEXPIRE', KEYS[k], ttl * 2)
end
return 1
"""
)

# KEYS[1] breakers hash, KEYS[2] failures zset.
# ARGV: domain, member, threshold, window_ms, timeout_ms, probe token ("" = none).
# Returns {code, ms}: 1 tripped (Closed -> Open), 2 re-opened (Half-Open -> Open),
# 0 nothing changed.  ms: how long the breaker stays Open.
BREAKER_FAILURE: Final = (
    _NOW_US
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local timeout = tonumber(ARGV[5])
if raw then
  local st = cjson.decode(raw)
  if st.s == 'half' and ARGV[6] ~= '' and st.p == ARGV[6] then
    redis.call('HSET', KEYS[1], ARGV[1],
               cjson.encode({s='open', u=now + timeout, p='', pu=0, n=0}))
    return {2, timeout}
  end
  return {0, 0}
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[4])))
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], ARGV[1],
             cjson.encode({s='open', u=now + timeout, p='', pu=0, n=0}))
  return {1, timeout}
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) + 1000)
return {0, 0}
"""
)

# KEYS[1] breakers hash.  ARGV: domain, token, claim lease ms, own token prefix.
# Returns {code, ms, transitioned}: code 0 Closed (admit, no probe), 1 probe claimed,
# -1 Open for ms more, -2 another node's probe is out for ms more.  transitioned = 1
# when this call moved Open -> Half-Open.
CLAIM_PROBE: Final = (
    _NOW_US
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {0, 0, 0} end
local st = cjson.decode(raw)
local moved = 0
if st.s == 'open' then
  if now < st.u then return {-1, st.u - now, 0} end
  st.s = 'half'
  st.p = ''
  st.pu = 0
  st.n = 0
  moved = 1
end
local mine = string.sub(st.p, 1, #ARGV[4]) == ARGV[4]
if st.p ~= '' and now < st.pu and not mine then
  if moved == 1 then redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(st)) end
  return {-2, st.pu - now, moved}
end
st.p = ARGV[2]
st.pu = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(st))
return {1, 0, moved}
"""
)

# KEYS[1] breakers hash.  ARGV: lease ms, then domain, token pairs: the holder's live
# probe claims.  A claim still held by that token gets a new lease; others are left.
RENEW_PROBES: Final = (
    _NOW_US
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local st = cjson.decode(raw)
    if st.s == 'half' and st.p == ARGV[i + 1] then
      st.pu = now + lease
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(st))
    end
  end
end
return 0
"""
)

# KEYS[1] breakers hash, KEYS[2] failures zset.
# ARGV: domain, token, "success"|"release", success_threshold.
# Returns 1 when this call closed the breaker (Half-Open -> Closed), else 0.
PROBE_OUTCOME: Final = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local st = cjson.decode(raw)
if st.s ~= 'half' or st.p ~= ARGV[2] then return 0 end
st.p = ''
st.pu = 0
if ARGV[3] == 'success' then
  st.n = st.n + 1
  if st.n >= tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('DEL', KEYS[2])
    return 1
  end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(st))
return 0
"""

# KEYS[1] breakers hash, KEYS[2] failures zset.  ARGV: domain, "reset"|"probe".
# reset: the breaker is Closed now (field and failures gone).  probe: an Open breaker
# becomes Half-Open now with no probe out (the next node to claim one probes).
# Returns the state it was in: 'closed', 'open' or 'half'.
OPERATOR_BREAKER: Final = (
    _NOW_US
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == 'reset' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  if not raw then return 'closed' end
  return cjson.decode(raw).s
end
if not raw then return 'closed' end
local st = cjson.decode(raw)
if st.s == 'open' then
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({s='half', u=now, p='', pu=0, n=0}))
end
return st.s
"""
)

# KEYS[1] breakers hash, KEYS[2..] "someone waits" keys of the domains whose leases
# this node holds.  Returns {now_ms, flag per wait key (1 = contended), field1,
# value1, ...}.
READ_BREAKERS: Final = (
    _NOW_US
    + """
local out = {now}
for k = 2, #KEYS do out[#out + 1] = redis.call('EXISTS', KEYS[k]) end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
"""
)

# KEYS[1] nodes zset, KEYS[2] this node's hash.
# ARGV: node id, hash ttl_ms, live_ms, forget_ms, then field/value pairs.
# Returns {now_ms, live node count, instance of the previous heartbeat}.
HEARTBEAT: Final = (
    _NOW_US
    + """
local previous = redis.call('HGET', KEYS[2], 'instance') or ''
redis.call('HSET', KEYS[2], 'heartbeat_ms', now)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
local live = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[3]), '+inf')
return {now, live, previous}
"""
)
