"""The codec, property-tested: every message round-trips, every malformed input is a ProtocolError.

Strategies are built from ``MESSAGE_TYPES`` and the field annotations, so a newly
registered message type is covered (or, if it brings a new field kind, this file
says which strategy to add).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from p2pchat.common import protocol as p
from p2pchat.common import protocol_rooms as pr
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.protocol import MAX_BODY_BYTES, MAX_CONSUME_REFS, MAX_HEADER_BYTES, MAX_INT, MAX_PARTS, MAX_PAYLOAD_BYTES, MAX_PEERS, MAX_TEXT_CHARS, MESSAGE_TYPES, MSG_ID_BYTES, PROTOCOL_VERSION, USER_ID_MAX, ChatMessage, Envelope, Heartbeat, Message, Snapshot, check_user_id, decode, encode, pack

ALL_TYPES = sorted(MESSAGE_TYPES.values(), key=lambda cls: cls.TYPE.value)
PAYLOAD_TYPES = [cls for cls in ALL_TYPES if cls.HAS_PAYLOAD]
PLAIN_TYPES = [cls for cls in ALL_TYPES if not cls.HAS_PAYLOAD]
HEADER_KEYS = ("v", "t", "id", "ts")
WIRE_NAMES = {"sender": "from", "recipient": "to"}  # the two fields renamed on the wire
USER_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def type_id(cls: type) -> str:
    return cls.TYPE.value


# --- valid values, per field kind ------------------------------------------------
user_ids = st.from_regex(p.USER_ID_RE, fullmatch=True)
msg_ids = st.binary(min_size=MSG_ID_BYTES, max_size=MSG_ID_BYTES)
timestamps = st.integers(0, MAX_INT)
small_payloads = st.binary(max_size=256)

VALID: dict[str, st.SearchStrategy] = {
    "UserId": user_ids,
    "MsgId": msg_ids,
    "Body": st.binary(max_size=512),
    "Token": st.binary(max_size=64),
    "Digest": st.binary(min_size=32, max_size=32),
    "PublicKey": st.binary(min_size=32, max_size=32),
    "SigningKey": st.binary(min_size=32, max_size=32),
    "Text": st.text(max_size=64) | st.just("é" * MAX_TEXT_CHARS),
    "Count": st.integers(0, MAX_INT),
    "Flag": st.booleans(),
    "UserList": st.lists(user_ids, max_size=20).map(tuple),
    "MsgIdList": st.lists(msg_ids, min_size=1, max_size=MAX_CONSUME_REFS).map(tuple),
    "DeviceName": st.text(max_size=p.DEVICE_NAME_CHARS),
}
devices = st.tuples(st.integers(0, MAX_INT), VALID["PublicKey"], VALID["DeviceName"], st.integers(0, MAX_INT))
VALID["DeviceList"] = st.lists(devices, min_size=1, max_size=p.MAX_DEVICES).map(tuple)
copies = st.tuples(st.integers(0, MAX_INT), VALID["Body"])
VALID["Copies"] = st.lists(copies, min_size=1, max_size=p.MAX_DEVICES, unique_by=lambda c: c[0]).map(tuple)
proofs = st.tuples(st.integers(0, MAX_INT), st.integers(0, MAX_INT), st.binary(min_size=64, max_size=64))
VALID["Proofs"] = st.lists(proofs, max_size=p.MAX_DEVICES).map(tuple)

# --- garbage: anything msgpack can carry ------------------------------------------
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def not_of_type(*types: type) -> st.SearchStrategy:
    # msgpack arrays come back as tuples, so a list is a tuple on the decoding side
    wire = {tuple if t in (list, tuple) else t for t in types}
    return msgpack_values.filter(lambda v: (tuple if type(v) is list else type(v)) not in wire)


def not_member(values: set[str]) -> st.SearchStrategy:
    return msgpack_values.filter(lambda v: not (type(v) is str and v in values))


bad_user_ids = st.one_of(
    not_of_type(str),
    st.just(""),
    st.text(USER_ID_CHARS, min_size=USER_ID_MAX + 1, max_size=USER_ID_MAX + 40)
    .filter(lambda s: s[0] not in "_.-"),  # too long (and otherwise valid)
    st.tuples(st.sampled_from("_.-"), st.text(USER_ID_CHARS, max_size=USER_ID_MAX - 1))
    .map("".join),  # bad leading character
    st.tuples(user_ids, st.characters(codec="utf-8").filter(lambda c: c not in USER_ID_CHARS), st.integers(0, 40))
    .map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2]:])  # one forbidden character anywhere
    .filter(lambda s: len(s) <= 64),
)

INVALID_MSG_ID = not_of_type(bytes) | st.binary(max_size=64).filter(lambda b: len(b) != MSG_ID_BYTES)
INVALID: dict[str, st.SearchStrategy] = {
    "UserId": bad_user_ids,
    "MsgId": INVALID_MSG_ID,
    "Body": not_of_type(bytes) | st.just(b"x" * (MAX_BODY_BYTES + 1)),
    "Token": not_of_type(bytes) | st.binary(min_size=65, max_size=200),
    "Digest": not_of_type(bytes) | st.binary(max_size=80).filter(lambda b: len(b) != 32),
    "PublicKey": not_of_type(bytes) | st.binary(max_size=80).filter(lambda b: len(b) != 32),
    "SigningKey": not_of_type(bytes) | st.binary(max_size=80).filter(lambda b: len(b) != 32),
    "Text": not_of_type(str) | st.integers(1, 50).map(lambda n: "é" * (MAX_TEXT_CHARS + n)),
    "Count": not_of_type(int) | st.integers(-(2**63), -1) | st.integers(MAX_INT + 1, 2**64 - 1),
    "Flag": not_of_type(bool),
    "UserList": not_of_type(list, tuple)
    | st.tuples(st.lists(user_ids, max_size=5), bad_user_ids, st.lists(user_ids, max_size=5))
    .map(lambda t: [*t[0], t[1], *t[2]]),
    "MsgIdList": not_of_type(list, tuple)
    | st.just(())  # empty: a consume of nothing more is sent without the field
    | st.lists(msg_ids, min_size=MAX_CONSUME_REFS + 1, max_size=MAX_CONSUME_REFS + 3)  # more than a page
    | st.tuples(st.lists(msg_ids, max_size=3), INVALID_MSG_ID, st.lists(msg_ids, max_size=3))
    .map(lambda t: [*t[0], t[1], *t[2]]),
    "DeviceName": not_of_type(str) | st.just("é" * (p.DEVICE_NAME_CHARS + 1)),
}
INVALID["DeviceList"] = (
    not_of_type(list, tuple)
    | st.just(())  # a bound ID has a device
    | st.lists(devices, min_size=p.MAX_DEVICES + 1, max_size=p.MAX_DEVICES + 2)
    | st.tuples(devices, st.sampled_from(range(4))).flatmap(  # one entry with one field of the wrong kind
        lambda t: INVALID[("Count", "PublicKey", "DeviceName", "Count")[t[1]]]
        .map(lambda bad: [[*t[0][:t[1]], bad, *t[0][t[1] + 1:]]]))
    | devices.map(lambda d: [list(d)[:3]])  # an entry short of a field
)
INVALID["Copies"] = (
    not_of_type(list, tuple)
    | st.just(())  # a message has at least one copy
    | st.lists(copies, min_size=p.MAX_DEVICES + 1, max_size=p.MAX_DEVICES + 2)
    | copies.map(lambda c: [list(c), list(c)])  # one device twice
    | copies.flatmap(lambda c: INVALID["Body"].map(lambda bad: [[c[0], bad]]))
    | copies.map(lambda c: [[c[0]]])  # an entry short of a field
)
rids = st.binary(min_size=pr.RID_BYTES, max_size=pr.RID_BYTES)
VALID.update({
    "RoomId": rids,
    "RoomName": user_ids,
    "Topic": st.text(max_size=40) | st.just("é" * pr.ROOM_TOPIC_CHARS),
    "InviteList": st.lists(user_ids, min_size=1, max_size=pr.MAX_INVITE_BATCH).map(tuple),
    "RoomMembers": st.lists(st.tuples(user_ids, st.integers(0, 2), st.integers(0, MAX_INT)), max_size=8).map(tuple),
    "RoomList": st.lists(st.tuples(rids, user_ids, st.integers(0, MAX_INT), st.integers(0, MAX_INT)),
                         max_size=8).map(tuple),
    "RoomMarks": st.lists(st.tuples(user_ids, st.integers(0, MAX_INT), st.integers(0, MAX_INT)), max_size=8).map(tuple),
})
INVALID.update({
    "RoomId": not_of_type(bytes) | st.binary(max_size=40).filter(lambda b: len(b) != pr.RID_BYTES),
    "RoomName": bad_user_ids,
    "Topic": not_of_type(str) | st.just("é" * (pr.ROOM_TOPIC_CHARS + 1)),
    "InviteList": INVALID["UserList"] | st.just(())
    | st.lists(user_ids, min_size=pr.MAX_INVITE_BATCH + 1, max_size=pr.MAX_INVITE_BATCH + 2),
    "RoomMembers": not_of_type(list, tuple) | user_ids.map(lambda u: [[u, 3, 0]]) | user_ids.map(lambda u: [[u, 0]])
    | bad_user_ids.map(lambda u: [[u, 0, 0]]),
    "RoomList": not_of_type(list, tuple) | user_ids.map(lambda u: [[b"short", u, 1, 0]])
    | rids.map(lambda r: [[r, "", 1, 0]]),
    "RoomMarks": not_of_type(list, tuple) | user_ids.map(lambda u: [[u, -1, 0]]) | user_ids.map(lambda u: [[u, 1]]),
})
INVALID["Proofs"] = (
    not_of_type(list, tuple)
    | st.lists(proofs, min_size=p.MAX_DEVICES + 1, max_size=p.MAX_DEVICES + 2)
    | proofs.map(lambda d: [[d[0], d[1], d[2][:63]]])  # a short signature
    | proofs.flatmap(lambda d: INVALID["Count"].map(lambda bad: [[bad, d[1], d[2]]]))
)


# --- deriving message strategies from the annotations -----------------------------
def field_kind(hint: Any) -> str:
    """The name of a field's kind ('Count', 'UserId', ...); fails loudly on one we have no strategy for."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `Kind | None`
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    for name in VALID:
        if getattr(p, name, None) == hint or getattr(pr, name, None) == hint:
            return name
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else None
    if isinstance(base, type) and issubclass(base, enum.Enum):  # any enum field: its members, nothing else
        name = f"enum:{base.__name__}"
        VALID.setdefault(name, st.sampled_from(base))
        INVALID.setdefault(name, not_member({m.value for m in base}))
        EXAMPLE.setdefault(name, next(iter(base)))
        return name
    raise AssertionError(f"no test strategy for field kind {hint!r}: add it to VALID, INVALID and EXAMPLE")


