"""The load run's report: one summary dict (the ``--json`` output), its human form, and the verdict.

Figures:

* ``sent``: distinct messages the senders sent (a re-send is not a new message);
  ``acked``: those the broker acknowledged (``stored``, or ``relayed`` without a
  store); ``received``: distinct ones that reached their recipient.
* ``lost``: acknowledged and never received by the end of the drain period.
  That is the failure a store-and-forward broker must never have. A message
  sent but never acknowledged is ``unacked``, not lost: its sender would retry.
* ``duplicated``: extra copies received; ``out_of_order``: a message from a
  sender arriving after a later one from the same sender (per recipient).
* ``latency_ms``: one-way, the sender's clock at send to the recipient's at
  receipt (CLOCK_MONOTONIC: same host), merged over all processes.
* ``files`` (with ``--files``): transfers offered, ``done`` (the receiver verified
  every byte and the sender heard so), the verified bytes and their rate over
  the sending and drain phases, and how the others ended: ``timed_out`` (no
  progress for 30 s), ``peer_gone`` (the broker said the peer was offline),
  ``unfinished`` (still going when the drain ended; a churned client's
  transfers resume when it is back, as the chat client's do). ``transfer_ms``:
  offer to FILE_DONE at the sender.
"""

from __future__ import annotations

import dataclasses
import os

from p2pchat.client.load.result import RunResult
from p2pchat.client.load.stats import MergedStats

MIB = 2**20
CLIENT_COUNTERS = ("failed", "acks_unmatched", "late_sends", "skipped_slots", "send_again",
                   "send_no_socket", "churns", "silences", "not_registered", "connects", "presence_frames",
                   "receipts_received", "injected_drop", "injected_dup")


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 2)


def _presence(result: RunResult, merged: MergedStats) -> dict | None:
    if not result.probes:
        return None
    changes, all_ms = [], []
    for probe in result.probes:
        key = f"{probe['user']}:{int(probe['online'])}"
        delays = sorted((t - probe["t0_ns"]) / 1e6 for t in merged.presence.get(key, []))
        all_ms += delays
        changes.append({"user": probe["user"], "online": probe["online"], "subscribers": probe["subscribers"],
                        "reached": len(delays), "max_ms": round(delays[-1], 3) if delays else None})
    all_ms.sort()

    def pct(p: float) -> float | None:
        return round(all_ms[min(len(all_ms) - 1, int(p / 100 * len(all_ms)))], 3) if all_ms else None

    everyone = all(c["reached"] >= c["subscribers"] for c in changes)
    worst = max((c["max_ms"] or 0.0) for c in changes)
    return {"changes": changes, "subscribers": max(c["subscribers"] for c in changes),
            "reached_all": everyone, "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": worst,
            "within_1s": everyone and worst < 1000.0}


def _broker(result: RunResult, received: int) -> dict:
    samples = result.samples
    out: dict = {"spawned": result.spawned, "restarts": result.restarts,
                 "restart_downtime_s": result.restart_downtime_s, "warnings_logged": result.broker_warnings,
                 "fd_limit": result.broker_fd_limit, "stop_s": result.broker_stop_s,
                 "exit_code": result.broker_exit_code}
    if not samples:
        return out
    per_client = per_client_end = None
    if result.rss_baseline is not None and result.rss_registered is not None and result.registered:
        per_client = round((result.rss_registered - result.rss_baseline) / result.registered / 1024, 2)
        if result.rss_send_end is not None:
            per_client_end = round((result.rss_send_end - result.rss_baseline) / result.registered / 1024, 2)
    out.update({
        "rss_baseline_mib": _mib(result.rss_baseline),
        "rss_registered_mib": _mib(result.rss_registered),
        "rss_per_client_kib": per_client,  # just registered
        "rss_per_client_end_kib": per_client_end,  # when sending stopped: libzmq's pipe queues grew meanwhile
        "rss_max_mib": _mib(max(s.rss for s in samples)),
        "rss_end_mib": _mib(result.rss_send_end if result.rss_send_end is not None else samples[-1].rss),
        "cpu_avg_pct": round(sum(s.cpu for s in samples[1:]) / max(1, len(samples) - 1), 1),
        "cpu_max_pct": max(s.cpu for s in samples),
        "fds_max": max(s.fds for s in samples),
        "cpu_send_phase_s": None if result.broker_cpu_send_s is None else round(result.broker_cpu_send_s, 3),
        "cpu_us_per_msg": (round(result.broker_cpu_send_s * 1e6 / received, 1)
                           if result.broker_cpu_send_s is not None and received else None),
        "main_thread_us_per_msg": (round(result.broker_main_thread_cpu_send_s * 1e6 / received, 1)
                                   if result.broker_main_thread_cpu_send_s is not None and received else None),
        "samples": [[s.t, round(s.rss / MIB, 2), s.cpu, s.fds] for s in samples],
        "samples_columns": ["t_s", "rss_mib", "cpu_pct", "fds"],
    })
    return out


