//! The Lua scripts that change the shared scheduler state. Each runs atomically in Redis, so
//! two replicas never both claim an operation, a late result of a re-queued attempt is never
//! taken for the new one (the `fence`), and a merge never joins a completed operation.
//!
//! Every script takes the key prefix as `ARGV[1]` and builds its keys from it (standalone
//! and sentinel Redis; a cluster is refused at start). Time is Redis's own (`TIME`), so the
//! replicas' clocks do not have to agree. Keys under prefix `P`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `P op:ID` | hash | one operation (see [`super::OpFields`]) |
//! | `P queue` | sorted set | queued operation ids, by priority then enqueue time |
//! | `P pq:SHA` | sorted set | the same, for the operations whose platform (JSON) has SHA-1 `SHA` |
//! | `P platforms` | hash | SHA -> platform (JSON) of each `pq:` set; dropped when its set is empty |
//! | `P leases` | sorted set | executing operation ids, by lease expiry (ms) |
//! | `P action:KEY` | string | the live operation of a cacheable action (merging) |
//! | `P ops` | sorted set | every operation id, all at score 0 so that they sort by name (ListOperations); pruned of expired ones as listing and reaping pass them |
//! | `P prune` | string | where the last pruning pass of `ops` stopped |
//! | `P watched:ID` | string | present while a client follows the live operation (expires `client_action_timeout_s` after the last follower's read) |
//! | `P heard`, `P resumed` | string | when a replica's lease pass last ran, and when one last ran after a gap longer than a lease (an outage): no operation is dropped for want of a follower within `client_action_timeout_s` of that |
//! | `P replicas` | set | replica ids that recorded their workers |
//! | `P workers:REPLICA` | string | that replica's workers' properties (JSON), expiring 3 leases after its last record |
//! | `P replica:REPLICA` | string | that replica's summary for the cluster views (JSON: workers, slots, busy slots, claims held), expiring with its workers' record |
//! | `P events` | channel | an operation id when its stage changes; `queue` when work was queued |

/// `now` in milliseconds from Redis's clock.
const NOW: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
";

/// The queue: every queued id is in `queue` (the shared order) and in its platform's
/// `pq:SHA` (so a replica finds what its workers can run however deep it sits).
const QUEUE: &str = r"
local function qadd(P, id, score)
  redis.call('ZADD', P .. 'queue', score, id)
  local platform = redis.call('HGET', P .. 'op:' .. id, 'platform')
  if platform then
    local sha = redis.sha1hex(platform)
    redis.call('ZADD', P .. 'pq:' .. sha, score, id)
    redis.call('HSET', P .. 'platforms', sha, platform)
  end
end
local function qrem(P, id)
  redis.call('ZREM', P .. 'queue', id)
  local platform = redis.call('HGET', P .. 'op:' .. id, 'platform')
  if platform then
    redis.call('ZREM', P .. 'pq:' .. redis.sha1hex(platform), id)
  end
end
";

/// Ends an operation: the result or error fields, stage `completed`, out of the queue and
/// the leases, the merge key freed, expiry set, watchers told.
const FINISH: &str = r"
local function finish(P, id, fields, retain_ms)
  local k = P .. 'op:' .. id
  redis.call('HSET', k, 'state', 'completed', 'done_ms', now_ms(), unpack(fields))
  redis.call('HDEL', k, 'owner')
  qrem(P, id)
  redis.call('ZREM', P .. 'leases', id)
  local key = redis.call('HGET', k, 'key')
  if key and redis.call('GET', P .. 'action:' .. key) == id then
    redis.call('DEL', P .. 'action:' .. key)
  end
  if retain_ms > 0 then
    redis.call('PEXPIRE', k, retain_ms)
  end
  redis.call('DEL', P .. 'watched:' .. id)
  redis.call('PUBLISH', P .. 'events', id)
end
";

