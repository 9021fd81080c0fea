"""The cluster's user ID -> device key bindings (first key wins, until a recovery or the operator moves it)
and admission tickets, in Redis, and the one CURVE key every broker behind the cluster's address presents.

An ID's devices are one msgpack value in the hash ``{p2p}:devices`` (``[ver, [[id, key, name, flags,
added_ms, gen, proof], ...]]``, written and read by the scripts with Redis's cmsgpack; a device stored before
link proofs has no ``gen`` and ``proof``); ``{p2p}:ver`` keeps each ID's
last list version across a release, so a device number is never used twice for an ID. Bindings of the
one-key-per-ID layout (the hash ``{p2p}:keys``) become device 1 at version 1 when a registry opens.

Every change of a binding after it was made goes, in the script that makes it, to the ``key_audit``
stream: the durable audit record, and the feed from which every broker learns of it (``changes``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgpack
import redis

from p2pchat.broker.backends.audit import AuditRecord, Change, RecoveryState
from p2pchat.broker.backends.redis_health import REDIS_ERRORS, unavailable_on_error
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.backends.tickets import KeyLimits, TicketBook
from p2pchat.broker.core.ports import CHANGES_POLL, BindingChange, Device, DeviceList
from p2pchat.common.crypto import KEY_BYTES, Identity
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import MAX_DEVICES

log = logging.getLogger(__name__)


def shared_broker_identity(r: redis.Redis, keys: RedisKeys, local: Path) -> Identity:
    """All brokers behind one address present one CURVE key (clients pin it): the first broker to
    start stores its key in Redis (an existing ``broker.key`` is kept), the others use that one.
    The cluster's key is also kept in ``local``, so a broker starting while Redis is down (degraded)
    presents it too."""
    candidate = Identity.load_or_create(local)
    try:
        r.set(keys.broker_key, candidate.private_bytes(), nx=True)
        raw = r.get(keys.broker_key)
    except REDIS_ERRORS as exc:
        log.warning("redis unreachable at start (%s): presenting the broker key kept in %s", exc, local)
        return candidate
    if raw is None or len(raw) != KEY_BYTES:
        raise RuntimeError(f"{keys.broker_key} in Redis is not a {KEY_BYTES}-byte key")
    shared = Identity.from_private_bytes(raw)
    if raw != candidate.private_bytes():
        shared.save(local)
    return shared


class RedisKeyRegistry:
    """User ID -> key, first key wins, shared by every broker; tickets shared too (a client may ask one
    broker's key service and land on another's ROUTER). Positive answers cached; the ZAP thread asks
    Redis only on a miss, on its own connection with a short timeout, and refuses when Redis is away.
    A cached key that another broker or the operator moved away is forgotten when ``changes`` reads the
    audit stream (at most ``CHANGES_POLL`` later); a refusal is checked against Redis first."""

    # Shared by the scripts: KEYS[1] devices, KEYS[2] key_ids, KEYS[6] ver (ARGV[1] the user).
    _DEVICES = """
    local function is_device(raw, key)
      for _, d in ipairs(cmsgpack.unpack(raw)[2]) do if d[2] == key then return true end end
      return false
    end
    local function uncount(raw)  -- the ZAP handler lets these keys in for one ID less
      if not raw then return end
      for _, d in ipairs(cmsgpack.unpack(raw)[2]) do
        if redis.call('HINCRBY', KEYS[2], d[2], -1) <= 0 then redis.call('HDEL', KEYS[2], d[2]) end
      end
    end
    local function only_device(key, now_ms)  -- the next list version, with ``key`` its only device
      local ver = redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
      redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack({ver, {{ver, key, '', 0, tonumber(now_ms)}}}))
      redis.call('HINCRBY', KEYS[2], key, 1)
    end
    """
    # Atomic bind with the per-key and global caps: 0 bound, 1 taken, 2 too many IDs for the key, 3 full.
    # A binding keeps the first recovery key it gets (ARGV[5], empty for none).
    _BIND = _DEVICES + """
    local bound = redis.call('HGET', KEYS[1], ARGV[1])
    if bound then
      if not is_device(bound, ARGV[2]) then return 1 end
      redis.call('HSETNX', KEYS[2], ARGV[2], 1)  -- bound before IDs were counted: admitted by ZAP from now on
      if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[5]) end
      return 0
    end
    if tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') >= tonumber(ARGV[3]) then return 2 end
    if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 3 end
    only_device(ARGV[2], ARGV[6])
    if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[5]) else redis.call('HDEL', KEYS[3], ARGV[1]) end
    return 0
    """
    _VERDICTS = (None, ErrorCode.ID_TAKEN, ErrorCode.TOO_MANY_IDS, ErrorCode.REGISTRY_FULL)
    # Atomic move (ARGV[2] a key) or release (ARGV[2] empty), if still at generation ARGV[3] (empty: any), with
    # its audit record: {0, generation} done (or nothing to do), {1} moved meanwhile, {2} not bound, {3} too many IDs.
    _MOVE = _DEVICES + """
    local user, new = ARGV[1], ARGV[2]
    local raw = redis.call('HGET', KEYS[1], user)
    local old = raw and cmsgpack.unpack(raw)[2][1][2]  -- the primary's key, for the audit
    local gen = tonumber(redis.call('HGET', KEYS[4], user) or '0')
    if ARGV[3] ~= '' and ((not old) or gen ~= tonumber(ARGV[3])) then return {1} end
    if new == '' and not old then return {2} end
    if new ~= '' then
      if raw and #cmsgpack.unpack(raw)[2] == 1 and old == new then return {0, gen} end
      if not (raw and is_device(raw, new)) and tonumber(redis.call('HGET', KEYS[2], new) or '0') >= tonumber(ARGV[4])
      then return {3} end
    end
    uncount(raw)
    if new == '' then redis.call('HDEL', KEYS[1], user) else only_device(new, ARGV[7]) end
    if ARGV[5] ~= 'recovered' then redis.call('HDEL', KEYS[3], user) end  -- the ID's next holder registers their own
    gen = gen + 1
    redis.call('HSET', KEYS[4], user, gen)
    local fields = {'at_ms', ARGV[7], 'user', user, 'change', ARGV[5], 'generation', gen, 'origin', ARGV[6]}
    if old then table.insert(fields, 'old_key'); table.insert(fields, old) end
    if new ~= '' then table.insert(fields, 'new_key'); table.insert(fields, new) end
    redis.call('XADD', KEYS[5], '*', unpack(fields))
    return {0, gen}
    """
    # Shared by the link and unlink scripts: the audit record of a device change (ARGV[1] the user), with the
    # binding's next generation. KEYS as _DEVICES names them.
    _DEVICE_CHANGE = """
    local function device_change(list, change, key, gen, now_ms, origin)
      list[1] = redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
      redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(list))
      redis.call('HSET', KEYS[4], ARGV[1], gen + 1)
      local old_or_new = change == 'linked' and 'new_key' or 'old_key'
      redis.call('XADD', KEYS[5], '*', 'at_ms', now_ms, 'user', ARGV[1], 'change', change, 'generation', gen + 1,
                 'origin', origin, old_or_new, key)
      return list[1]
    end
    """
    # Atomic link: ARGV user, key, generation, proof, name, now_ms, origin, MAX_DEVICES, ids_per_key.
    # 0 linked (or a device already), 1 not bound / no recovery key / generation moved, 2 too many devices, 3 too
    # many IDs for the key.
    _LINK = _DEVICE_CHANGE + """
    local raw = redis.call('HGET', KEYS[1], ARGV[1])
    if not raw then return 1 end
    local list = cmsgpack.unpack(raw)
    for _, d in ipairs(list[2]) do if d[2] == ARGV[2] then return 0 end end
    local gen = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
    if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 or gen ~= tonumber(ARGV[3]) then return 1 end
    if #list[2] >= tonumber(ARGV[8]) then return 2 end
    if tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') >= tonumber(ARGV[9]) then return 3 end
    local ver = tonumber(redis.call('HGET', KEYS[6], ARGV[1]) or '0') + 1
    table.insert(list[2], {ver, ARGV[2], ARGV[5], 0, tonumber(ARGV[6]), gen, ARGV[4]})
    device_change(list, 'linked', ARGV[2], gen, ARGV[6], ARGV[7])
    redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
    return 0
    """
    _LINK_VERDICTS = (None, ErrorCode.RECOVERY_REFUSED, ErrorCode.TOO_MANY_DEVICES, ErrorCode.TOO_MANY_IDS)
    # Atomic unlink: ARGV user, key, generation (empty: any), now_ms, origin; KEYS[7] the key's ticket. 0 unlinked,
    # 1 not bound / generation moved, 2 not a device of it, 3 its last device.
    _UNLINK = _DEVICE_CHANGE + """
    local raw = redis.call('HGET', KEYS[1], ARGV[1])
    if not raw then return 1 end
    local gen = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
    if ARGV[3] ~= '' and gen ~= tonumber(ARGV[3]) then return 1 end
    local list = cmsgpack.unpack(raw)
    local found
    for i, d in ipairs(list[2]) do if d[2] == ARGV[2] then found = i end end
    if not found then return 2 end
    if #list[2] == 1 then return 3 end
    table.remove(list[2], found)
    device_change(list, 'unlinked', ARGV[2], gen, ARGV[4], ARGV[5])
    if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
    redis.call('DEL', KEYS[7])
    return 0
    """
    _UNLINK_VERDICTS = (None, ErrorCode.RECOVERY_REFUSED, ErrorCode.DEVICES_CHANGED, ErrorCode.LINK_FAILED)
    ZAP_TIMEOUT = 0.2  # seconds: ZAP requests are served one at a time
    CHANGES_PAGE = 256  # audit records read per poll

    # Flags ARGV[3] and, if it has none, name ARGV[4] on device ARGV[2] of user ARGV[1]; 1 if it exists.
    _DESCRIBE = """
    local raw = redis.call('HGET', KEYS[1], ARGV[1])
    if not raw then return 0 end
    local list = cmsgpack.unpack(raw)
    for _, d in ipairs(list[2]) do
      if d[1] == tonumber(ARGV[2]) then
        d[4] = bit.bor(d[4], tonumber(ARGV[3]))
        if d[3] == '' then d[3] = ARGV[4] end
        redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack(list))
        return 1
      end
    end
    return 0
    """
    # One page of one-key-per-ID bindings becomes device 1 at version 1 each. KEYS: devices, the legacy hash,
    # ver; ARGV: now_ms, then user, key pairs.
    _MIGRATE = """
    for i = 2, #ARGV, 2 do
      if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
        redis.call('HSET', KEYS[1], ARGV[i], cmsgpack.pack({1, {{1, ARGV[i + 1], '', 0, tonumber(ARGV[1])}}}))
        if tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or '0') < 1 then redis.call('HSET', KEYS[3], ARGV[i], 1) end
      end
      redis.call('HDEL', KEYS[2], ARGV[i])
    end
    """
    MIGRATE_PAGE = 500  # legacy bindings per script call: Redis serves others between pages

    def __init__(self, r: redis.Redis, keys: RedisKeys, limits: KeyLimits = KeyLimits()) -> None:
        self._r, self._hash, self._ids, self._keys = r, keys.devices, keys.key_ids, keys
        # The scripts' KEYS, in the order _DEVICES names them.
        self._binding = [keys.devices, keys.key_ids, keys.recovery, keys.generation, keys.key_audit, keys.ver]
        self.limits = limits
        self._cache: dict[str, DeviceList] = {}
        self._recoverable: set[str] = set()  # IDs seen with a recovery key in this run: no script at each register
        self._bound_keys: set[bytes] = set()
        self._tickets = TicketBook(limits)  # this broker's pending tickets: the cap is per broker
        self._bind = r.register_script(self._BIND)
        self._move = r.register_script(self._MOVE)
        self._describe = r.register_script(self._DESCRIBE)
        self._migrate_page = r.register_script(self._MIGRATE)
        self._link = r.register_script(self._LINK)
        self._unlink = r.register_script(self._UNLINK)
        self._audit_seen: str | None = None  # the last audit record read; None until Redis first answers
        self._next_poll = 0.0
        self._wrote = False
        self._catch_up()
        pool = r.connection_pool
        self._zap = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **{**pool.connection_kwargs, "socket_timeout": self.ZAP_TIMEOUT,
                                                       "socket_connect_timeout": self.ZAP_TIMEOUT}))

    def _migrate(self) -> None:
        """Bindings of the one-key-per-ID layout become device 1 at version 1, a page per script call."""
        legacy, moved, cursor = self._keys.keys, 0, 0
        while True:  # HSCAN returns every entry present throughout, though the script deletes as it goes
            cursor, page = self._r.hscan(legacy, cursor, count=self.MIGRATE_PAGE)
            if page:
                args: list = [int(time.time() * 1000)]
                for user, key in page.items():
                    args += [user, key]
                self._migrate_page(keys=[self._hash, legacy, self._keys.ver], args=args)
                moved += len(page)
            if cursor == 0:
                break
        if moved:
            log.info("%d key bindings migrated to devices (each is its ID's device 1)", moved)

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        bound = self.devices(user)
        if bound is not None and bound.find(key) is None:
            bound = self._refresh(user)  # moved to this key meanwhile, by another broker or the operator?
        if bound is not None:
            return None if bound.find(key) is not None else ErrorCode.ID_TAKEN
        with unavailable_on_error():  # Redis down: only IDs bound (and cached) before can register
            if int(self._r.hget(self._ids, key) or 0) >= self.limits.ids_per_key:
                return ErrorCode.TOO_MANY_IDS
            if self._r.hlen(self._hash) >= self.limits.bound_ids:
                return ErrorCode.REGISTRY_FULL
        return None

    def bind(self, user: str, key: bytes, recovery: bytes | None = None) -> ErrorCode | None:
        cached = self._cache.get(user)
        if cached is not None and cached.find(key) is not None and (recovery is None or user in self._recoverable):
            return None
        with unavailable_on_error():
            verdict = self._VERDICTS[int(self._bind(keys=self._binding, args=[
                user, key, self.limits.ids_per_key, self.limits.bound_ids, recovery or b"",
                int(time.time() * 1000)]))]
        if verdict is None:
            self._refresh(user)
            self._bound_keys.add(key)
            if recovery is not None:
                self._recoverable.add(user)
            log.info("user=%s bound", user)
        return verdict

    def lookup(self, user: str) -> bytes | None:
        devices = self.devices(user)
        return devices.primary.key if devices is not None else None

    def devices(self, user: str, fresh: bool = False) -> DeviceList | None:
        devices = None if fresh else self._cache.get(user)
        return devices if devices is not None else self._refresh(user)

    def describe_device(self, user: str, dev: int, flags: int, name: str | None) -> None:
        devices = self._cache.get(user)
        device = next((d for d in devices.devices if d.id == dev), None) if devices else None
        if device is not None and device.flags | flags == device.flags and (device.name or not name):
            return  # nothing new: no script at each register
        with unavailable_on_error():
            self._describe(keys=[self._hash], args=[user, dev, flags, name or ""])
        self._refresh(user)

    def _refresh(self, user: str) -> DeviceList | None:
        with unavailable_on_error():
            raw = self._r.hget(self._hash, user)
        if raw is None:
            self._cache.pop(user, None)
            return None
        devices = self._cache[user] = _device_list(raw)
        return devices

    def recovery_state(self, user: str) -> RecoveryState | None:
        """The recovery key and generation of ``user``'s binding; None if it is unbound."""
        pipe = self._r.pipeline()  # MULTI: the three as of one moment
        for name in (self._hash, self._keys.recovery, self._keys.generation):
            pipe.hget(name, user)
        with unavailable_on_error():
            devices, recovery, generation = pipe.execute()
        return None if not devices else RecoveryState(recovery or None, int(generation or 0))

    def move(self, user: str, key: bytes, change: Change, origin: str,
             generation: int | None = None) -> ErrorCode | None:
        """Bind ``user`` to ``key`` instead (if it is still at ``generation``, when given); why not, or None."""
        verdict = self._change(user, key, change, origin, generation)
        return (None, ErrorCode.RECOVERY_REFUSED, ErrorCode.RECOVERY_REFUSED, ErrorCode.TOO_MANY_IDS)[verdict]

    def release(self, user: str, origin: str) -> bool:
        """Unbind ``user`` (and forget its recovery key): the next key to register it gets it. False if unbound."""
        return self._change(user, b"", Change.RELEASED, origin, None) == 0

    def _change(self, user: str, key: bytes, change: Change, origin: str, generation: int | None) -> int:
        with unavailable_on_error():
            verdict = int(self._move(keys=self._binding, args=[
                user, key, "" if generation is None else generation, self.limits.ids_per_key, change.value, origin,
                int(time.time() * 1000)])[0])
        if verdict == 0:
            self._wrote = True
            self._forget(user, None)
        return verdict

    def link_device(self, user: str, key: bytes, generation: int, proof: bytes, origin: str,
                    name: str = "") -> ErrorCode | None:
        """Add ``key`` as a device of ``user`` with the account key's link ``proof`` (checked by the caller), if
        the binding is still at ``generation``; why not, or None (also when ``key`` is a device of it already)."""
        with unavailable_on_error():
            verdict = self._LINK_VERDICTS[int(self._link(keys=self._binding, args=[
                user, key, generation, proof, name, int(time.time() * 1000), origin, MAX_DEVICES,
                self.limits.ids_per_key]))]
        if verdict is None:
            self._wrote = True
            self._refresh(user)
            self._bound_keys.add(key)
        return verdict

    def unlink_device(self, user: str, key: bytes, generation: int | None, origin: str) -> ErrorCode | None:
        """Remove the device ``key`` of ``user`` (if the binding is still at ``generation``, when given); why
        not, or None. The last device is never removed (the operator releases an ID)."""
        with unavailable_on_error():
            verdict = self._UNLINK_VERDICTS[int(self._unlink(keys=[*self._binding, self._keys.ticket(key)], args=[
                user, key, "" if generation is None else generation, int(time.time() * 1000), origin]))]
        if verdict is None:
            self._wrote = True
            self._tickets.revoke(key)
            self._forget(user, key)  # at once here; other brokers when they read the audit
        return verdict

    def audit(self, user: str | None = None) -> list[AuditRecord]:
        """Every change recorded (of ``user`` only, if given), oldest first."""
        with unavailable_on_error():
            entries = self._r.xrange(self._keys.key_audit)
        records = [_record(entry_id, fields) for entry_id, fields in entries]
        return [r for r in records if user is None or r.user == user]

    def changes(self, now: float) -> list[BindingChange]:
        if not self._wrote and now < self._next_poll:
            return []
        self._next_poll, self._wrote = now + CHANGES_POLL, False
        if self._audit_seen is None:
            self._catch_up()
            return []
        try:
            read = self._r.xread({self._keys.key_audit: self._audit_seen}, count=self.CHANGES_PAGE)
        except REDIS_ERRORS:  # down: the upkeep says so; read on from here once it is back
            return []
        found: list[BindingChange] = []
        for _, entries in read:
            for entry_id, fields in entries:
                record = _record(entry_id, fields)
                self._audit_seen = record.seq
                self._forget(record.user, record.old_key)
                log.warning("binding changed: %s", record.describe())
                found.append(record.binding_change())
        if len(found) == self.CHANGES_PAGE:
            self._wrote = True  # more to read: at the next tick, not a poll later
        return found

    def _catch_up(self) -> None:
        """Start reading the audit stream at its end: changes before this broker started are in Redis already.
        First migrate bindings of the older layout (a broker that starts while Redis is down does so once Redis
        answers)."""
        try:
            self._migrate()
            last = self._r.xrevrange(self._keys.key_audit, count=1)
        except REDIS_ERRORS as exc:
            log.warning("cannot migrate key bindings or read the key audit stream yet: %s", exc)
            return
        self._audit_seen = last[0][0].decode() if last else "0-0"

    def _forget(self, user: str, old_key: bytes | None) -> None:
        """Drop what this broker cached of ``user``'s binding: the next lookup asks Redis."""
        cached = self._cache.pop(user, None)
        self._recoverable.discard(user)
        for key in ([d.key for d in cached.devices] if cached else []) + [old_key]:
            if key is not None:
                self._bound_keys.discard(key)  # the ZAP thread asks Redis again (the key may hold other IDs)

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        refused = self._tickets.issue(key, now)
        if refused is None:
            with unavailable_on_error():
                self._r.set(self._keys.ticket(key), b"1", px=int(self.limits.ticket_ttl * 1000))
        return refused

    def admits(self, key: bytes, now: float) -> bool:
        if key in self._bound_keys or self._tickets.holds(key, now):
            return True
        try:
            if self._zap.hexists(self._ids, key):
                self._bound_keys.add(key)
                return True
            return bool(self._zap.exists(self._keys.ticket(key)))
        except redis.RedisError as exc:
            log.warning("admission check failed, key refused: %s", exc)
            return False

    def close(self) -> None:
        self._zap.close()


def _device_list(raw: bytes) -> DeviceList:
    """An ID's devices as the scripts store them (cmsgpack writes every string as str: names are UTF-8)."""
    ver, devices = msgpack.unpackb(raw, raw=True)
    return DeviceList(ver, tuple(sorted((Device(i, key, name.decode(), flags, added_ms, *link)
                                         for i, key, name, flags, added_ms, *link in devices), key=lambda d: d.id)))


def _record(entry_id: bytes, fields: dict[bytes, bytes]) -> AuditRecord:
    return AuditRecord(entry_id.decode(), int(fields[b"at_ms"]), fields[b"user"].decode(),
                       Change(fields[b"change"].decode()), fields.get(b"old_key"), fields.get(b"new_key"),
                       int(fields[b"generation"]), fields[b"origin"].decode())
