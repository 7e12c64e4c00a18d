"""The Lua scripts, and the only code that names Redis keys.

Each tenant's slots are one sorted set: member ``run|epoch|job|token``, score
the time (ms, Redis's own clock) after which the slot is expired. Every script
reads the time with ``redis.call('TIME')`` so that replicas with skewed clocks
agree. ``ready`` marks a slot set rebuilt from PostgreSQL: after a restart or
flush it is missing, and nothing is granted until the reconciler rebuilt it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def slots(self, tenant_id: str) -> str:
        return f"{self.prefix}slots:{tenant_id}"

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

ACQUIRE = (
    """
-- Grant slots to members, in the order given, while the tenant is under its limit.
-- KEYS[1] the tenant's slot set; KEYS[2] the ready marker
-- ARGV[1] the tenant's limit; ARGV[2] slot lifetime (ms); ARGV[3..] members to grant
-- returns {free slots left, granted member...}; {-1} when the set is not rebuilt yet
"""
    + _NOW_MS
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local out = {0}
for i = 3, #ARGV do
  if free <= 0 then break end
  if redis.call('ZADD', KEYS[1], 'NX', now + tonumber(ARGV[2]), ARGV[i]) == 1 then
    free = free - 1
    out[#out + 1] = ARGV[i]
  end
end
if free < 0 then free = 0 end
out[1] = free
return out
"""
)

RELEASE = """
-- Free exactly these slots; any other member (another run's, another grant's) is untouched.
-- KEYS[1] the tenant's slot set
-- ARGV[1..] members
-- returns how many were removed (a member already gone counts 0: releasing twice is harmless)
local removed = 0
for i = 1, #ARGV do
  removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
end
return removed
"""

REFRESH = (
    """
-- Push back the expiry of every live slot of one run and lease epoch.
-- KEYS[1] the tenant's slot set
-- ARGV[1] slot lifetime (ms); ARGV[2] member prefix 'run|epoch|'
-- returns how many slots were refreshed (an expired or released slot is not revived)
"""
    + _NOW_MS
    + """
local n = 0
local prefix = ARGV[2]
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
for _, m in ipairs(members) do
  if string.sub(m, 1, #prefix) == prefix then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), m)
    n = n + 1
  end
end
return n
"""
)

RESTORE = (
    """
-- Add slots PostgreSQL says are held (jobs in progress) but the set lacks.
-- KEYS[1] the tenant's slot set
-- ARGV[1] slot lifetime (ms); ARGV[2..] members
-- returns how many were added; may take the set above the limit, since the jobs run already
"""
    + _NOW_MS
    + """
local added = 0
for i = 2, #ARGV do
  added = added + redis.call('ZADD', KEYS[1], 'NX', now + tonumber(ARGV[1]), ARGV[i])
end
return added
"""
)

REMOVE_ORPHANS = (
    """
-- Remove slots no job holds, if untouched for the grace period.
-- KEYS[1] the tenant's slot set
-- ARGV[1] slot lifetime (ms); ARGV[2] grace (ms); ARGV[3..] members
-- returns how many were removed. A slot refreshed or granted within the grace
-- period is kept: its AcquireJobs transaction may not have committed yet.
"""
    + _NOW_MS
    + """
local removed = 0
local ttl = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and (now - (tonumber(score) - ttl)) >= grace then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""
)

LIVE = (
    """
-- The live slots of one tenant (expired ones are dropped first).
-- KEYS[1] the tenant's slot set
-- returns the members
"""
    + _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""
)