def _files(result: RunResult, merged: MergedStats) -> dict | None:
    if not result.config.files:
        return None
    c = merged.counters
    t = result.timings
    seconds = t.get("send_s", 0.0) + t.get("drain_s", 0.0)
    return {"offered": c["files_offered"], "done": c["files_done"], "received": c["files_received"],
            "bytes": c["file_bytes"], "mib_s": round(c["file_bytes"] / MIB / seconds, 1) if seconds else 0.0,
            "timed_out": c["files_timed_out"], "peer_gone": c["files_peer_gone"], "unfinished": c["files_open"],
            "transfer_ms": merged.file_latency_ms()}


def verdict(summary: dict, result: RunResult) -> tuple[bool, list[str]]:
    """PASS unless something acknowledged was lost, the run broke, or something happened with no excuse."""
    config = result.config
    reasons = list(result.failures)
    if summary["lost"]:
        first = summary["lost_samples"][0] if summary["lost_samples"] else None
        where = f" (first: sender {first[0]} seq {first[1]})" if first else ""
        reasons.append(f"{summary['lost']} acknowledged messages never arrived{where}")
    if summary["errors"]:
        reasons.append(f"{summary['errors']} errors {summary['errors_by_code']}")
    excused = result.restarts > 0 or config.churn_crash  # a lost CONSUME means a redelivery: at-least-once
    if summary["duplicated"] and not excused:
        reasons.append(f"{summary['duplicated']} duplicates with no restart or crash to explain them")
    if summary["out_of_order"] and not excused:
        reasons.append(f"{summary['out_of_order']} messages out of order")
    if config.rate > 0 or config.flood:
        if summary["sent"] and not summary["received"]:
            reasons.append("nothing was received")
    if config.max_rss_growth_mib is not None and result.restarts == 0:
        broker = summary["broker"]
        if broker.get("rss_end_mib") is not None and broker.get("rss_registered_mib") is not None:
            growth = broker["rss_end_mib"] - broker["rss_registered_mib"]
            if growth > config.max_rss_growth_mib:
                reasons.append(f"broker RSS grew {growth:.1f} MiB during the run (limit {config.max_rss_growth_mib})")
    if config.soak and summary["broker"].get("exit_code") == -9:
        reasons.append("the broker did not exit on SIGTERM and had to be killed")
    files = summary.get("files")
    if files is not None:
        if files["offered"] and not files["done"]:
            reasons.append(f"none of {files['offered']} file transfers finished")
        stuck = files["timed_out"] + files["unfinished"]
        if stuck and not (result.restarts > 0 or config.churn_every > 0):
            reasons.append(f"{stuck} file transfers stalled with no restart or churn to explain them")
    presence = summary.get("presence")
    if presence is not None and not presence["reached_all"]:
        reasons.append("a presence change did not reach every subscriber")
    return not reasons, reasons


