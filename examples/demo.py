"""`make demo`: the main job on the embedded SQLite default, entirely offline.

Starts mailstrom's test kit, `mailstrom.testing.FakeMX`: a receiving SMTP server (aiosmtpd,
STARTTLS with a throwaway CA) and a DNS zone (dnslib) on loopback. Points mailstrom at them,
queues a batch through `Mailstrom` with a SQLite store, shows progress while the background
worker delivers, and prints every recipient's final status — including one the server
defers (451) and one it rejects (550).
"""

from __future__ import annotations

import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mailstrom import Config, Email, InvalidMessage, Mailstrom, RecipientState, RetryPolicy
from mailstrom.stores.base import RecipientResult
from mailstrom.testing import FakeMX

console = Console(width=None if Console().is_terminal else 150)
STATE_STYLE = {
    RecipientState.DELIVERED: "green",
    RecipientState.DEFERRED: "yellow",
    RecipientState.FAILED: "red",
    RecipientState.QUEUED: "blue",
}


def main() -> None:
    with FakeMX() as mx:
        deliver_through(mx)


def deliver_through(mx: FakeMX) -> None:
    mx.defer("busy@example.org", "451 4.2.1 Mailbox busy, try again later")
    mx.reject("nobody@example.org", "550 5.1.1 No such user here")
    # Every domain's MX is the fake's own host unless the zone says otherwise.
    dns = mx.dns
    dns.mx("example.org", [(10, "mx.example.org")])
    dns.mx("partner.test", [(10, "mx.partner.test"), (20, "backup.partner.test")])
    dns.a("mx.example.org", "127.0.0.1")
    dns.a("mx.partner.test", "127.0.0.1")
    dns.null_mx("no-mail.test")
    receiver = mx.server
    console.print(
        f"[bold]Loopback peers:[/] SMTP receiver 127.0.0.1:{receiver.port} (STARTTLS), "
        f"DNS 127.0.0.1:{dns.port}"
    )

    config = Config(
        helo_name="demo.mailstrom.test",
        smtp_port=receiver.port,  # MX delivery uses 25 in production
        dns=dns.dns_config,
        allow_loopback=True,  # the demo's receiver is on 127.0.0.1; never set it in production
        retry=RetryPolicy(min_delay=timedelta(minutes=5)),
    )
    workdir = Path(tempfile.mkdtemp(prefix="mailstrom-demo-"))

    batch = [
        Email(
            from_="Shop <orders@shop.test>",
            to=[f"customer{i}@example.org"],
            cc=["archive@partner.test"] if i % 5 == 0 else [],
            bcc=["audit@partner.test"] if i == 0 else [],
            subject=f"Your order #{1000 + i}",
            text=f"Thanks for order #{1000 + i}.\n\nShipping soon — ünïcödé survives.\n",
            html=f"<p>Thanks for order <b>#{1000 + i}</b>.</p>",
        )
        for i in range(40)
    ]
    batch.append(
        Email(
            from_="Shop <orders@shop.test>",
            to=["busy@example.org", "nobody@example.org", "someone@no-mail.test"],
            subject="Three hard cases",
            text="One defers, one is rejected, one domain accepts no mail.",
        )
    )
    total = sum(len(e.to) + len(e.cc) + len(e.bcc) for e in batch)

    done = threading.Event()
    seen: set[tuple[str, str]] = set()
    progress = Progress(
        TextColumn("[bold]delivering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("deliver", total=total)

    def on_result(result: RecipientResult) -> None:
        seen.add((result.message_id, result.address))
        progress.update(task, completed=len(seen))
        if len(seen) >= total:
            done.set()

    # A path (or a store URL): the facade opens the SQLite queue and closes it on exit.
    with Mailstrom(config, store=workdir / "queue.db", on_result=on_result) as ms:
        try:
            ms.send_email(Email(from_="orders@shop.test", to=["not an address"], text="x"))
        except InvalidMessage as exc:
            console.print(f"[dim]Rejected at the boundary, nothing queued:[/] {exc}")
        started = time.perf_counter()
        ids = [ms.send_email(email) for email in batch]
        queued_in = time.perf_counter() - started
        console.print(
            f"Queued {len(ids)} messages ({total} recipients) durably in {queued_in * 1000:.0f} ms"
            f" — send_email never waits on the network."
        )
        with progress:
            done.wait(timeout=60)
        elapsed = time.perf_counter() - started
        statuses = [ms.query_status(i) for i in ids]

    table = Table(title="Final status per recipient (first 3 messages and the hard cases)")
    for column in ("message", "recipient", "state", "attempts", "MX host", "TLS", "reply"):
        table.add_column(column)
    for status in statuses[:3] + statuses[-1:]:
        for r in status.recipients:
            style = STATE_STYLE[r.state]
            retry = f" (next try {r.next_attempt_at:%H:%M:%S})" if r.next_attempt_at else ""
            table.add_row(
                status.id[-8:],  # ids begin with their timestamp; the end tells them apart
                r.address,
                f"[{style}]{r.state}[/]",
                str(r.attempts),
                r.mx_host or "-",
                "yes" if r.tls else "no",
                r.reason + retry,
            )
    console.print(table)
    counts: dict[RecipientState, int] = {}
    for status in statuses:
        for r in status.recipients:
            counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    console.print(
        f"[bold]{summary}[/] in {elapsed:.2f} s; the receiver accepted "
        f"{len(receiver.messages)} SMTP transactions. Queue file: {workdir / 'queue.db'}"
    )


if __name__ == "__main__":
    main()