/// Puts an executing operation back in the queue, or past `max_job_retries` fails it.
const REQUEUE_FN: &str = r"
local function requeue(P, id, reason, max_retries, retain_ms)
  local k = P .. 'op:' .. id
  local retries = redis.pcall('HINCRBY', k, 'retries', 1)
  if type(retries) ~= 'number' then
    -- Not a number (written by something else): counted as out of retries.
    retries = max_retries + 1
    redis.call('HSET', k, 'retries', retries)
  end
  if retries > max_retries then
    finish(P, id, {'err_code', 14, 'err_msg', reason .. ' (attempt ' .. retries ..
      '; giving up after ' .. max_retries .. ' retries, max_job_retries)'}, retain_ms)
    return 2
  end
  redis.call('HSET', k, 'state', 'queued', 'last_error', reason, 'queued_ms', now_ms())
  redis.call('HDEL', k, 'owner', 'worker')
  redis.call('ZREM', P .. 'leases', id)
  -- A score that is not a number (written by something else) queues it first, rather than
  -- failing the script and with it every re-queue of the pass.
  qadd(P, id, tonumber(redis.call('HGET', k, 'score')) or 0)
  redis.call('PUBLISH', P .. 'events', id)
  redis.call('PUBLISH', P .. 'events', 'queue')
  return 1
end
";

/// ARGV: prefix, id, action key, cacheable ('1'/'0'), score, watch ms, then field/value pairs.
/// Returns the id of the operation the client follows: a live one of the same cacheable
/// action (merged; moved up the queue when this request is more urgent), or `id`.
const SUBMIT: &str = r"
local P, id, key, cacheable, score, watch = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1', ARGV[5], ARGV[6]
if cacheable then
  local live = redis.call('GET', P .. 'action:' .. key)
  if live then
    local state = redis.call('HGET', P .. 'op:' .. live, 'state')
    if state == 'queued' or state == 'executing' then
      if state == 'queued' then
        redis.call('ZADD', P .. 'queue', 'XX', 'LT', score, live)
        local platform = redis.call('HGET', P .. 'op:' .. live, 'platform')
        if platform then
          redis.call('ZADD', P .. 'pq:' .. redis.sha1hex(platform), 'XX', 'LT', score, live)
        end
      end
      redis.call('SET', P .. 'watched:' .. live, '1', 'PX', watch)
      return live
    end
  end
end
local k = P .. 'op:' .. id
redis.call('HSET', k, 'state', 'queued', 'retries', 0, 'fence', 0, 'key', key, 'score', score,
  'created_ms', now_ms(), 'queued_ms', now_ms(), unpack(ARGV, 7))
redis.call('SET', P .. 'watched:' .. id, '1', 'PX', watch)
qadd(P, id, score)
redis.call('ZADD', P .. 'ops', 0, id)
if cacheable then
  redis.call('SET', P .. 'action:' .. key, id)
end
redis.call('PUBLISH', P .. 'events', 'queue')
return id
";

