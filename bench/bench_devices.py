"""Message throughput to a user with 3 devices beside a user with 1, in one run (issue 15: the cost of fan-out).

    .venv/bin/python bench/bench_devices.py [--messages 2000] [--rounds 3] [--json] [--check]

One broker (bench/run_broker.py: the real BrokerServer with CURVE and store-and-forward, rate limits out of
reach) and, each in its own process, ChatClients as users run them (sealing and history on): alice; ``solo``
with one device; ``trio`` with three, the first registered as usual and the other two linked with its recovery
phrase (``p2pchat link --recovery``). Every device stays online and receiving. Each round alice queues
--messages messages to solo and as many to trio, the order alternating by round. A message counts when every
device of its recipient has it: msgs/s = N / (alice's first send -> the last device's last MessageReceived).
After each phase the run waits until the broker and the clients are idle again (acks, consumes and the
devices' receipts back to alice included), then reads each process's CPU (psutil) and the bytes on the
broker's connections (``ss``: TCP payload both ways, CURVE included), per message.

To trio, alice seals three copies into one ``message`` frame; the broker appends three queue rows, writes
three frames and takes three consumes; alice gets three delivered receipts. Were every one of these costs
per device, trio would get 1/3 of solo's msgs/s; the costs per message that do not grow with the devices
(alice's send path and history, the ack, decoding) make it better than that. ``--check`` fails under
RATIO_TARGET = 1/3: fan-out then costs more than linear in the devices (or the machine was very busy: read
bg cpus). Measured 0.46-0.79 on a 2-CPU VM, quiet or shared with other work (bench/README.md).

All processes share this machine's CPUs: trio's three devices receive on the same CPUs as the broker and
alice, which they would not do as three real machines, so the ratio here is a floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpu_watch import Busy, CpuWatch
from cpu_watch import used as cpu_used
from bench_relay import BenchError, ServerProcess, _die_with_parent, _stop_process, free_ports  # bench/ is sys.path[0]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATIO_TARGET = 0.33  # linear fan-out: 3 devices, a third of one device's throughput (module docstring)
TRIO = 3
TIMEOUT = 300.0  # seconds for any one step: a stuck run is an error, not a figure


def _client(home: str, user: str, port: int, on_event=None):
    _die_with_parent()  # an interrupted run leaves no client behind
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client.chat_client import ChatClient, ClientConfig
    from p2pchat.common.endpoints import ServerAddress

    client = ChatClient(user, ClientConfig(server=ServerAddress("127.0.0.1", port), history=True, send_timeout=TIMEOUT),
                        on_event=on_event)
    client.connect(30)
    return client


def _device(name: str, user: str, home: str, port: int, messages: int, results, stop) -> None:
    """One device: reports (name, tag, perf_counter_ns) once it has every message of a tag."""
    from p2pchat.client import events as ev

    counts: dict[str, int] = {}

    def on_event(event) -> None:
        if isinstance(event, ev.MessageReceived) and event.sender == "alice":
            tag = event.text.partition(" ")[0]
            counts[tag] = counts.get(tag, 0) + 1
            if counts[tag] == (1 if tag == "warm" else messages):
                results.put((name, tag, time.perf_counter_ns()))

    client = _client(home, user, port, on_event)
    results.put((name, "ready", client.recovery_phrase))
    stop.wait(TIMEOUT * 10)
    client.close()


def _alice(home: str, port: int, commands, results) -> None:
    """Sends on command: ("send", to, tag, n) -> ("alice", tag, first send ns) once all are acked; None stops."""
    client = _client(home, "alice", port)
    results.put(("alice", "ready", None))
    while (command := commands.get()) is not None:
        _, to, tag, count = command
        start = time.perf_counter_ns()
        futures = [client.send_async(to, f"{tag} {i}")[1] for i in range(count)]
        for future in futures:
            future.result(TIMEOUT)
        results.put(("alice", tag, start))
    client.close()


class Run:
    """The broker and the client processes of one run, and what they reported."""

    def __init__(self, work: Path, messages: int) -> None:
        self.work, self.messages = work, messages
        self.ctx = mp.get_context("spawn")
        self.results, self.commands, self.stop = self.ctx.Queue(), self.ctx.Queue(), self.ctx.Event()
        self.broker = ServerProcess("broker", free_ports(), work, "curve", "on")
        self.procs: dict[str, mp.Process] = {}
        self.reports: dict[tuple[str, str], object] = {}  # (kind or device, tag) -> what it reported
        self.devices = {"solo": ["solo"], "trio": [f"trio{i}" for i in range(1, TRIO + 1)]}
        self.watch = CpuWatch(lambda: {"broker": self.broker.proc.pid,
                                       **{name: proc.pid for name, proc in self.procs.items()}})

    def __enter__(self) -> Run:
        self.broker.__enter__()
        try:
            self._start_clients()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.commands.put(None)
        for proc in self.procs.values():
            _stop_process(proc)
        self.broker.stop()

    def _spawn(self, name: str, target, args: tuple) -> None:
        self.procs[name] = proc = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        proc.start()

    def _device(self, name: str, user: str) -> str:
        self._spawn(name, _device, (name, user, str(self.work / name), self.broker.port, self.messages, self.results,
                                    self.stop))
        return self.wait("ready", [name])[name]

    def _start_clients(self) -> None:
        self._device("solo", "solo")
        phrase = self._device("trio1", "trio")
        for name in self.devices["trio"][1:]:  # linked with the phrase, as a user adds a laptop
            linked = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "link", "--user", "trio", "--server",
                                     f"127.0.0.1:{self.broker.port}", "--recovery", "--name", name], cwd=ROOT,
                                    input=phrase + "\n", text=True, capture_output=True, timeout=60,
                                    env=dict(os.environ, P2PCHAT_HOME=str(self.work / name)))
            if linked.returncode != 0:
                raise BenchError(f"linking {name}: {linked.stderr[-2000:]}")
            self._device(name, "trio")
        self._spawn("alice", _alice, (str(self.work / "alice"), self.broker.port, self.commands, self.results))
        self.wait("ready", ["alice"])
        for user in self.devices:  # alice fetches keys and device lists; every device has something from her
            self.commands.put(("send", user, "warm", 1))
            self.wait("warm", ["alice", *self.devices[user]])

    def wait(self, tag: str, names: list[str]) -> dict[str, object]:
        """What each of ``names`` reported for ``tag``, once all have."""
        deadline = time.monotonic() + TIMEOUT
        while not all((name, tag) in self.reports for name in names):
            dead = [name for name, proc in self.procs.items() if not proc.is_alive()]
            if dead or not self.broker.proc or self.broker.proc.poll() is not None:
                raise BenchError(f"{dead or 'the broker'} stopped; broker log:\n" + "".join(self.broker.lines))
            try:
                name, got, value = self.results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = [n for n in names if (n, tag) not in self.reports]
                    raise BenchError(f"{missing} had not reported {tag!r} after {TIMEOUT:.0f} s") from None
                continue
            self.reports[(name, got)] = value
        return {name: self.reports[(name, tag)] for name in names}

    def settle(self) -> dict[str, float]:
        try:
            return self.watch.settle(TIMEOUT)
        except Busy as exc:
            raise BenchError(str(exc)) from None

    def phase(self, user: str, tag: str) -> dict:
        """alice sends N messages to ``user``; throughput to all its devices, and the costs per message."""
        n = self.messages
        cpu0, wire0, t0 = self.settle(), wire_bytes(self.broker.port), time.monotonic()
        self.commands.put(("send", user, tag, n))
        done = self.wait(tag, ["alice", *self.devices[user]])
        cpu1, wire1 = self.settle(), wire_bytes(self.broker.port)
        used, bg_cpus = cpu_used(cpu0, cpu1, time.monotonic() - t0)
        last = max(done[name] for name in self.devices[user])
        return {
            "msgs_per_s": n / ((last - done["alice"]) / 1e9),
            "broker_us_per_msg": used["broker"] * 1e6 / n,
            "alice_us_per_msg": used["alice"] * 1e6 / n,
            "devices_us_per_msg": sum(used[name] for name in self.devices[user]) * 1e6 / n,
            "wire_in_per_msg": None if wire0 is None else (wire1[0] - wire0[0]) / n,
            "wire_out_per_msg": None if wire0 is None else (wire1[1] - wire0[1]) / n,
            "bg_cpus": bg_cpus,
        }


def wire_bytes(port: int) -> tuple[int, int] | None:
    """TCP payload bytes (into the broker, out of it) on its established connections on ``port``; None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=10).stdout
    return (sum(map(int, re.findall(r"bytes_received:(\d+)", out))),
            sum(map(int, re.findall(r"bytes_sent:(\d+)", out))))


