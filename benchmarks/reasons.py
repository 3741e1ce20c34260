"""Reply classes: the cost of classifying one failed reply.

Prints µs per call (best of ``--repeat`` timeit runs; no assertions). The table is loaded
before timing, as the worker does when it starts. Rows go from the cheapest path (a
provider's code known exactly) to the dearest (a vague reply no rule recognises, which
every text heuristic for its code must look at).

    .venv/bin/python benchmarks/reasons.py [-n 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import timeit

from mailstrom.policy.reasons import classify_reply, table
from mailstrom.status import SMTPReply

GMAIL_5726 = (
    "This mail has been blocked because the sender is\nunauthenticated. Gmail requires all "
    "senders to authenticate with either SPF\nor DKIM.\n\nAuthentication results:\nDKIM = "
    "did not pass\nSPF [example.com] with ip: [192.0.2.1] = did not pass\n\nFor instructions "
    "go to\nhttps://support.google.com/mail/answer/81126 a1si2 - gsmtp"
)

REPLIES = {
    "Microsoft 451 4.7.650 (code known)": SMTPReply(
        code=451,
        enhanced="4.7.650",
        text="The mail server [192.0.2.1] has been temporarily rate limited due to IP "
        "reputation. (S775)",
    ),
    "550 5.1.1 (enhanced detail decides)": SMTPReply(
        code=550,
        enhanced="5.1.1",
        text="<bob@example.org>: Recipient address rejected: User unknown in virtual table",
    ),
    "Gmail 550 5.7.26 (code + marker)": SMTPReply(code=550, enhanced="5.7.26", text=GMAIL_5726),
    "Yahoo 421 4.7.0 [TSS04] (after 5 rules)": SMTPReply(
        code=421,
        enhanced="4.7.0",
        text="[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume "
        "or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
    ),
    "Gmail 550 5.7.1 (last of 7 rules)": SMTPReply(
        code=550,
        enhanced="5.7.1",
        text="The user or domain that you are sending to (or from) has a policy that\n"
        "prohibited the mail that you sent. a1si2 - gsmtp",
    ),
    "451 4.7.1 greylisted (2nd heuristic)": SMTPReply(
        code=451,
        enhanced="4.7.1",
        text="<bob@example.org>: Recipient address rejected: Greylisted, see "
        "http://postgrey.example/help/example.org.html",
    ),
    "421 without enhanced code (no rule)": SMTPReply(
        code=421, text="mx.example.org Service not available, closing transmission channel"
    ),
    "554 5.7.1 vague (every heuristic)": SMTPReply(
        code=554,
        enhanced="5.7.1",
        text="Message refused by local policy; contact postmaster@example.org quoting 0a1b2c3d",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    began = timeit.default_timer()
    table.cache_clear()
    table()
    print(f"table load: {(timeit.default_timer() - began) * 1e3:.1f} ms")
    width = max(map(len, REPLIES))
    print(f"{'reply':<{width}}  µs/classify  class")
    for name, reply in REPLIES.items():
        best = min(
            timeit.repeat(lambda r=reply: classify_reply(r), number=args.number, repeat=args.repeat)
        )
        print(f"{name:<{width}}  {best / args.number * 1e6:11.2f}  {classify_reply(reply)}")


if __name__ == "__main__":
    main()
