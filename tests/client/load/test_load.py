"""The load tool: its scripted client (the library's session driven by a script) without sockets, its ledgers,
and short real runs against a broker.

The real runs start ``p2pchat load`` as a subprocess (it spawns its own worker
processes and, unless told ``--server``, its own broker) and check the JSON
report's counts, and that every process it started is gone when it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pchat.client.load.plan import BODY, ScriptPlan, peer_of
from p2pchat.client.load.script import CONNECT, Crowd, Disconnect, Phase, ScriptedClient
from p2pchat.client.load.stats import MergedStats, ProcessStats, SeqSet
from p2pchat.client.core.transfer import CHUNK_SIZE
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Ack, AckStatus, ChatMessage, Consume, Error, FileCancel, FileChunk, FileCredit, FileOffer, Heartbeat, Register, Registered, Unregister, decode, pack
from tests.conftest import ROOT, BrokerProcess, free_port_pair

MS = 1_000_000
S = 1_000_000_000
TAG = 0xC0FFEE
NAMES = [f"u{i}" for i in range(8)]


# --- the scripted client, sans I/O -------------------------------------------------
def make_client(index: int = 0, clients: int = 2, scratch: Path | None = None, **plan) -> ScriptedClient:
    """One client with a process's worth of shared state (its own stats) to itself."""
    plan.setdefault("peers", "pairs")
    crowd = Crowd(NAMES, ScriptPlan(run_tag=TAG, clients=clients, senders=clients, **plan), ProcessStats(),
                  wall_ms=lambda: 1_700_000_000_000, wall_time=lambda: 1_700_000_000.0, scratch=scratch)
    return ScriptedClient(index, crowd, bytes(32))


def stats(client: ScriptedClient) -> ProcessStats:
    return client.crowd.stats


def kinds(outputs: list) -> list:
    """Each output as its message class, or the Connect/Disconnect instruction itself."""
    return [type(decode(o).message) if type(o) is list else o for o in outputs]


def ready(client: ScriptedClient, now: int = 0, heartbeat_ms: int = 1000) -> None:
    client.start_at = now
    assert client.on_tick(now) == [CONNECT]
    client.on_connected(now)
    client.on_frames(pack(Registered(client.user, b"epoch", heartbeat_ms), 0), now + MS)
    assert client.phase is Phase.READY


def tick_until(client: ScriptedClient, done, limit: int = 20, alive: bool = False) -> tuple[int, list]:
    """Advance to each next deadline until ``done(outputs)``; (time, outputs of that tick).
    ``alive``: a broker answers the heartbeats, so the client never falls silent."""
    for _ in range(limit):
        now = client.next_deadline()
        outputs = client.on_tick(now)
        assert client.next_deadline() > now, "a deadline due with nothing done: the worker would spin"
        if done(outputs):
            return now, outputs
        if alive and Heartbeat in kinds(outputs):
            client.on_frames(pack(Heartbeat(), 0), now)
    raise AssertionError("never happened")


def message_from(sender: int, seq: int, sent_ns: int = 0, to: str = "u0") -> list[bytes]:
    return pack(ChatMessage(NAMES[sender], to, BODY.pack(TAG, sender, seq, sent_ns)), 0)


def test_client_connects_at_its_ramp_slot_and_registers_with_its_key():
    client = make_client()
    client.start_at = 5 * MS
    assert client.on_tick(4 * MS) == []
    assert client.next_deadline() == 5 * MS
    assert client.on_tick(5 * MS) == [CONNECT]
    [register] = client.on_connected(5 * MS)
    msg = decode(register).message
    assert type(msg) is Register and (msg.user, msg.key) == ("u0", bytes(32))
    assert client.phase is Phase.REGISTERING


def test_register_is_retried_at_20_ms_doubling_until_registered():
    client = make_client()
    client.start_at = 0
    client.on_tick(0)
    client.on_connected(0)
    sent_at = []
    now = 0
    while len(sent_at) < 3:
        now = client.next_deadline()
        if kinds(client.on_tick(now)) == [Register]:
            sent_at.append(now)
    assert [round(t / MS) for t in sent_at] == [20, 60, 140]


def test_registered_client_heartbeats_at_the_brokers_interval():
    client = make_client()
    ready(client, heartbeat_ms=5000)
    due = client.next_deadline()
    assert 5 * S <= due < 5 * S + MS
    assert kinds(client.on_tick(due)) == [Heartbeat]


