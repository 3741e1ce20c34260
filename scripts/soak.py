"""A long crash soak: worker processes killed at random while they deliver a large queue.

What tests/integration/test_chaos.py does at CI size, larger and longer, with more going
on at once: several destinations over two MX hosts, some recipients answered 451 for a
while, messages held and released, suppressed recipients, graceful SIGTERMs among the
SIGKILLs, a hook endpoint taking the event outbox, and (PostgreSQL) a restart midway.

    PYTHONPATH=src .venv/bin/python scripts/soak.py --store sqlite --messages 20000
    PYTHONPATH=src .venv/bin/python scripts/soak.py --store postgres --pg-restart

At the end it checks that every recipient is in a final state (delivered, or failed for a
suppressed one), none is lost, each duplicate was sent by a killed worker without being
recorded (in flight at the kill), no lease is left, the event outbox is drained and the
hook got every event, and that ``mailstrom queue --counts`` agrees with the receivers.
Exit status 0 when all holds; the figures are printed either way.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.postgres import ThrowawayPostgres
from tests.support.fleet import Fleet, WorkerProcess, fleet_env

from mailstrom.message.prepared import PreparedMessage
from mailstrom.status import RecipientState
from mailstrom.stores import open_store
from mailstrom.stores.base import Store
from mailstrom.testing.dns import LoopbackDNS
from mailstrom.testing.smtp import ReceivingServer, Repeated, start_receiving_server, tls_contexts

DOMAINS = tuple(f"d{n}.example" for n in range(6))
SECRET = "soak-secret-0123456789"  # noqa: S105 (the loopback hook's, thrown away)


def recipients_of(i: int) -> tuple[str, ...]:
    """Message ``i``'s recipients: one mostly, every 10th has three over other domains."""
    first = f"user{i:05d}@{DOMAINS[i % len(DOMAINS)]}"
    if i % 10:
        return (first,)
    return (first, *(f"cc{i:05d}@{DOMAINS[(i + k) % len(DOMAINS)]}" for k in (1, 2)))


def message(i: int) -> PreparedMessage:
    to = recipients_of(i)
    return PreparedMessage(
        data=(
            f"From: app@example.com\r\nTo: {', '.join(to)}\r\nSubject: number {i}\r\n"
            f"Message-ID: <{i}@example.com>\r\n\r\nHello number {i}.\r\n"
        ).encode(),
        envelope_from="app@example.com",
        recipients=to,
        subject=f"number {i}",
    )