FIGURES = ("msgs_per_s", "broker_us_per_msg", "alice_us_per_msg", "devices_us_per_msg", "wire_in_per_msg",
           "wire_out_per_msg", "bg_cpus")


def summarize(runs: dict[str, list[dict]]) -> dict:
    med = {user: {k: (statistics.median(r[k] for r in rs) if rs[0][k] is not None else None) for k in FIGURES}
           for user, rs in runs.items()}
    for user in med:
        med[user]["msgs_per_s_all"] = [round(r["msgs_per_s"]) for r in runs[user]]
    ratio = med["trio"]["msgs_per_s"] / med["solo"]["msgs_per_s"]
    return {"medians": med, "ratio": {"trio_over_solo": round(ratio, 3), "target": RATIO_TARGET,
                                      "ok": ratio >= RATIO_TARGET},
            "broker_cpu_trio_over_solo": round(med["trio"]["broker_us_per_msg"] / med["solo"]["broker_us_per_msg"], 2)}


def print_table(summary: dict, args: argparse.Namespace, load: tuple) -> None:
    print(f"\n{args.messages} sealed messages from alice per phase, median of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.2f} before / {load[1]:.2f} after")
    print(f"{'recipient':<16}{'msgs/s':>9}{'broker':>9}{'alice':>9}{'devices':>9}{'wire in':>9}{'wire out':>9}"
          f"{'bg cpus':>9}")
    print(f"{'':<16}{'':>9}{'us/msg':>9}{'us/msg':>9}{'us/msg':>9}{'B/msg':>9}{'B/msg':>9}")
    for user, label in (("solo", "solo, 1 device"), ("trio", f"trio, {TRIO} devices")):
        m = summary["medians"][user]
        wire = [f"{m[k]:>9.0f}" if m[k] is not None else f"{'n/a':>9}" for k in ("wire_in_per_msg", "wire_out_per_msg")]
        print(f"{label:<16}{m['msgs_per_s']:>9,.0f}{m['broker_us_per_msg']:>9.0f}{m['alice_us_per_msg']:>9.0f}"
              f"{m['devices_us_per_msg']:>9.0f}{''.join(wire)}{m['bg_cpus']:>9.2f}")
    r = summary["ratio"]
    print(f"  trio / solo msgs/s {r['trio_over_solo']:.2f} (target >= {r['target']}: "
          f"{'met' if r['ok'] else 'MISSED'}); broker CPU per message x{summary['broker_cpu_trio_over_solo']}")
    print("  a message counts once every device of its recipient has it; CPU and bytes include acks, consumes and "
          "receipts; devices = all of the recipient's; bg cpus = CPUs other programs kept busy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if trio/solo is under {RATIO_TARGET}")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rounds < 1:
        parser.error("--messages and --rounds must be >= 1")
    load_before = os.getloadavg()[0]

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # unwind through the `with` blocks: the broker and clients stop
    runs: dict[str, list[dict]] = {"solo": [], "trio": []}
    try:
        with tempfile.TemporaryDirectory(prefix="p2pchat-devices-") as tmp, Run(Path(tmp), args.messages) as run:
            for rnd in range(args.rounds):
                for user in ("solo", "trio") if rnd % 2 == 0 else ("trio", "solo"):
                    result = run.phase(user, f"r{rnd}{user}")
                    runs[user].append(result)
                    print(f"  round {rnd + 1}/{args.rounds} {user} {result['msgs_per_s']:>8,.0f} msgs/s  "
                          f"broker {result['broker_us_per_msg']:>5.0f} us/msg  bg cpus {result['bg_cpus']:.2f}",
                          file=sys.stderr)
    except BenchError as exc:
        print(f"bench_devices: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_devices: interrupted", file=sys.stderr)
        return 130
    load = (load_before, os.getloadavg()[0])
    summary = summarize(runs)
    if args.json:
        print(json.dumps({"args": vars(args), "load_average": load, "summary": summary, "runs": runs}, indent=2))
    else:
        print_table(summary, args, load)
    return 1 if args.check and not summary["ratio"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
