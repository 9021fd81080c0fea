"""Cluster mode's key names in Redis, and how a location is written there."""

from __future__ import annotations

from dataclasses import dataclass

from p2pchat.broker.core.ports import Location


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key names. Everything the presence scripts touch shares the ``{p2p}`` hash tag (one Redis
    Cluster slot); per-user queues and per-broker inboxes are tagged by user and broker, so they
    spread over the slots."""

    prefix: str = "p2p"

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def __getattr__(self, name: str) -> str:  # epoch, seq, online, sessions, presence, brokers, known, devices, ver, key_ids,
        # broker_key, recovery, generation, key_audit; keys (the one-key-per-ID bindings, migrated to devices)
        if name.startswith("_"):
            raise AttributeError(name)
        return f"{self.tag}:{name}"

    def alive(self, broker: str) -> str:
        return f"{self.tag}:alive:{broker}"

    def broker_users(self, broker: str) -> str:
        return f"{self.tag}:bu:{broker}"

    def ticket(self, key: bytes) -> str:
        return f"{self.tag}:ticket:{key.hex()}"

    @property
    def pake_prefix(self) -> str:
        return f"{self.tag}:pake:"

    def pake_slot(self, slot: int) -> str:  # one link slot (redis_pake.py); pake_num and pake_exp index them
        return f"{self.pake_prefix}{slot}"

    def room(self, rid: bytes) -> str:  # a room as one msgpack value (redis_rooms.py); rname, rooms_ver index them
        return f"{self.tag}:room:{rid.hex()}"

    def room_seq(self, rid: bytes) -> str:  # a room's last message number
        return f"{self.tag}:rseq:{rid.hex()}"

    def room_marks(self, rid: bytes) -> str:  # its joined members' marks (rinvites: the invitations by age)
        return f"{self.tag}:rmarks:{rid.hex()}"

    def user_rooms(self, user: str, joined: bool) -> str:  # the rids a user has joined (set), or is invited to (zset)
        return f"{self.tag}:{'urooms' if joined else 'uinv'}:{user}"

    def inbox(self, broker: str) -> str:
        return f"{self.prefix}:inbox:{{{broker}}}"

    def queue(self, user: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:q:{{{user}}}"
        return base + ":h", base + ":z", base + ":n"

    def queue_meta(self, user: str) -> str:
        return f"{self.prefix}:q:{{{user}}}:m"


def format_location(where: Location) -> str:
    return f"{where.broker.hex()}/{where.conn.hex()}"


def parse_location(text: str | bytes) -> Location:
    if isinstance(text, bytes):
        text = text.decode()
    broker, conn = text.split("/")[:2]
    return Location(bytes.fromhex(broker), bytes.fromhex(conn))
