import logging

from p2pchat.common.incidents import IncidentLog

log = logging.getLogger("test.incidents")


def lines(caplog):
    out = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return out


def test_first_incident_is_news_and_the_rest_of_the_period_one_counted_line(caplog):
    book = IncidentLog("bad frames", log, interval=10.0)
    with caplog.at_level(logging.WARNING):
        assert book.record(b"c1", "conn=c1", "too big", now=0.0)
        assert [book.record(b"c1", "conn=c1", f"reason {i}", now=1.0) for i in range(1000)] == [False] * 1000
        assert len(lines(caplog)) == 1
        book.flush(now=5.0)
        assert lines(caplog) == []  # the period has not ended
        book.flush(now=10.0)
        assert lines(caplog) == ["conn=c1 1000 more bad frames in 10s, the last: reason 999"]
        assert book.record(b"c1", "conn=c1", "again", now=11.0)  # a new period: news again


def test_keys_past_the_bound_share_one_count(caplog):
    book = IncidentLog("refusals", log, interval=1.0, max_keys=2)
    with caplog.at_level(logging.WARNING):
        assert book.record("a", "peer=a", "x", 0.0) and book.record("b", "peer=b", "x", 0.0)
        assert not any(book.record(f"k{i}", "peer=k", "x", 0.0) for i in range(50))
        book.flush(now=2.0)
        assert "50 more refusals past the 2 keys tracked" in lines(caplog)[-1]


def test_quiet_news_is_not_logged_and_forget_writes_the_count(caplog):
    book = IncidentLog("drops", log)
    with caplog.at_level(logging.WARNING):
        assert book.record(1, "conn=1", "x", 0.0, quiet=True)
        book.record(1, "conn=1", "y", 0.5)
        assert lines(caplog) == []
        book.forget(1)
        assert lines(caplog) == ["conn=1 1 more drops in 0s, the last: y"]
        assert book.record(1, "conn=1", "z", 0.6, quiet=True)