def fields_of(cls: type[Message]) -> list[tuple[str, str, str, bool]]:
    """(attr, wire name, kind, required) for each field of ``cls``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return [(f.name, WIRE_NAMES.get(f.name, f.name), field_kind(hints[f.name]), f.default is dataclasses.MISSING)
            for f in dataclasses.fields(cls)]


EXAMPLE = {"UserId": "alice", "MsgId": b"x" * 16, "Body": b"hi", "Token": b"tok", "Digest": b"d" * 32,
           "PublicKey": b"k" * 32, "SigningKey": b"s" * 32, "Text": "text", "Count": 1, "Flag": True, "UserList": ("alice",),
           "MsgIdList": (b"y" * 16,), "DeviceName": "laptop", "DeviceList": ((1, b"k" * 32, "laptop", 1),),
           "Copies": ((1, b"hi"),), "Proofs": ((2, 1, b"p" * 64),), "RoomId": b"r" * pr.RID_BYTES, "RoomName": "team",
           "Topic": "plans", "InviteList": ("bob",), "RoomMembers": (("alice", 2, 0),),
           "RoomList": ((b"r" * pr.RID_BYTES, "team", 1, 4),), "RoomMarks": (("alice", 1, 1),)}


def example_message(cls: type[Message], **fields: Any) -> Message:
    """A valid ``cls`` with the given fields and a plain example value in every other one."""
    return cls(**{attr: fields.get(attr, EXAMPLE[kind]) for attr, _, kind, _ in fields_of(cls)})


def messages(cls: type[Message]) -> st.SearchStrategy:
    kwargs = {}
    for attr, _, kind, required in fields_of(cls):
        kwargs[attr] = VALID[kind] if required else st.none() | VALID[kind]
    return st.builds(cls, **kwargs)


def envelopes(cls: type[Message]) -> st.SearchStrategy:
    payload = small_payloads if cls.HAS_PAYLOAD else st.none()
    return st.builds(Envelope, msg_ids, timestamps, messages(cls), payload)


any_envelope = st.sampled_from(ALL_TYPES).flatmap(envelopes)


def header_of(env: Envelope) -> dict:
    return msgpack.unpackb(encode(env)[0], raw=False)


def frames_for(header: Any, env: Envelope | None = None) -> list[bytes]:
    frames = [msgpack.packb(header, use_bin_type=True)]
    if env is not None and env.payload is not None:
        frames.append(env.payload)
    return frames


def ref_for(frames: list, msg_id: bytes) -> bytes | None:
    """The ref an error must carry: the id, unless msgpack's limits (PROTOCOL.md §2.2) refuse the header."""
    try:
        msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_str_len=MAX_BODY_BYTES,
                        max_bin_len=MAX_BODY_BYTES, max_array_len=MAX_PEERS, max_map_len=p.MAX_FIELDS,
                        max_ext_len=0)
    except Exception:
        return None
    return msg_id


