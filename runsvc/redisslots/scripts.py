"""The Lua scripts, and the only code that names Redis keys.

Each tenant's slots are one sorted set: member ``run|epoch|job|token``, score
the time (ms, Redis's own clock) after which the slot is expired. Beside it a
hash keeps each member's grant time (ms, Redis's clock): when ACQUIRE granted
it or RESTORE put it back. The two answer different questions and must not be
folded into one: the score moves with every refresh (a lease holder's
heartbeats push back the expiry of all its run's slots, a slot that no job
holds included), while the grant time never moves, so only it can tell how
long a slot has gone without a job (see REMOVE_ORPHANS). Every script that
adds or drops a member does the same to its grant time, so the two stay in
step; the hash also expires on its own once every slot it could describe has.

Every script reads the time with ``redis.call('TIME')`` so that replicas with
skewed clocks agree. ``ready`` marks a slot set rebuilt from PostgreSQL: after
a restart or flush it is missing, and nothing is granted until the reconciler
rebuilt it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def slots(self, tenant_id: str) -> str:
        return f"{self.prefix}slots:{tenant_id}"

    def granted(self, tenant_id: str) -> str:
        # Outside ``slots_pattern``: the tenants are the slot sets, never their grant times.
        return f"{self.prefix}granted:{tenant_id}"

    @property
    def slots_pattern(self) -> str:
        return f"{self.prefix}slots:*"

    def tenant_of(self, key: str) -> str:
        return key[len(f"{self.prefix}slots:") :]

    @property
    def ready(self) -> str:
        return f"{self.prefix}ready"


_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Drop the expired members of the set SLOTS and their grant times in GRANTED.
_DROP_EXPIRED = """
local function drop_expired(slots, granted, now)
  local gone = redis.call('ZRANGEBYSCORE', slots, '-inf', now)
  for _, m in ipairs(gone) do
    redis.call('HDEL', granted, m)
  end
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
end
"""

# The grant times outlive no slot: after any write that gives a slot the
# lifetime TTL (ms from now), the hash lives at least that long too (never
# shortened), so it vanishes by itself only once every member it names has
# expired — even if the slot set was lost without it (an operator's DEL, an
# eviction), which no script could otherwise notice.
_KEEP_GRANTS = """
local function keep_grants(granted, ttl)
  local left = redis.call('PTTL', granted)
  if left ~= -2 and left < ttl then
    redis.call('PEXPIRE', granted, ttl)
  end
end
"""

ACQUIRE = (
    """
-- Grant slots to members, in the order given, while the tenant is under its limit.
-- A member already in the set names this very call (a slot's name holds its call's token):
-- an earlier try reserved it and may have died before its transaction. It is held again,
-- refreshed, and takes no other slot; otherwise a repeat would find its own reservations
-- in the way until the reconciler removed them.
-- KEYS[1] the tenant's slot set; KEYS[2] the ready marker; KEYS[3] the tenant's grant times
-- ARGV[1] the tenant's limit; ARGV[2] slot lifetime (ms); ARGV[3..] members to grant
-- returns {free slots left, n, n granted members..., members held again...};
-- {-1} when the set is not rebuilt yet
"""
    + _NOW_MS
    + _DROP_EXPIRED
    + _KEEP_GRANTS
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1}
end
drop_expired(KEYS[1], KEYS[3], now)
local ttl = tonumber(ARGV[2])
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local granted, again = {}, {}
for i = 3, #ARGV do
  local m = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], m) then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, m)
    again[#again + 1] = m
  elseif free > 0 and redis.call('ZADD', KEYS[1], 'NX', now + ttl, m) == 1 then
    redis.call('HSET', KEYS[3], m, now)
    free = free - 1
    granted[#granted + 1] = m
  end
end
if #granted + #again > 0 then
  keep_grants(KEYS[3], ttl)
end
if free < 0 then free = 0 end
local out = {free, #granted}
for _, m in ipairs(granted) do out[#out + 1] = m end
for _, m in ipairs(again) do out[#out + 1] = m end
return out
"""
)