class Hook:
    """A loopback HTTP endpoint that keeps the ids of every event posted to it."""

    def __init__(self) -> None:
        self.ids: Counter[int] = Counter()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    for event in json.loads(body)["events"]:
                        hook.ids[event["id"]] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def cli(env: dict[str, str], *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "mailstrom", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"mailstrom {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return json.loads(out.stdout) if "--json" in args else out.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill-min", type=float, default=0.2)
    ap.add_argument("--kill-max", type=float, default=2.0)
    ap.add_argument("--term-every", type=int, default=7, help="every n-th stop is a SIGTERM")
    ap.add_argument("--lease", default="3s")
    ap.add_argument("--pg-restart", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=1800.0)
    args = ap.parse_args()
    # SIGTERM (timeout(1)) ends the run through the clean-up below, not around it: the
    # workers and the PostgreSQL server it started would be left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    pg: ThrowawayPostgres | None = None
    if args.store == "postgres":
        pg = ThrowawayPostgres().start()
        url = pg.create_database() + "?dead_after=10s"
    else:
        url = f"sqlite:///{tmp / 'queue.db'}"

    server_context, _ = tls_contexts("mx.test")
    mx1 = start_receiving_server(server_context, starttls=False, name="mx1.test")
    mx2 = start_receiving_server(
        server_context, starttls=False, host="127.0.0.2", port=mx1.port, name="mx2.test"
    )
    mx2.rcpt_replies = mx1.rcpt_replies
    servers: list[ReceivingServer] = [mx1, mx2]
    dns = LoopbackDNS().start()
    for n, domain in enumerate(DOMAINS):
        if n == 5:
            dns.mx(domain, [(10, "mx1.test"), (20, "mx2.test")])
        else:
            dns.mx(domain, [(10, f"mx{1 + n % 2}.test")])
    dns.a("mx1.test", "127.0.0.1")
    dns.a("mx2.test", "127.0.0.2")
    hook = Hook()
    env = fleet_env(
        url,
        smtp_port=mx1.port,
        dns=dns,
        home=tmp,
        lease_batch="40",
        max_connections="4",
        poll_interval="0.5",
        retry_min_delay="1s",
        retry_max_delay="3s",
        hook_url=hook.url,
        hook_secret=SECRET,
    )
    fleet = Fleet(env)
    store: Store | None = open_store(url)
    started = time.monotonic()
    kills = terms = early_terms = 0
    killed: list[WorkerProcess] = []
    termed: list[WorkerProcess] = []
    try:
        all_rcpts = {r for i in range(args.messages) for r in recipients_of(i)}
        deferred = {r for r in all_rcpts if zlib.crc32(r.encode()) % 23 == 0}
        for r in deferred:
            mx1.rcpt_replies[r] = Repeated("451 4.7.1 Try again later", 2, "250 2.1.5 OK")
        suppressed = {f"user{i:05d}@{DOMAINS[i % len(DOMAINS)]}" for i in (5, 11)}
        for r in suppressed:
            cli(env, "suppress", "add", r, "--json")
        ids = store.enqueue_many([message(i) for i in range(args.messages)], now=datetime.now(UTC))
        late_suppressed = f"user{args.messages - 7:05d}@{DOMAINS[(args.messages - 7) % 6]}"
        held_ids = ids[1::97]
        print(f"store {url}: {args.messages} messages, {len(all_rcpts)} recipients", flush=True)
        alive = fleet.start(args.workers, lease_for=args.lease)
        total = len(all_rcpts) - len(suppressed) - 1

        def delivered() -> int:
            return store.stats().by_state[RecipientState.DELIVERED]

        def pending() -> int:
            by = store.stats().by_state
            return by[RecipientState.QUEUED] + by[RecipientState.DEFERRED]

        phase_hold = phase_release = phase_suppress = phase_restart = False
        done = 0
        outage = threading.Event()

        def restart(server: ThrowawayPostgres) -> None:
            server.take_down()
            time.sleep(3.0)  # the outage itself
            server.bring_up()
            outage.clear()

        next_stop = time.monotonic() + rng.uniform(args.kill_min, args.kill_max)
        while True:
            now = time.monotonic()
            if now - started > args.deadline:
                raise SystemExit("deadline passed")
            if outage.is_set():
                pass  # PostgreSQL down: kills go on, the store is not looked at
            elif store is None:
                store = open_store(url)
            else:
                done = delivered()
            if not phase_suppress and done > total * 0.1:
                cli(env, "suppress", "add", late_suppressed, "--json")
                phase_suppress = True
            if not phase_hold and done > total * 0.2:
                out = cli(env, "hold", *held_ids, "--json")
                print(f"held: {out}", flush=True)
                phase_hold = True
            if phase_hold and not phase_release and done > total * 0.6:
                out = cli(env, "release", *held_ids, "--json")
                print(f"released: {out}", flush=True)
                phase_release = True
            if pg is not None and args.pg_restart and not phase_restart and done > total * 0.45:
                print("restarting PostgreSQL (kills go on meanwhile)", flush=True)
                store.close()
                store = None
                outage.set()
                threading.Thread(target=restart, args=(pg,), daemon=True).start()
                phase_restart = True
            if store is not None and phase_release and pending() == 0:
                break
            if now >= next_stop:
                # Mostly a worker at work; now and then one still starting.
                running = [w for w in alive if w._started.is_set()]
                pool = running if running and rng.random() < 0.85 else alive
                victim = pool[rng.randrange(len(pool))]
                alive.remove(victim)
                if (kills + terms + 1) % args.term_every == 0:
                    victim.proc.send_signal(signal.SIGTERM)
                    code = victim.finish(timeout=60)
                    if code == -signal.SIGTERM and not victim._started.is_set():
                        # Still importing, before any handler: nothing leased yet.
                        early_terms += 1
                    elif code != 0:
                        raise SystemExit(f"{victim.name} exited {code} on SIGTERM:\n{victim.log()}")
                    termed.append(victim)
                    terms += 1
                else:
                    victim.proc.send_signal(signal.SIGKILL)
                    victim.finish(timeout=10)
                    killed.append(victim)
                    kills += 1
                # Not waited for: the next victim may be a worker still starting.
                replacement = WorkerProcess(
                    f"w{len(fleet.workers)}", fleet.env, args.lease, fleet.activity
                )
                fleet.workers.append(replacement)
                alive.append(replacement)
                next_stop = time.monotonic() + rng.uniform(args.kill_min, args.kill_max)
                if (kills + terms) % 20 == 0:
                    print(
                        f"{time.monotonic() - started:.0f}s: {done}/{total} delivered, "
                        f"{kills} kills, {terms} SIGTERMs",
                        flush=True,
                    )
            time.sleep(0.05)
        # Let the outbox drain and the hook get it all.
        deadline = time.monotonic() + 120
        while store.unsent_events() and time.monotonic() < deadline:
            time.sleep(0.2)
        for worker in alive:
            worker.proc.send_signal(signal.SIGTERM)
        for worker in alive:
            code = worker.finish(timeout=60)
            if code == -signal.SIGTERM and not worker._started.is_set():
                early_terms += 1  # still importing: nothing leased yet
            elif code != 0:
                raise SystemExit(f"{worker.name} exited {code}:\n{worker.log()}")
        elapsed = time.monotonic() - started

        problems: list[str] = []
        received = [m for s in servers for m in s.messages]
        counts = Counter(r for m in received for r in m.rcpt_tos)
        gone = {late_suppressed} | suppressed
        lost = all_rcpts - set(counts) - gone
        if any(counts[r] for r in suppressed):
            problems.append("a suppressed recipient was sent to")
        if lost:
            problems.append(f"lost: {sorted(lost)[:20]} ({len(lost)})")
        # States on record.
        finals: Counter[str] = Counter()
        recorded_results = 0
        for mid in ids:
            for r in store.status(mid).recipients:
                finals[r.state] += 1
                recorded_results += len(r.history)
                if r.address in gone and r.state is RecipientState.FAILED:
                    # Failed as suppressed, no server asked: its event, but no entry in
                    # the history (a result that was no attempt).
                    recorded_results += 1
                if r.state is RecipientState.DELIVERED:
                    n_deliv = sum(1 for h in r.history if h.outcome == "delivered")
                    if n_deliv != 1 or counts[r.address] < 1:
                        problems.append(f"{r.address}: {n_deliv} delivered on record, {r}")
                elif r.state is RecipientState.FAILED:
                    if r.address not in gone:
                        problems.append(f"{r.address} failed: {r}")
                else:
                    problems.append(f"{r.address} not final: {r}")
        if store.next_due(now=datetime.now(UTC)) is not None:
            problems.append(
                f"something still due or leased: {store.next_due(now=datetime.now(UTC))}"
            )
        duplicated = {r for r, n in counts.items() if n > 1}
        in_flight: set[str] = set()
        per_kill = []
        for victim in killed:
            sent = {r for m in received if m.helo == victim.helo for r in m.rcpt_tos}
            unrecorded = sent - victim.recorded_delivered()
            per_kill.append(len(unrecorded & duplicated))
            in_flight |= unrecorded
        for worker in termed + alive:
            sent_c = Counter(r for m in received if m.helo == worker.helo for r in m.rcpt_tos)
            not_rec = set(sent_c) - worker.recorded_delivered()
            if not_rec:
                problems.append(
                    f"{worker.name} (stopped gracefully) sent unrecorded: {sorted(not_rec)[:5]}"
                )
        high_water = max(4 * 4, 40)  # runtime/worker.py: leased and unrecorded at most
        if per_kill and max(per_kill) > high_water:
            problems.append(f"a kill left more duplicates than a worker holds: {per_kill}")
        unexplained = duplicated - in_flight
        if unexplained:
            problems.append(f"duplicates not in flight at a kill: {sorted(unexplained)[:20]}")
        # `mailstrom status` on the messages held and released, against the receivers.
        for mid in held_ids[:40]:
            for r in cli(env, "status", mid, "--json")["recipients"]:
                seen = counts[r["address"]] > 0
                if r["leased"] or (r["state"] == "delivered") != seen:
                    problems.append(f"status {mid}: {r['address']} {r['state']}, received {seen}")
        counted = cli(env, "queue", "--counts", "--json")
        if counted["by_state"]["delivered"] != len(counts):
            problems.append(f"queue --counts {counted['by_state']} vs {len(counts)} received")
        if counted["by_state"]["queued"] or counted["by_state"]["deferred"]:
            problems.append(f"queue --counts says pending: {counted}")
        if counted["held"]:
            problems.append(f"still held: {counted['held']}")
        unsent = store.unsent_events()
        last = store.last_event_id()
        events = []
        after = 0
        while True:
            page = store.read_events(after=after, limit=1000)
            if not page:
                break
            events += page
            after = page[-1].id
        missing_hook = {e.id for e in events} - set(hook.ids)
        if unsent or missing_hook:
            problems.append(f"outbox: {unsent} unsent, {len(missing_hook)} never posted")
        if len(events) != recorded_results:
            problems.append(f"{len(events)} events for {recorded_results} recorded results")
        print(
            json.dumps(
                {
                    "store": args.store,
                    "messages": args.messages,
                    "recipients": len(all_rcpts),
                    "seconds": round(elapsed),
                    "kills": kills,
                    "sigterms": terms,
                    "sigterms_while_importing": early_terms,
                    "workers_started": len(fleet.workers),
                    "received_copies": sum(counts.values()),
                    "duplicated": len(duplicated),
                    "max_copies": max(counts.values()),
                    "duplicates_per_kill": per_kill,
                    "finals": {str(k): v for k, v in finals.items()},
                    "events": len(events),
                    "last_event_id": last,
                    "hook_repeats": sum(n - 1 for n in hook.ids.values()),
                    "late_suppressed_received": counts[late_suppressed],
                },
                indent=1,
            )
        )
        for p in problems[:40]:
            print("PROBLEM:", p)
        return 1 if problems else 0
    finally:
        fleet.stop_all()
        if store is not None:
            store.close()
        for s in servers:
            s.stop()
        hook.server.shutdown()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    sys.exit(main())