def rejected(frames: list) -> ProtocolError:
    """Decode must fail, and only with a ProtocolError."""
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert isinstance(err.value.code, ErrorCode)
    return err.value


# --- round trips -------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL_TYPES, ids=type_id)
@FAST
@given(data=st.data())
def test_every_message_type_round_trips(cls, data):
    env = data.draw(envelopes(cls))
    frames = encode(env)
    assert len(frames) == (2 if cls.HAS_PAYLOAD else 1)
    assert decode(frames) == env


@pytest.mark.parametrize("cls", ALL_TYPES, ids=type_id)
@FAST
@given(data=st.data())
def test_header_carries_exactly_the_documented_keys(cls, data):
    env = data.draw(envelopes(cls))
    header = header_of(env)
    present = {wire for attr, wire, _, _ in fields_of(cls) if getattr(env.message, attr) is not None}
    assert set(header) == set(HEADER_KEYS) | present
    assert (header["v"], header["t"], header["id"], header["ts"]) == (
        PROTOCOL_VERSION, cls.TYPE.value, env.msg_id, env.ts)


def test_pack_gives_a_fresh_random_message_id():
    a, b = decode(pack(Heartbeat(), 0)), decode(pack(Heartbeat(), 0))
    assert len(a.msg_id) == MSG_ID_BYTES and a.msg_id != b.msg_id