def test_paced_sender_sends_on_schedule_and_the_ack_enters_the_ledger():
    client = make_client(rate=10)
    ready(client)
    client.start_sending(0)
    sent = []
    for _ in range(3):
        now = client.next_deadline()
        sent += [decode(o) for o in client.on_tick(now) if type(o) is list]
    assert [type(e.message) for e in sent] == [ChatMessage] * 3
    assert [BODY.unpack_from(e.message.body)[2] for e in sent] == [0, 1, 2]
    assert all(e.message.recipient == "u1" for e in sent)
    assert client.on_frames(pack(Ack(sent[1].msg_id, AckStatus.STORED), 0), now) == []  # nothing due yet
    assert 1 in stats(client).acked[0] and 0 not in stats(client).acked[0]
    assert stats(client).counters["acked"] == 1 and len(client.outstanding) == 2


def test_flood_keeps_the_window_full():
    client = make_client(flood=True, window=4)
    ready(client)
    first = client.start_sending(0)
    assert kinds(first) == [ChatMessage] * 4
    more = client.on_frames(pack(Ack(decode(first[0]).msg_id, AckStatus.STORED), 0), 2 * MS)
    assert kinds(more) == [ChatMessage] and len(client.outstanding) == 4


def test_receiver_consumes_everything_and_counts_duplicates_and_reordering():
    client = make_client()
    ready(client)
    frames = [message_from(1, 0), message_from(1, 2), message_from(1, 1), message_from(1, 2)]
    assert [client.on_frames(f, 10 * MS) for f in frames] == [[]] * 4  # consumed at the end of the batch
    [consume] = [decode(o).message for o in client.end_batch(10 * MS)]
    assert type(consume) is Consume
    assert [consume.ref, *consume.refs] == [decode(f).msg_id for f in frames]  # the duplicate too: the broker's
    counters = stats(client).counters
    assert (counters["received"], counters["duplicated"], counters["out_of_order"]) == (3, 1, 1)
    assert stats(client).latency.get_total_count() == 3


def test_a_message_from_another_run_is_consumed_and_reported():
    client = make_client()
    ready(client)
    foreign = pack(ChatMessage("u1", "u0", BODY.pack(TAG + 1, 1, 0, 0)), 0)
    assert client.on_frames(foreign, 0) == [] and kinds(client.end_batch(0)) == [Consume]
    assert stats(client).errors["foreign_message"] == 1 and stats(client).counters["received"] == 0


def test_not_registered_sends_a_ready_client_back_to_register_and_it_resends_what_is_unacked():
    client = make_client(flood=True, window=2)
    ready(client)
    ids = [decode(o).msg_id for o in client.start_sending(0)]
    assert kinds(client.on_frames(pack(Error(ErrorCode.NOT_REGISTERED, "register first"), 0), 5 * MS)) == [Register]
    again = client.on_frames(pack(Registered("u0", b"epoch2", 1000), 0), 6 * MS)
    assert [decode(o).msg_id for o in again] == ids  # same ids: the broker stores each once
    assert stats(client).counters["reconnects"] == 1


def test_a_silent_broker_makes_the_client_register_again():
    client = make_client()
    ready(client)
    client.on_tick(S)  # heartbeat
    client.on_tick(2 * S)
    assert kinds(client.on_tick(3 * S + 2 * MS)) == [Register]
    assert client.phase is Phase.REGISTERING and stats(client).counters["silences"] == 1


def test_graceful_churn_waits_for_acks_then_unregisters_and_comes_back():
    client = make_client(flood=True, window=1, churn_every=1.0, churn_down=0.5)
    ready(client)
    [msg] = client.start_sending(0)
    churn_at, outputs = tick_until(client, lambda _: client.phase is Phase.LEAVING)
    assert Unregister not in kinds(outputs)  # still waiting for the ACK
    out = client.on_frames(pack(Ack(decode(msg).msg_id, AckStatus.STORED), 0), churn_at + MS)
    assert kinds(out) == [Unregister, Disconnect(graceful=True)]
    assert client.phase is Phase.DOWN
    assert client.on_tick(churn_at + MS + 500 * MS) == [CONNECT]


def test_crash_churn_disconnects_without_unregistering():
    client = make_client(churn_every=1.0, churn_crash=True)
    ready(client)
    _, outputs = tick_until(client, lambda out: client.phase is Phase.DOWN)
    assert outputs == [Disconnect(graceful=False)]


def test_a_client_refused_at_its_first_register_counts_the_error_and_stops():
    client = make_client()
    client.start_at = 0
    client.on_tick(0)
    client.on_connected(0)
    assert client.on_frames(pack(Error(ErrorCode.ID_TAKEN, "taken"), 0), MS) == []
    assert client.phase is Phase.CLOSED and stats(client).errors["id_taken"] == 1
    assert client.next_deadline() > 10 * S  # nothing left to do: the worker must not spin on it