/// The platform sets that have queued operations: SHA and platform (JSON), flat; all of
/// them, or a random sample of `max` when there are more (so that every set is looked at,
/// over passes). Drops the sets whose queue is empty.
const SETS_FN: &str = r"
local function queued_sets(P, max)
  local flat
  if redis.call('HLEN', P .. 'platforms') <= max then
    flat = redis.call('HGETALL', P .. 'platforms')
  else
    flat = redis.call('HRANDFIELD', P .. 'platforms', max, 'WITHVALUES')
  end
  local out = {}
  for i = 1, #flat, 2 do
    if redis.call('ZCARD', P .. 'pq:' .. flat[i]) == 0 then
      redis.call('HDEL', P .. 'platforms', flat[i])
    else
      out[#out + 1] = flat[i]
      out[#out + 1] = flat[i + 1]
    end
  end
  return out
end
";

/// ARGV: prefix, at most how many. [`SETS_FN`]'s sets.
const PLATFORMS: &str = r"
return queued_sets(ARGV[1], tonumber(ARGV[2]))
";

/// ARGV: prefix, count, at most how many sets, then platform SHAs. The length of the shared
/// queue, the queued platform sets ([`SETS_FN`]: how many entries, then SHA and platform,
/// flat), then the first `count` ids
/// of the shared queue and of each named platform's queue, each once: id, platform (JSON),
/// score, flat. Ids without an operation are dropped from the queue they were read from. One
/// call per claiming pass: the caller names the sets that fitted last time, and calls again
/// only when another set fits now and the shared queue's head did not hold all of it.
const PEEK: &str = r"
local P, n = ARGV[1], tonumber(ARGV[2])
local sets = queued_sets(P, tonumber(ARGV[3]))
local out = {tostring(redis.call('ZCARD', P .. 'queue')), tostring(#sets)}
for _, v in ipairs(sets) do
  out[#out + 1] = v
end
local seen = {}
local function take(key)
  local ids = redis.call('ZRANGE', key, 0, n - 1, 'WITHSCORES')
  for i = 1, #ids, 2 do
    local id = ids[i]
    if not seen[id] then
      local platform = redis.call('HGET', P .. 'op:' .. id, 'platform')
      if platform then
        seen[id] = true
        out[#out + 1] = id
        out[#out + 1] = platform
        out[#out + 1] = ids[i + 1]
      else
        redis.call('ZREM', key, id)
      end
    end
  end
end
take(P .. 'queue')
for i = 4, #ARGV do
  take(P .. 'pq:' .. ARGV[i])
end
return out
";

/// ARGV: prefix, id, replica, lease ms, then field names. Claims a queued operation for this
/// replica: returns its new fence followed by the fields' values, or an empty list when
/// another replica took it first (or it ended).
const CLAIM: &str = r"
local P, id, replica, lease = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local k = P .. 'op:' .. id
if redis.call('HGET', k, 'state') ~= 'queued' then
  qrem(P, id)
  return {}
end
local fence = redis.pcall('HINCRBY', k, 'fence', 1)
if type(fence) ~= 'number' then
  -- Not a number (written by something else): start the count again.
  fence = 1
  redis.call('HSET', k, 'fence', fence)
end
redis.call('HSET', k, 'state', 'executing', 'owner', replica, 'started_ms', now_ms())
qrem(P, id)
redis.call('ZADD', P .. 'leases', now_ms() + lease, id)
redis.call('PUBLISH', P .. 'events', id)
local out = {tostring(fence)}
for i = 5, #ARGV do
  out[#out + 1] = redis.call('HGET', k, ARGV[i]) or false
end
return out
";

/// ARGV: prefix, replica, lease ms, then id/fence pairs. Extends the leases this replica
/// still holds; returns the ids it no longer holds (re-queued, cancelled, completed).
const RENEW: &str = r"
local P, replica, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lost = {}
local until_ms = now_ms() + lease
for i = 4, #ARGV, 2 do
  local id, fence = ARGV[i], ARGV[i + 1]
  local v = redis.call('HMGET', P .. 'op:' .. id, 'state', 'owner', 'fence')
  if v[1] == 'executing' and v[2] == replica and v[3] == fence then
    redis.call('ZADD', P .. 'leases', 'XX', until_ms, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
";

/// ARGV: prefix, id, fence ('' for any live state, `queued` only while queued), retain ms,
/// then result field/value pairs.
/// Returns 1 when this ended the operation, 0 when it was no longer this attempt's (or had
/// ended), -1 when it does not exist.
const COMPLETE: &str = r"
local P, id, fence, retain = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local v = redis.call('HMGET', P .. 'op:' .. id, 'state', 'fence')
if not v[1] then
  return -1
end
if v[1] == 'completed' then
  return 0
end
if fence == 'queued' then
  if v[1] ~= 'queued' then
    return 0
  end
elseif fence ~= '' and (v[1] ~= 'executing' or v[2] ~= fence) then
  return 0
end
local fields = {}
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
finish(P, id, fields, retain)
return 1
";

/// ARGV: prefix, id, fence, reason, max retries, retain ms. The owner hands an operation
/// back (its attempt failed: worker lost, timed out, errored). 1 re-queued, 2 failed past
/// `max_job_retries`, 0 not this attempt's any more.
const REQUEUE: &str = r"
local P, id, fence = ARGV[1], ARGV[2], ARGV[3]
local v = redis.call('HMGET', P .. 'op:' .. id, 'state', 'fence')
if v[1] ~= 'executing' or v[2] ~= fence then
  return 0
end
return requeue(P, id, ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
";

/// ARGV: prefix, max retries, retain ms, lease ms, watch ms. Re-queues (or fails) every
/// executing operation whose lease has expired: its replica died, or lost Redis. Then passes
/// over the next 500 entries of the `ops` index (from where the last pass stopped): drops
/// those that have expired, and ends CANCELLED the live ones that no client follows any more
/// (`watched:` expired), except within `watch` after an outage: when no replica's pass came
/// for longer than a lease (Redis was down, or no replica reached it), the clients' marks
/// expired while they could not renew them, so they get a whole `client_action_timeout_s`
/// from the end of the outage to follow again. Returns how many it re-queued.
const REAP: &str = r"
local P, max_retries, retain = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, watch = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local heard = tonumber(redis.call('GET', P .. 'heard') or '')
redis.call('SET', P .. 'heard', now)
if heard and now - heard > lease then
  redis.call('SET', P .. 'resumed', now)
end
local may_drop = now - (tonumber(redis.call('GET', P .. 'resumed') or '') or 0) >= watch
local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now_ms(), 'LIMIT', 0, 100)
for _, id in ipairs(ids) do
  local k = P .. 'op:' .. id
  local v = redis.call('HMGET', k, 'state', 'owner')
  if v[1] == 'executing' then
    requeue(P, id, 'its scheduler replica ' .. (v[2] or '?') ..
      ' stopped renewing its lease (the replica died or lost Redis)', max_retries, retain)
  else
    redis.call('ZREM', P .. 'leases', id)
  end
end
local cursor = redis.call('GET', P .. 'prune') or ''
local from = '-'
if cursor ~= '' then from = '(' .. cursor end
local seen = redis.call('ZRANGE', P .. 'ops', from, '+', 'BYLEX', 'LIMIT', 0, 500)
for _, id in ipairs(seen) do
  local state = redis.call('HGET', P .. 'op:' .. id, 'state')
  if not state then
    redis.call('ZREM', P .. 'ops', id)
  elseif may_drop and state ~= 'completed' and redis.call('EXISTS', P .. 'watched:' .. id) == 0 then
    finish(P, id, {'err_code', 1, 'err_msg', 'no client followed the operation for ' ..
      'client_action_timeout_s: it was dropped'}, retain)
  end
end
if #seen < 500 then
  redis.call('SET', P .. 'prune', '')
else
  redis.call('SET', P .. 'prune', seen[#seen])
end
return #ids
";

/// ARGV: prefix, id, watch ms, then field names. A follower's read: the fields, and, while the
/// operation lives, its `watched:` mark renewed.
const WATCH: &str = r"
local P, id, watch = ARGV[1], ARGV[2], ARGV[3]
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local v = redis.call('HMGET', P .. 'op:' .. id, unpack(fields))
if v[1] == 'queued' or v[1] == 'executing' then
  redis.call('SET', P .. 'watched:' .. id, '1', 'PX', watch)
end
return v
";

/// ARGV: prefix, after (exclusive, '' for the start), count. Ids of existing operations in
/// name order after `after`; ids whose hash expired are dropped from the index on the way
/// (at most ten index pages are read per call).
const LIST: &str = r"
local P, after, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
local from = '-'
if after ~= '' then from = '(' .. after end
for round = 1, 10 do
  local ids = redis.call('ZRANGE', P .. 'ops', from, '+', 'BYLEX', 'LIMIT', 0, n)
  if #ids == 0 then
    break
  end
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', P .. 'op:' .. id) == 1 then
      out[#out + 1] = id
      if #out >= n then
        return out
      end
    else
      redis.call('ZREM', P .. 'ops', id)
    end
  end
  from = '(' .. ids[#ids]
end
return out
";

/// ARGV: prefix, grace ms, count, then platform SHAs ('' for the shared queue). Of the first
/// `count` operations of each of those queues, those that have waited at least `grace` since
/// they were (last) queued: id, platform, flat (an id may come twice).
const WAITING: &str = r"
local P, grace, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local now = now_ms()
for i = 4, #ARGV do
  local key = P .. 'queue'
  if ARGV[i] ~= '' then key = P .. 'pq:' .. ARGV[i] end
  for _, id in ipairs(redis.call('ZRANGE', key, 0, n - 1)) do
    local v = redis.call('HMGET', P .. 'op:' .. id, 'queued_ms', 'platform')
    local since = tonumber(v[1])
    if since and v[2] and now - since >= grace then
      out[#out + 1] = id
      out[#out + 1] = v[2]
    end
  end
end
return out
";

/// ARGV: prefix, replica, ttl ms, workers (JSON), summary (JSON, optional). Records this
/// replica's workers (each a list of its properties) and its summary until `ttl`; returns
/// every live replica's workers record.
const WORKERS: &str = r"
local P, replica, ttl, workers = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
redis.call('SET', P .. 'workers:' .. replica, workers, 'PX', ttl)
if ARGV[5] then
  redis.call('SET', P .. 'replica:' .. replica, ARGV[5], 'PX', ttl)
end
redis.call('SADD', P .. 'replicas', replica)
local out = {}
for _, r in ipairs(redis.call('SMEMBERS', P .. 'replicas')) do
  local w = redis.call('GET', P .. 'workers:' .. r)
  if w then
    out[#out + 1] = w
  else
    redis.call('SREM', P .. 'replicas', r)
  end
end
return out
";

/// ARGV: prefix. The cluster view: queued and executing counts (sizes of `queue` and
/// `leases`), then replica id and summary (JSON) of each live replica, at most 1,000, flat.
/// Reads no operation: its cost does not grow with the queue.
const CLUSTER: &str = r"
local P = ARGV[1]
local out = {tostring(redis.call('ZCARD', P .. 'queue')), tostring(redis.call('ZCARD', P .. 'leases'))}
local replicas = redis.call('SRANDMEMBER', P .. 'replicas', 1000)
table.sort(replicas)
for _, r in ipairs(replicas) do
  local summary = redis.call('GET', P .. 'replica:' .. r)
  if summary then
    out[#out + 1] = r
    out[#out + 1] = summary
  end
end
return out
";

fn with_helpers(body: &str) -> String {
    format!("{NOW}{QUEUE}{SETS_FN}{FINISH}{REQUEUE_FN}{body}")
}

/// One script: its text and SHA-1, run with EVALSHA and, when Redis does not have it yet (a
/// restart, a failover), with EVAL, which also loads it.
pub struct Lua {
    sha: String,
    text: String,
}

impl Lua {
    fn new(body: &str) -> Lua {
        let text = with_helpers(body);
        Lua {
            sha: cairn_core::DigestFunction::Sha1
                .digest_of(text.as_bytes())
                .hash_hex(),
            text,
        }
    }

    /// Runs the script with `args` (no keys: every key is built from the prefix).
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        args: &[Vec<u8>],
    ) -> Result<T, redis::RedisError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(0).arg(args);
        match cmd.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(&self.text).arg(0).arg(args);
                cmd.query_async(conn).await
            }
            other => other,
        }
    }
}

/// Every script of the shared state.
pub struct Scripts {
    pub submit: Lua,
    pub platforms: Lua,
    pub peek: Lua,
    pub claim: Lua,
    pub renew: Lua,
    pub complete: Lua,
    pub requeue: Lua,
    pub reap: Lua,
    pub list: Lua,
    pub waiting: Lua,
    pub workers: Lua,
    pub watch: Lua,
    pub cluster: Lua,
}

use cairn_store::redis_store::{redis, Conn};

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            submit: Lua::new(SUBMIT),
            platforms: Lua::new(PLATFORMS),
            peek: Lua::new(PEEK),
            claim: Lua::new(CLAIM),
            renew: Lua::new(RENEW),
            complete: Lua::new(COMPLETE),
            requeue: Lua::new(REQUEUE),
            reap: Lua::new(REAP),
            list: Lua::new(LIST),
            waiting: Lua::new(WAITING),
            workers: Lua::new(WORKERS),
            watch: Lua::new(WATCH),
            cluster: Lua::new(CLUSTER),
        }
    }
}