# --- garbage is refused, and only with ProtocolError ------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_rejected(raw):
    rejected([raw])


@FAST
@given(msgpack_values.filter(lambda v: not isinstance(v, dict)))
def test_msgpack_that_is_not_a_map_is_rejected(value):
    rejected([msgpack.packb(value, use_bin_type=True)])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*HEADER_KEYS, "from", "to", "user", "body"]) | st.text(max_size=6)
                       | st.binary(max_size=6), msgpack_values, max_size=10))
def test_arbitrary_maps_never_raise_anything_but_protocol_error(header):
    try:
        env = decode(frames_for(header))
    except ProtocolError:
        return
    assert decode(encode(env)) == env  # anything accepted must be a well-formed message


@FAST
@given(st.integers(-(2**63), 2**64 - 1).filter(lambda n: n != PROTOCOL_VERSION)
       | st.text(max_size=3) | st.binary(max_size=3) | st.none(), any_envelope)
def test_unsupported_version_is_rejected_with_its_own_code(version, env):
    header = header_of(env)
    header["v"] = version
    error = rejected(frames_for(header, env))
    assert (error.code, error.ref) == (ErrorCode.UNSUPPORTED_VERSION, env.msg_id)


@pytest.mark.parametrize("version", [True, 1.0], ids=repr)
def test_version_must_be_the_integer_1(version):
    header = header_of(Envelope(b"i" * 16, 0, Heartbeat()))
    header["v"] = version
    assert rejected(frames_for(header)).code is ErrorCode.UNSUPPORTED_VERSION