def test_refused_message_is_failed_not_outstanding():
    client = make_client(flood=True, window=1, count=1)
    ready(client)
    [msg] = client.start_sending(0)
    client.on_frames(pack(Error(ErrorCode.QUEUE_FULL, "full", decode(msg).msg_id), 0), MS)
    assert not client.outstanding and stats(client).counters["failed"] == 1
    assert stats(client).errors["queue_full"] == 1


def test_inject_drop_counts_the_message_sent_and_acked_but_never_sends_it():
    client = make_client(flood=True, window=10, count=3, inject_drop=1)
    ready(client)
    sent = [BODY.unpack_from(decode(o).message.body)[2] for o in client.start_sending(0)]
    assert sent == [0, 2]
    assert stats(client).sent[0] == 3 and 1 in stats(client).acked[0]


def test_inject_dup_sends_one_message_twice_under_two_ids():
    client = make_client(flood=True, window=10, count=2, inject_dup=0)
    ready(client)
    envs = [decode(o) for o in client.start_sending(0)]
    assert [BODY.unpack_from(e.message.body)[2] for e in envs] == [0, 0, 1]
    assert envs[0].msg_id != envs[1].msg_id and stats(client).sent[0] == 2


@pytest.mark.parametrize("mode", ["random", "ring", "pairs"])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_a_client_never_sends_to_itself(mode: str, n: int):
    import random

    plan = ScriptPlan(run_tag=0, clients=n, senders=n, peers=mode)
    rng = random.Random(1)
    for index in range(n):
        assert all(0 <= (p := peer_of(index, plan, rng)) < n and p != index for _ in range(50))


# --- ledgers and merging -----------------------------------------------------------------
@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=200))
def test_seqset_is_a_set_and_survives_packing(values: list[int]):
    seqs = SeqSet()
    new = [seqs.add(v) for v in values]
    assert new == [v not in values[:i] for i, v in enumerate(values)]
    again = SeqSet.unpack(seqs.pack())
    assert len(again) == len(set(values)) and all(v in again for v in values)


def test_lost_is_acked_but_received_nowhere_across_processes():
    sender, receiver_a, receiver_b = ProcessStats(), ProcessStats(), ProcessStats()
    sender.sent[7] = 5
    for seq in range(5):
        sender.record_acked(7, seq)
    receiver_a.record_received(7, 0)
    receiver_a.record_received(7, 3)
    receiver_b.record_received(7, 1)
    receiver_b.record_received(7, 4)
    merged = MergedStats.merge([sender.export(), receiver_a.export(), receiver_b.export()])
    assert (merged.sent, merged.acked, merged.received, merged.lost) == (5, 5, 4, 1)
    assert merged.lost_samples == [(7, 2)]