def summarize(result: RunResult) -> dict:
    config = result.config
    merged = MergedStats.merge(result.reports)
    counters = merged.counters
    window_s = (merged.last_receive_ns - merged.first_send_ns) / 1e9 if merged.first_send_ns else 0.0
    offered = None if config.flood else round(config.rate * config.sender_count, 2)
    summary: dict = {
        "clients": config.clients,
        "registered": result.registered,
        "processes": result.processes,
        "senders": config.sender_count if (config.rate > 0 or config.flood) else 0,
        "server": result.server,
        "transport": result.transport,
        "sent": merged.sent,
        "acked": merged.acked,
        "received": merged.received,
        "lost": merged.lost,
        "lost_samples": merged.lost_samples,
        "unacked": merged.sent - merged.acked,
        "unacked_but_received": merged.unacked_received,
        "duplicated": counters["duplicated"],
        "out_of_order": counters["out_of_order"],
        "errors": sum(merged.errors.values()),
        "errors_by_code": dict(merged.errors),
        "error_samples": merged.error_samples[:10],
        "reconnects": counters["reconnects"],
        "msgs_per_s": round(merged.received / window_s, 1) if window_s > 0 else 0.0,
        "offered_msgs_per_s": offered,
        "latency_ms": merged.latency_ms(),
        "ack_latency_ms": merged.ack_latency_ms(),
        "register_ms": merged.register_latency_ms(),
        "client_counters": {name: counters[name] for name in CLIENT_COUNTERS},
        "broker": _broker(result, merged.received),
        "presence": _presence(result, merged),
        "files": _files(result, merged),
        "load_generator_cpu_s": round(sum(r.get("cpu_s", 0.0) for r in result.reports), 2),
        "machine_busy_cpus": result.machine_busy_cpus,
        "cpus": os.cpu_count(),
        "timings": result.timings,
        "notes": result.notes,
        "failures": result.failures,
        "options": dict(dataclasses.asdict(config), server=str(config.server) if config.server else None),
    }
    ok, reasons = verdict(summary, result)
    line = verdict_line(ok, reasons, summary)
    summary["verdict"] = {"pass": ok, "reasons": reasons, "line": line}
    return summary