@FAST
@given(any_envelope, not_member(set(MESSAGE_TYPES)))
def test_unknown_message_type_is_rejected(env, kind):
    header = header_of(env)
    header["t"] = kind
    frames = frames_for(header, env)
    assert rejected(frames).ref == ref_for(frames, env.msg_id)


@pytest.mark.parametrize("kind", [{}, {"a": 1}, ("register", {})], ids=repr)
def test_header_with_an_unhashable_type_field_is_a_protocol_error(kind):
    rejected([msgpack.packb({"v": PROTOCOL_VERSION, "t": kind}, use_bin_type=True)])


@FAST
@given(any_envelope, INVALID["MsgId"])
def test_bad_or_short_message_id_is_rejected(env, msg_id):
    header = header_of(env)
    header["id"] = msg_id
    assert rejected(frames_for(header, env)).ref is None  # no valid id to refer to


@FAST
@given(any_envelope, INVALID["Count"])
def test_bad_timestamp_is_rejected(env, ts):
    header = header_of(env)
    header["ts"] = ts
    frames = frames_for(header, env)
    assert rejected(frames).ref == ref_for(frames, env.msg_id)


@FAST
@given(any_envelope, st.data())
def test_missing_required_key_is_rejected(env, data):
    header = header_of(env)
    required = [*HEADER_KEYS, *(wire for _, wire, _, req in fields_of(type(env.message)) if req)]
    key = data.draw(st.sampled_from(required))
    del header[key]
    assert rejected(frames_for(header, env)).ref == (None if key == "id" else env.msg_id)


@FAST
@given(any_envelope, st.text(max_size=10) | st.binary(min_size=1, max_size=10), msgpack_values)
def test_unknown_extra_field_is_rejected(env, key, value):
    header = header_of(env)
    assume(key not in header)
    header[key] = value
    frames = frames_for(header, env)
    assert rejected(frames).ref == ref_for(frames, env.msg_id)