# --- real runs ------------------------------------------------------------------------------
def run_load(*args: str, timeout: float = 60.0) -> tuple[int, dict, str]:
    """``p2pchat load ... --json``; (exit code, report, stderr). Every process it started must be gone after."""
    cmd = [sys.executable, "-m", "p2pchat.client.cli", "load", "--json", "--quiet", "--seed", "7", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    me = psutil.Process(proc.pid)
    descendants: dict[int, psutil.Process] = {}
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                try:
                    descendants.update((p.pid, p) for p in me.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
                if timeout <= 0:
                    raise AssertionError(f"p2pchat load {' '.join(args)} did not finish in time")
                timeout -= 0.2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    gone, alive = psutil.wait_procs(list(descendants.values()), timeout=5)
    assert not alive, f"processes left behind: {alive}"
    assert descendants, "the load tool started no processes?"
    report = json.loads(out) if out.strip() else {}
    return proc.returncode, report, err


def assert_latency_sane(latency: dict) -> None:
    values = [latency[k] for k in ("p50", "p90", "p99", "p999", "max")]
    assert all(v is not None and v > 0 for v in values)
    assert values == sorted(values) and values[-1] < 10_000


def test_a_clean_run_receives_everything_it_sent_and_reports_the_documented_fields():
    code, report, err = run_load("--clients", "4", "--count", "25", "--rate", "50", "--processes", "2")
    assert code == 0, err
    for field in ("clients", "sent", "received", "lost", "duplicated", "out_of_order", "errors", "msgs_per_s",
                  "latency_ms"):
        assert field in report
    assert report["clients"] == 4 and report["processes"] == 2
    assert report["sent"] == report["acked"] == report["received"] == 100
    assert (report["lost"], report["duplicated"], report["out_of_order"], report["errors"]) == (0, 0, 0, 0)
    assert report["msgs_per_s"] > 0
    assert_latency_sane(report["latency_ms"])
    assert report["broker"]["spawned"] and report["broker"]["rss_registered_mib"] > 0
    assert report["verdict"]["pass"] and err.strip().startswith("VERDICT: PASS")


def test_a_message_acked_and_never_delivered_is_reported_lost():
    code, report, err = run_load("--clients", "3", "--count", "10", "--rate", "50", "--inject-drop", "4",
                                 "--drain", "1")
    assert code == 1
    assert (report["sent"], report["acked"], report["received"], report["lost"]) == (30, 30, 29, 1)
    assert report["lost_samples"] == [[0, 4]]
    assert "VERDICT: FAIL 1 acknowledged messages never arrived" in err


def test_a_message_delivered_twice_is_reported_duplicated():
    code, report, err = run_load("--clients", "3", "--count", "10", "--rate", "50", "--inject-dup", "2")
    assert code == 1
    assert report["sent"] == report["received"] == 30
    assert (report["duplicated"], report["lost"]) == (1, 0)
    assert "1 duplicates" in report["verdict"]["line"]


def test_loads_a_running_broker_over_curve_with_its_key_from_the_key_port(tmp_path: Path):
    broker = BrokerProcess(tmp_path / "broker-home", free_port_pair()).start()
    try:
        code, report, err = run_load("--server", f"127.0.0.1:{broker.port}", "--broker-pid", str(broker.proc.pid),
                                     "--clients", "6", "--count", "10", "--rate", "50", "--peers", "ring")
    finally:
        broker.stop()
    assert code == 0, err
    assert report["transport"] == "curve" and not report["broker"]["spawned"]
    assert report["sent"] == report["received"] == 60 and report["lost"] == 0
    assert report["broker"]["rss_baseline_mib"] > 0


def test_soak_with_churn_and_broker_restarts_loses_nothing_acknowledged():
    code, report, err = run_load("--soak", "--clients", "6", "--duration", "4", "--rate", "25",
                                 "--churn-every", "1", "--restart-every", "1.5", "--broker-heartbeat", "0.2",
                                 timeout=90)
    assert code == 0, err + json.dumps(report.get("failures"))
    assert report["broker"]["restarts"] >= 2 and report["reconnects"] > 0
    assert report["client_counters"]["churns"] > 0
    assert report["lost"] == 0 and report["received"] >= report["acked"] > 0
    assert err.strip().startswith("VERDICT: PASS")


def test_a_presence_change_reaches_every_subscriber():
    code, report, err = run_load("--clients", "5", "--rate", "0", "--duration", "0", "--subscribe", "--probes", "2",
                                 "--broker-heartbeat", "0.2")
    assert code == 0, err
    presence = report["presence"]
    assert presence["subscribers"] == 5 and presence["reached_all"]
    assert [c["online"] for c in presence["changes"]] == [True, False, True, False]
    assert 0 < presence["max_ms"] < 1000


def test_restarting_a_broker_the_tool_did_not_start_is_refused():
    result = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "load", "--server", "127.0.0.1:5555",
                             "--restart-every", "5"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--restart-every" in result.stderr


# --- file traffic ----------------------------------------------------------------------
FILE_SIZE = 2 * CHUNK_SIZE + 1000  # three chunks, the last a short one


def file_pair(scratch: Path, **plan) -> tuple[ScriptedClient, ScriptedClient]:
    """u0 sends files to u1 (pairs), both registered; only u0 is told to start sending."""
    plan = dict(rate=0, file_every=1.0, file_size=FILE_SIZE, **plan)
    a, b = make_client(0, scratch=scratch / "a", **plan), make_client(1, scratch=scratch / "b", **plan)
    ready(a)
    ready(b)
    a.start_sending(0)
    return a, b


def relay(outputs: list, to: ScriptedClient, now: int, keep=lambda msg: True) -> list:
    """Hand the frames one client sent to the other, as the broker would; the answers."""
    answers = []
    for frames in outputs:
        if type(frames) is list and keep(decode(frames).message):
            answers += to.on_frames(frames, now)
    return answers


def run_transfer(a: ScriptedClient, b: ScriptedClient, now: int, outputs: list, drop=lambda msg: False) -> int:
    """Shuttle frames both ways until both sides are quiet; the time it ended."""
    for _ in range(200):
        back = relay(outputs, b, now, keep=lambda m: not drop(m))
        outputs = relay(back, a, now)
        if not outputs and not back:
            return now
        now += MS
    raise AssertionError("the transfer never went quiet")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
    return tmp_path


def test_a_sender_offers_a_file_and_the_receiver_verifies_every_chunk(scratch: Path):
    a, b = file_pair(scratch)
    now, offer = tick_until(a, lambda out: FileOffer in kinds(out))
    run_transfer(a, b, now, offer)
    c = stats(a).counters  # one ProcessStats per client here
    assert (c["files_offered"], c["files_done"], c["files_open"]) == (1, 1, 0)
    assert stats(b).counters["files_received"] == 1 and stats(b).counters["file_bytes"] == FILE_SIZE
    assert stats(a).file_latency.get_total_count() == 1
    assert not stats(a).errors and not stats(b).errors
    assert a.files.next_offer_at > now  # the next one is scheduled
    assert not list((scratch / "b" / "u1" / "received").iterdir())  # verified, then deleted


def test_a_lost_chunk_is_asked_for_again_after_the_stall_timeout(scratch: Path):
    a, b = file_pair(scratch)
    now, offer = tick_until(a, lambda out: FileOffer in kinds(out))
    dropped = []

    def drop_chunk_1_once(msg) -> bool:
        if isinstance(msg, FileChunk) and msg.index == 1 and not dropped:
            dropped.append(msg.index)
            return True
        return False

    now = run_transfer(a, b, now, offer, drop=drop_chunk_1_once)
    assert dropped == [1] and stats(b).counters["files_received"] == 0
    later, recredit = tick_until(b, lambda out: FileCredit in kinds(out), alive=True)
    assert later - now >= 3 * S
    run_transfer(a, b, later, relay(recredit, a, later))
    assert stats(b).counters["files_received"] == 1 and stats(a).counters["files_done"] == 1


def test_a_file_with_other_data_is_an_error_not_a_good_file(scratch: Path):
    a, b = file_pair(scratch)
    now, offer = tick_until(a, lambda out: FileOffer in kinds(out))
    credit = relay(offer, b, now)
    chunks = relay(credit, a, now)
    first = decode(chunks[0])
    forged = bytes(len(first.payload))  # intact in transit (its CRC matches), but not the file offered
    msg = first.message
    chunks[0] = pack(FileChunk(msg.sender, msg.recipient, msg.xfer, 0, msg.final, zlib.crc32(forged)),
                     first.ts, first.msg_id, forged)
    answers = relay(chunks, b, now)
    assert FileCancel in kinds(answers)  # the whole file's SHA-256 did not match
    assert stats(b).errors["integrity"] == 1 and stats(b).counters["files_received"] == 0
    relay(answers, a, now)
    assert stats(a).errors["integrity"] == 1 and stats(a).counters["files_open"] == 0


def test_a_transfer_with_no_progress_times_out_and_the_next_is_offered(scratch: Path):
    a, b = file_pair(scratch)
    now, offer = tick_until(a, lambda out: FileOffer in kinds(out))
    credit = relay(offer, b, now)
    relay(credit, a, now)  # the credit arrives; every chunk sent on it is lost, and b is gone
    assert a.files.xfer is not None
    later, _ = tick_until(a, lambda out: stats(a).counters["files_timed_out"] == 1, limit=100, alive=True)
    assert later - now >= 30 * S and stats(a).counters["files_open"] == 0
    assert FileOffer in kinds(tick_until(a, lambda out: FileOffer in kinds(out), alive=True)[1])


def scratch_dirs() -> set[Path]:
    """The load workers' scratch directories (transfer state and received files) that exist now."""
    import tempfile

    return {p for d in (Path("/dev/shm"), Path(tempfile.gettempdir())) if d.is_dir()
            for p in d.glob("p2pchat-load-*-*")}


def test_file_traffic_through_a_real_broker_verifies_every_file():
    before = scratch_dirs()
    code, report, err = run_load("--clients", "4", "--duration", "2", "--rate", "5", "--files", "0.2",
                                 "--file-size", str(FILE_SIZE))
    assert code == 0, err
    assert scratch_dirs() <= before  # each worker removed its own
    files = report["files"]
    assert files["offered"] == files["done"] >= 4 and files["unfinished"] == 0
    assert files["bytes"] == files["done"] * FILE_SIZE and files["mib_s"] > 0
    assert files["transfer_ms"]["p50"] > 0 and report["errors"] == 0
    assert report["lost"] == 0 and report["received"] == report["sent"]
