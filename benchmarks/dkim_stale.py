"""DKIM at delivery: what looking whether a signed message must be signed anew costs.

The worker asks it of every signed message at every attempt, as the transaction is
submitted (``ResignedMessages.sign``, which calls ``resign_stale_top``). Almost every
answer is "no, it goes as it is": those are the rows timed here, on messages
``prepare()`` signed with RSA-2048 and Ed25519 keys, an hour after queueing. Prints µs per
call, best of ``--repeat`` timeit runs, as CPU time of the process (``process_time``:
what the check costs, whatever else the host runs) and as wall time (``perf_counter``:
what it took here, waits for a shared CPU included). No assertions.

    .venv/bin/python benchmarks/dkim_stale.py [-n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import timeit
from datetime import UTC, datetime, timedelta

from mailstrom.dkim import DKIMAlgorithm, DKIMConfig, DKIMKey, generate_private_key
from mailstrom.dkim.resigned import ResignedMessages
from mailstrom.dkim.signing import resign_stale_top
from mailstrom.message import Email, prepare

RSA, ED25519 = DKIMAlgorithm.RSA_SHA256, DKIMAlgorithm.ED25519_SHA256
QUEUED = datetime(2026, 12, 6, 12, tzinfo=UTC)
SENT = QUEUED + timedelta(hours=1)
# The application's own signature of the domain, below those prepare() puts on top.
APPLICATION_S = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=app1;\r\n"
    b" t=1765000000; h=from:to:subject:date:message-id;\r\n"
    b" bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b" b=" + b"A" * 69 + b"\r\n" + b"".join(b" " + b"A" * 72 + b"\r\n" for _ in range(4))
)


def email() -> Email:
    return Email(
        from_="Shop <shop@example.com>",
        to=["Bob <bob@example.org>"],
        cc=["Carol <carol@example.org>"],
        reply_to=["help@example.com"],
        subject="Your order has shipped",
        text="Hello Bob,\n\nyour parcel is on its way.\n" * 20,
        html="<p>Hello Bob,</p><p>your parcel is on its way.</p>\n" * 20,
        unsubscribe_url="https://example.com/u?t=abc",
        feedback_id="march:c42:invoice:shop",
    )


def rows() -> dict[str, tuple[bytes, DKIMConfig]]:
    rsa = DKIMKey(domain="example.com", selector="s2026r", private_key=generate_private_key(RSA))
    ed = DKIMKey(
        domain="example.com",
        selector="s2026e",
        private_key=generate_private_key(ED25519),
        algorithm=ED25519,
    )
    week = timedelta(days=7)
    made: dict[str, tuple[bytes, DKIMConfig]] = {}
    for name, dkim in (
        ("rsa, x=", DKIMConfig(keys=(rsa,), expire=week)),
        ("rsa + ed25519, no x=", DKIMConfig(keys=(rsa, ed))),
        ("rsa + ed25519, x=", DKIMConfig(keys=(rsa, ed), expire=week)),
    ):
        made[name] = prepare(email(), now=QUEUED, dkim=dkim).data, dkim
    dual = made["rsa + ed25519, x="][1]
    raw = APPLICATION_S + prepare(email(), now=QUEUED).data
    made["rsa + ed25519, x=, app's own"] = prepare(raw, now=QUEUED, dkim=dual).data, dual
    # Signed by a subdomain's keys, the application's own signature of the parent below.
    news = DKIMConfig(
        keys=[dataclasses.replace(k, domain="news.example.com") for k in (rsa, ed)], expire=week
    )
    raw = (
        APPLICATION_S
        + prepare(
            dataclasses.replace(email(), from_="Shop <shop@news.example.com>"), now=QUEUED
        ).data
    )
    made["rsa + ed25519 of a subdomain, x=, app's own of the parent"] = (
        prepare(raw, now=QUEUED, dkim=news).data,
        news,
    )
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    made = rows()
    width = max(map(len, made)) + len(" (worker)")
    print(f"{'signatures':<{width}}  µs CPU  µs wall")
    for name, (data, dkim) in made.items():
        assert resign_stale_top(data, dkim, now=SENT) is None, name
        worker = ResignedMessages(dkim)
        for label, call in (
            (name, lambda d=data, k=dkim: resign_stale_top(d, k, now=SENT)),
            (f"{name} (worker)", lambda d=data, w=worker: w.sign("m1", d, now=SENT)),
        ):
            cpu, wall = (
                min(timeit.repeat(call, number=args.number, repeat=args.repeat, timer=timer))
                / args.number
                * 1e6
                for timer in (time.process_time, time.perf_counter)
            )
            print(f"{label:<{width}}  {cpu:6.2f}  {wall:7.2f}")


if __name__ == "__main__":
    main()