TYPES_WITH_FIELDS = [cls for cls in ALL_TYPES if dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", TYPES_WITH_FIELDS, ids=type_id)
@FAST
@given(data=st.data())
def test_every_field_rejects_wrong_types_and_out_of_range_values(cls, data):
    env = data.draw(envelopes(cls))
    _, wire, kind, _ = data.draw(st.sampled_from(fields_of(cls)))
    header = header_of(env)
    header[wire] = data.draw(INVALID[kind])
    frames = frames_for(header, env)
    assert rejected(frames).ref == ref_for(frames, env.msg_id)  # the error names the message it refuses


@pytest.mark.parametrize(
    "user",
    ["", "a" * (USER_ID_MAX + 1), ".alice", "-alice", "_alice", "al ice", "alice\n", "al/ice", "älice",
     "al\x00ice", b"alice", 7, None, ["alice"], True],
    ids=repr,
)
def test_invalid_user_ids_are_rejected(user):
    with pytest.raises(ProtocolError):
        check_user_id(user)
    header = header_of(Envelope(b"i" * 16, 0, ChatMessage("alice", "bob", b"hi")))
    header["from"] = user
    rejected(frames_for(header))


@given(user_ids)
def test_valid_user_ids_are_accepted(user):
    assert check_user_id(user) == user


def test_user_id_length_limit_is_enforced():
    assert check_user_id("a" * USER_ID_MAX)
    with pytest.raises(ProtocolError):
        check_user_id("a" * (USER_ID_MAX + 1))


# --- frames and limits ---------------------------------------------------------------
@pytest.mark.parametrize("count", [0, MAX_PARTS + 1, 10, 100])
def test_wrong_number_of_frames_is_rejected(count):
    frames = (pack(Heartbeat(), 0) * count)[:count]
    rejected(frames)


@pytest.mark.parametrize("count", [MAX_PARTS + 1, 10])
def test_too_many_frames_are_refused_with_the_headers_id_as_ref(count):
    """§3: the ref is set whenever the header decodes with a valid id, whatever else is wrong."""
    msg_id = p.new_msg_id()
    error = rejected([pack(Heartbeat(), 0, msg_id)[0]] * count)
    assert (error.code, error.ref) == (ErrorCode.BAD_FRAME, msg_id)


@pytest.mark.parametrize("cls", PLAIN_TYPES, ids=type_id)
@FAST
@given(data=st.data())
def test_payload_frame_on_a_type_without_payload_is_rejected(cls, data):
    frames = encode(data.draw(envelopes(cls)))
    rejected([*frames, data.draw(st.binary(max_size=64))])


@pytest.mark.parametrize("cls", PAYLOAD_TYPES, ids=type_id)
@FAST
@given(data=st.data())
def test_payload_type_without_its_payload_frame_is_rejected(cls, data):
    frames = encode(data.draw(envelopes(cls)))
    rejected(frames[:1])


@pytest.mark.parametrize("cls", PAYLOAD_TYPES, ids=type_id)
def test_payload_limit_is_enforced(cls):
    env = next_example(envelopes(cls))
    header = encode(env)[0]
    ok = decode([header, b"p" * MAX_PAYLOAD_BYTES])
    assert len(ok.payload) == MAX_PAYLOAD_BYTES
    assert rejected([header, b"p" * (MAX_PAYLOAD_BYTES + 1)]).code is ErrorCode.TOO_LARGE


def test_body_limit_is_enforced():
    ok = decode(pack(ChatMessage("alice", "bob", b"b" * MAX_BODY_BYTES), 0))
    assert len(ok.message.body) == MAX_BODY_BYTES
    header = header_of(ok)
    header["body"] = b"b" * (MAX_BODY_BYTES + 1)
    rejected(frames_for(header))


def test_text_limit_is_enforced():
    ok = decode(pack(p.Error(ErrorCode.TIMEOUT, "é" * MAX_TEXT_CHARS), 0))
    assert len(ok.message.message) == MAX_TEXT_CHARS
    header = header_of(ok)
    header["message"] = "é" * (MAX_TEXT_CHARS + 1)
    rejected(frames_for(header))


def test_peer_list_limit_is_enforced():
    peers = tuple(f"u{i:05d}" for i in range(MAX_PEERS))
    ok = decode(pack(Snapshot(b"e" * 8, 1, peers), 0))
    assert ok.message.peers == peers
    header = header_of(ok)
    header["peers"] = [*peers, "one-too-many"]
    rejected(frames_for(header))


def test_header_size_limit_is_enforced_with_too_large():
    assert rejected([b"\xc1" * MAX_HEADER_BYTES]).code is ErrorCode.BAD_FRAME
    assert rejected([b"\xc1" * (MAX_HEADER_BYTES + 1)]).code is ErrorCode.TOO_LARGE
    big = msgpack.packb({"v": 1, "t": "heartbeat", "id": b"i" * 16, "ts": 0,
                         "pad": b"x" * MAX_HEADER_BYTES}, use_bin_type=True)
    assert rejected([big]).code is ErrorCode.TOO_LARGE


def test_map_with_too_many_fields_is_rejected():
    header = header_of(Envelope(b"i" * 16, 0, Heartbeat()))
    header.update({f"k{i}": i for i in range(p.MAX_FIELDS)})
    rejected(frames_for(header))


def test_deeply_nested_msgpack_is_rejected_not_a_crash():
    rejected([b"\x91" * 100_000 + b"\xc0"])  # 100k nested one-element arrays
    rejected([b"\x81\xa1a" * 100_000 + b"\xc0"])  # 100k nested one-entry maps


def next_example(strategy: st.SearchStrategy) -> Any:
    """One value from a strategy, without hypothesis' example() warning."""
    box = []

    @settings(max_examples=1, database=None)
    @given(strategy)
    def grab(value):
        box.append(value)

    grab()
    return box[0]