RELEASE = """
-- Free exactly these slots; any other member (another run's, another grant's) is untouched.
-- KEYS[1] the tenant's slot set; KEYS[2] the tenant's grant times
-- ARGV[1..] members
-- returns how many were removed (a member already gone counts 0: releasing twice is harmless)
local removed = 0
for i = 1, #ARGV do
  removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return removed
"""

REFRESH = (
    """
-- Push back the expiry of every live slot of one run and lease epoch (never its grant time).
-- KEYS[1] the tenant's slot set; KEYS[2] the tenant's grant times
-- ARGV[1] slot lifetime (ms); ARGV[2] member prefix 'run|epoch|'
-- returns how many slots were refreshed (an expired or released slot is not revived)
"""
    + _NOW_MS
    + _KEEP_GRANTS
    + """
local n = 0
local ttl = tonumber(ARGV[1])
local prefix = ARGV[2]
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
for _, m in ipairs(members) do
  if string.sub(m, 1, #prefix) == prefix then
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, m)
    n = n + 1
  end
end
if n > 0 then
  keep_grants(KEYS[2], ttl)
end
return n
"""
)

RESTORE = (
    """
-- Add slots PostgreSQL says are held (jobs in progress) but the set lacks.
-- KEYS[1] the tenant's slot set; KEYS[2] the tenant's grant times
-- ARGV[1] slot lifetime (ms); ARGV[2..] members
-- returns how many were added; may take the set above the limit, since the jobs run already.
-- A member added is granted now; one already there keeps the grant time it has.
"""
    + _NOW_MS
    + _KEEP_GRANTS
    + """
local added = 0
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'NX', now + ttl, ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], now)
    added = added + 1
  end
end
if added > 0 then
  keep_grants(KEYS[2], ttl)
end
return added
"""
)

REMOVE_ORPHANS = (
    """
-- Remove slots no job holds, once granted longer ago than the grace period.
-- KEYS[1] the tenant's slot set; KEYS[2] the tenant's grant times
-- ARGV[1] slot lifetime (ms); ARGV[2] grace (ms); ARGV[3..] members
-- returns how many were removed. A slot granted within the grace period is kept:
-- its AcquireJobs transaction may not have committed yet. Age is counted from the
-- grant, never from the last refresh: the lease holder's heartbeats refresh every
-- slot of its run, so an orphan of a heartbeating run would otherwise never age.
-- A member without a grant time (written before grant times were kept, or whose
-- hash was lost) is aged by its last refresh, and that time is kept as its grant
-- time, so that later refreshes cannot keep it young either.
"""
    + _NOW_MS
    + _KEEP_GRANTS
    + """
local removed = 0
local ttl = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
for i = 3, #ARGV do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score then
    local granted = tonumber(redis.call('HGET', KEYS[2], m))
    if not granted then
      local expiry = math.floor(tonumber(score))
      granted = math.min(now, expiry - ttl)
      redis.call('HSET', KEYS[2], m, granted)
      keep_grants(KEYS[2], math.max(ttl, expiry - now))
    end
    if now - granted >= grace then
      removed = removed + redis.call('ZREM', KEYS[1], m)
      redis.call('HDEL', KEYS[2], m)
    end
  end
end
return removed
"""
)

LIVE = (
    """
-- The live slots of one tenant (expired ones are dropped first, with their grant times,
-- and so is any grant time whose member is gone).
-- KEYS[1] the tenant's slot set; KEYS[2] the tenant's grant times
-- returns the members
"""
    + _NOW_MS
    + _DROP_EXPIRED
    + """
drop_expired(KEYS[1], KEYS[2], now)
for _, m in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[1], m) then
    redis.call('HDEL', KEYS[2], m)
  end
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)
