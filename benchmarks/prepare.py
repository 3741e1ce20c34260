"""Microseconds per ``prepare()`` call, by message shape and input kind.

Prints figures only (no assertions): CPU time per call (what this process spent, so other
jobs on a shared machine disturb it less than wall time), and wall time. Every message in a
run has its own sender and recipient addresses, so the whole-address caches never hit and
each row pays for address validation; the domains come from a small pool, as they do for
real traffic. The "same sender" row repeats one sender (the common case of an application sending as
itself), and "new domains" gives every address a domain never seen before. The "DKIM" rows
sign the text message (keys generated in memory for the run); their difference from the
"text" row is the cost of signing.

    .venv/bin/python benchmarks/prepare.py [--count 2000] [--runs 7] [--profile SHAPE]
    .venv/bin/python benchmarks/prepare.py --stages   # CPU µs per pipeline stage
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage

from mailstrom.dkim import DKIMAlgorithm, DKIMConfig, DKIMKey, generate_private_key
from mailstrom.message import Attachment, Email, prepare

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
DOMAINS = [f"example{i}.org" for i in range(20)]
PARAGRAPH = (
    "Thank you for your order. Your parcel left our warehouse this morning and should "
    "reach you within two working days.\n"
)
TEXT = PARAGRAPH * 8  # about 1 KB
HTML = "<html><body>" + "".join(f"<p>{PARAGRAPH}</p>\n" for _ in range(8)) + "</body></html>\n"
IMAGE = bytes(range(256)) * 16  # 4 KB of binary
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40  # 10 KB of binary

_serial = itertools.count()


def _names(domains: bool = False) -> tuple[str, str]:
    n = next(_serial)
    domain = f"d{n}.example.net" if domains else DOMAINS[n % len(DOMAINS)]
    return f"shop{n}@{domain}", f"customer{n}@{domain}"


def text_email(same_sender: bool = False, new_domains: bool = False) -> Email:
    sender, rcpt = _names(new_domains)
    if same_sender:
        sender = "shop@example.com"
    return Email(
        from_=f"Example Shop <{sender}>",
        to=[rcpt],
        subject="Your order has shipped",
        text=TEXT,
    )


def html_email() -> Email:
    sender, rcpt = _names()
    return Email(
        from_=f"Example Shop <{sender}>",
        to=[rcpt],
        subject="Your order has shipped",
        text=TEXT,
        html=HTML,
    )


def full_email() -> Email:
    sender, rcpt = _names()
    return Email(
        from_=f"Example Shop <{sender}>",
        to=[rcpt],
        subject="Your invoice",
        text=TEXT,
        html=HTML.replace("<body>", '<body><img src="cid:logo@shop">'),
        attachments=[
            Attachment(
                filename="logo.png",
                content=IMAGE,
                content_type="image/png",
                inline=True,
                content_id="logo@shop",
            ),
            Attachment(filename="invoice.pdf", content=PDF, content_type="application/pdf"),
        ],
    )


def utf8_email() -> Email:
    sender, rcpt = _names()
    return Email(
        from_=f"Bücherstube Müller <{sender}>",
        to=[f"Zoë Ångström <{rcpt}>"],
        subject="Ihre Bestellung wurde verschickt \u2013 vielen Dank!",
        text=TEXT.replace("order", "Bestellung über 30 €"),
    )


def raw_message() -> bytes:
    sender, rcpt = _names()
    return (
        f"From: Example Shop <{sender}>\r\nTo: {rcpt}\r\nSubject: Your order has shipped\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + TEXT.replace("\n", "\r\n")
    ).encode()


def stdlib_message() -> EmailMessage:
    sender, rcpt = _names()
    message = EmailMessage()
    message["From"] = f"Example Shop <{sender}>"
    message["To"] = rcpt
    message["Subject"] = "Your order has shipped"
    message.set_content(TEXT)
    return message


def _dkim(*algorithms: DKIMAlgorithm) -> DKIMConfig:
    """Keys for every domain the messages come from, one per algorithm."""
    pems = {algorithm: generate_private_key(algorithm) for algorithm in algorithms}
    return DKIMConfig(
        keys=[
            DKIMKey(
                domain=domain,
                selector=f"s{index}",
                private_key=pems[algorithm],
                algorithm=algorithm,
            )
            for domain in [*DOMAINS, "example.com"]
            for index, algorithm in enumerate(algorithms)
        ]
    )


RSA, ED25519 = DKIMAlgorithm.RSA_SHA256, DKIMAlgorithm.ED25519_SHA256
OPTIONS: dict[str, dict[str, object]] = {
    "text, DKIM rsa-2048": {"dkim": _dkim(RSA)},
    "text, DKIM ed25519": {"dkim": _dkim(ED25519)},
    "text, DKIM rsa-2048 + ed25519": {"dkim": _dkim(RSA, ED25519)},
}
"""Keyword arguments of prepare() for the shapes that need some."""

SHAPES: dict[str, Callable[[], Email | EmailMessage | bytes]] = {
    "text": text_email,
    "text+html": html_email,
    "text+html+inline+attachment": full_email,
    "utf-8 headers": utf8_email,
    "raw bytes": raw_message,
    "EmailMessage": stdlib_message,
    "text, same sender": lambda: text_email(same_sender=True),
    "text, new domains": lambda: text_email(new_domains=True),
    **{name: text_email for name in OPTIONS},
}


def batches(make: Callable[[], Email | EmailMessage | bytes], count: int) -> Iterator[list[object]]:
    while True:
        yield [make() for _ in range(count)]


def per_call_us(messages: list[object], options: dict[str, object]) -> tuple[float, float]:
    """(CPU µs, wall µs) per ``prepare()`` call over ``messages``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for message in messages:
        prepare(message, now=NOW, **options)  # type: ignore[arg-type]
    count = len(messages)
    return (time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6


def stages(count: int, runs: int) -> None:
    """CPU µs per call of each stage of the Email pipeline, for the first Email shapes."""
    from mailstrom.message import builder, envelope, render
    from mailstrom.message import preparation as prepare_module

    names = ("check", "decide", "message-id", "render", "finish")
    options = prepare_module._Options(
        max_size=prepare_module.DEFAULT_MAX_SIZE,
        max_recipients=envelope.DEFAULT_MAX_RECIPIENTS,
        fallback_id_domain=None,
        dkim=None,
    )
    print(f"{'shape':<30}" + "".join(f" {name:>10}" for name in names) + f" {'total':>8}")
    for shape in ("text", "text+html", "text+html+inline+attachment", "utf-8 headers"):
        totals = [[0.0] * len(names) for _ in range(runs)]
        for run in range(runs):
            for email in next(batches(SHAPES[shape], count)):
                assert isinstance(email, Email)
                marks = [time.process_time()]
                draft = builder.check(email)
                marks.append(time.process_time())
                env = envelope.decide(draft.fields, envelope_from=None, envelope_to=None)
                marks.append(time.process_time())
                message_id = prepare_module._new_message_id(prepare_module._id_domain(env, None))
                marks.append(time.process_time())
                utf8 = draft.fields.utf8
                data = render.render(draft, date=NOW, message_id=message_id, utf8=utf8)
                marks.append(time.process_time())
                prepare_module._finish(
                    data,
                    env,
                    utf8_headers=utf8,
                    options=options,
                    now=NOW,
                    message_id=message_id,
                    subject=email.subject,
                )
                marks.append(time.process_time())
                for index in range(len(names)):
                    totals[run][index] += marks[index + 1] - marks[index]
        medians = [
            statistics.median(totals[run][index] for run in range(runs)) / count * 1e6
            for index in range(len(names))
        ]
        print(
            f"{shape:<30}"
            + "".join(f" {value:>10.1f}" for value in medians)
            + f" {sum(medians):>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per shape (median shown)")
    parser.add_argument("--profile", choices=sorted(SHAPES), help="cProfile one shape instead")
    parser.add_argument("--stages", action="store_true", help="CPU µs per pipeline stage")
    args = parser.parse_args()

    if args.stages:
        stages(args.count, args.runs)
        return

    if args.profile:
        messages = next(batches(SHAPES[args.profile], args.count))
        profiler = cProfile.Profile()
        profiler.runcall(per_call_us, messages, OPTIONS.get(args.profile, {}))
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
        return

    # Warm up imports, compiled regexes and the stdlib's lazily built tables.
    for name, make in SHAPES.items():
        prepare(make(), now=NOW, **OPTIONS.get(name, {}))  # type: ignore[arg-type]
    print(
        f"{'shape':<30} {'CPU µs':>8} {'min':>7} {'max':>7} {'wall µs':>8} {'size':>8}"
        f"   (median of {args.runs} runs of {args.count})"
    )
    for name, make in SHAPES.items():
        source = batches(make, args.count)
        options = OPTIONS.get(name, {})
        figures = [per_call_us(next(source), options) for _ in range(args.runs)]
        cpu = [figure[0] for figure in figures]
        wall = statistics.median(figure[1] for figure in figures)
        size = prepare(make(), now=NOW, **options).size  # type: ignore[arg-type]
        print(
            f"{name:<30} {statistics.median(cpu):>8.1f} {min(cpu):>7.1f} {max(cpu):>7.1f} "
            f"{wall:>8.1f} {size:>7} B"
        )


if __name__ == "__main__":
    main()
