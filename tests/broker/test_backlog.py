"""The broker's send backlog, without sockets: order kept, budgets enforced, gone peers forgotten."""

from __future__ import annotations

from p2pchat.broker.shell.backlog import BacklogLimits, SendBacklog


def test_held_frames_go_out_in_order_once_the_pipe_takes_them():
    backlog, sent, room = SendBacklog(), [], [0]

    def send(conn, frames):
        if room[0] == 0:
            return False
        room[0] -= 1
        sent.append((conn, frames[0]))
        return True

    for i in range(5):
        assert backlog.hold(b"c", [b"%d" % i])
    backlog.flush(send)
    assert sent == [] and backlog.holds(b"c")
    room[0] = 3
    backlog.flush(send)
    assert sent == [(b"c", b"0"), (b"c", b"1"), (b"c", b"2")]
    room[0] = 10
    backlog.flush(send)
    assert [f for _, f in sent] == [b"0", b"1", b"2", b"3", b"4"]
    assert not backlog and backlog.total == 0


def test_a_peer_that_never_reads_is_held_only_up_to_its_budget():
    backlog = SendBacklog(BacklogLimits(frames_per_conn=3, bytes_per_conn=100, bytes_total=150))
    assert all(backlog.hold(b"deaf", [b"x" * 10]) for _ in range(3))
    assert not backlog.hold(b"deaf", [b"x"])  # frame budget
    assert not backlog.hold(b"big", [b"x" * 101])  # byte budget per connection
    assert backlog.hold(b"other", [b"x" * 100])
    assert not backlog.hold(b"third", [b"x" * 30])  # total budget: 30 + 100 held already
    assert backlog.total == 130


def test_a_gone_peer_is_forgotten_with_everything_it_held():
    backlog = SendBacklog()
    for _ in range(4):
        backlog.hold(b"gone", [b"abc"])
    backlog.flush(lambda conn, frames: None)
    assert not backlog.holds(b"gone") and backlog.total == 0