def verdict_line(ok: bool, reasons: list[str], summary: dict) -> str:
    if not ok:
        return "VERDICT: FAIL " + "; ".join(r.splitlines()[0] for r in reasons)
    broker = summary["broker"]
    rss = ""
    if broker.get("rss_registered_mib") is not None:
        rss = f", broker RSS {broker['rss_registered_mib']:.1f} -> {broker['rss_end_mib']:.1f} MiB"
    return (f"VERDICT: PASS {summary['received']} of {summary['sent']} messages received, 0 lost, "
            f"{summary['duplicated']} duplicated, {summary['reconnects']} reconnects, "
            f"{broker['restarts']} broker restarts{rss}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(summary: dict) -> str:
    """The human summary."""
    o = summary["options"]
    lines = []
    mode = "flood" if o["flood"] else (f"{o['rate']:g} msg/s per sender" if o["rate"] > 0 else "idle")
    lines.append(f"p2pchat load: {summary['clients']} clients in {summary['processes']} processes, {mode}, "
                 f"{summary['senders']} senders, peers {o['peers']}, {o['size']}-byte bodies (not sealed: this "
                 f"measures the broker), {summary['transport']}, broker {summary['server']}"
                 f"{' (started by the tool)' if summary['broker']['spawned'] else ''}")
    reg = summary["register_ms"]
    lines.append(f"registered   {summary['registered']}/{summary['clients']} "
                 f"(after {summary['timings'].get('registered_after_s', 0):.1f} s; time to register p50 "
                 f"{_ms(reg['p50'])} p99 {_ms(reg['p99'])} max {_ms(reg['max'])} ms)")
    lines.append(f"messages     sent {summary['sent']}  acked {summary['acked']}  received {summary['received']}  "
                 f"lost {summary['lost']}  duplicated {summary['duplicated']}  out of order "
                 f"{summary['out_of_order']}  unacked {summary['unacked']}")
    t = summary["timings"]
    if "drain_s" in t:
        lines.append(f"drain        {t['drain_s']:.1f} s after sending stopped"
                     + ("" if t.get("drained") else " (cut off by its cap)"))
    offered = summary["offered_msgs_per_s"]
    lines.append(f"throughput   {summary['msgs_per_s']:,.1f} msg/s received"
                 + (f" (offered {offered:,.1f} msg/s)" if offered else "")
                 + f" over {summary['timings'].get('send_s', 0):.1f} s of sending")
    lat, ack = summary["latency_ms"], summary["ack_latency_ms"]
    lines.append(f"latency ms   p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  "
                 f"p99.9 {_ms(lat['p999'])}  max {_ms(lat['max'])}   (one-way, sender -> broker -> recipient)")
    lines.append(f"ack ms       p50 {_ms(ack['p50'])}  p99 {_ms(ack['p99'])}  max {_ms(ack['max'])}   "
                 "(send -> the broker's ACK)")
    cc = summary["client_counters"]
    lines.append(f"connections  reconnects {summary['reconnects']}  churns {cc['churns']}  "
                 f"silences {cc['silences']}  not registered {cc['not_registered']}  late sends {cc['late_sends']}  "
                 f"sends refused by ZeroMQ {cc['send_again']}")
    f = summary["files"]
    if f is not None:
        tm = f["transfer_ms"]
        lines.append(f"files        offered {f['offered']}  done {f['done']}  timed out {f['timed_out']}  peer gone "
                     f"{f['peer_gone']}  unfinished {f['unfinished']}; "
                     f"{f['bytes'] / MIB:,.1f} MiB verified, {f['mib_s']:,.1f} MiB/s; transfer ms p50 "
                     f"{_ms(tm['p50'])} p99 {_ms(tm['p99'])} max {_ms(tm['max'])}")
    lines.append(f"errors       {summary['errors']}" + (f" {summary['errors_by_code']}" if summary["errors"] else ""))
    for sample in summary["error_samples"][:3]:
        lines.append(f"               e.g. {sample}")
    b = summary["broker"]
    if b.get("rss_baseline_mib") is not None:
        per = f" ({b['rss_per_client_kib']:.1f} KiB per registered client)" if b.get("rss_per_client_kib") else ""
        cpu = ""
        if b.get("cpu_us_per_msg"):
            cpu = f", {b['cpu_us_per_msg']:.0f} us CPU per message"
            if b.get("main_thread_us_per_msg"):
                cpu += f" ({b['main_thread_us_per_msg']:.0f} in its Python thread)"
        lines.append(f"broker       RSS {b['rss_baseline_mib']:.1f} MiB idle -> {b['rss_registered_mib']:.1f} MiB "
                     f"registered{per}, max {b['rss_max_mib']:.1f}, end {b['rss_end_mib']:.1f}; CPU avg "
                     f"{b['cpu_avg_pct']:.0f}% max {b['cpu_max_pct']:.0f}%{cpu}; fds max {b['fds_max']} "
                     f"of {b['fd_limit']}")
    if b["restarts"]:
        lines.append(f"restarts     {b['restarts']} (down {', '.join(f'{d:.1f}' for d in b['restart_downtime_s'])} s)")
    p = summary["presence"]
    if p is not None:
        lines.append(f"presence     {len(p['changes'])} changes to {p['subscribers']} subscribers: reached all "
                     f"{'yes' if p['reached_all'] else 'NO'}; p50 {_ms(p['p50_ms'])} p99 {_ms(p['p99_ms'])} "
                     f"max {_ms(p['max_ms'])} ms")
    busy = summary["machine_busy_cpus"]
    lines.append(f"load tool    {summary['load_generator_cpu_s']:.1f} s CPU in its worker processes"
                 + (f"; the host was {busy:.2f} of {summary['cpus']} CPUs busy while sending (broker, load tool "
                    "and anything else running)" if busy is not None else ""))
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    for failure in summary["failures"]:
        lines.append(f"failure: {failure}")
    lines.append(summary["verdict"]["line"])
    return "\n".join(lines)
