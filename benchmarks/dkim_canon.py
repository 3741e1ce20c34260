"""DKIM relaxed body canonicalisation (RFC 6376 §3.4.4) of bodies with many runs of white
space, beside a regular expression per run (how mailstrom did it before) and the SHA-256
the signer takes of the result anyway. Milliseconds per MiB, best of ``--runs``.

    .venv/bin/python benchmarks/dkim_canon.py [--mib 16] [--runs 3]

A body of tab-separated values sent as text holds millions of runs: replaced one by one,
they took seconds of ``prepare()`` and of the worker's event loop when it signed anew.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
from collections.abc import Callable

from mailstrom.dkim.canon import relaxed_body

_WSP_RUN = re.compile(rb"[ \t]+")

SHAPES = {
    "tab-separated": b"12\t34\t" * 140,
    "space-tab": b"a \t" * 330,
    "double spaces": b"x  " * 330,
    "one run a line": b" " * 998,
    "prose": b"The quick brown fox jumps over the lazy dog. " * 20,
}


def by_regular_expression(body: bytes) -> bytes:
    """As mailstrom's relaxed_body was before: a substitution per run of WSP."""
    if b"\t" in body or b"  " in body or b" \r\n" in body or body.endswith(b" "):
        body = _WSP_RUN.sub(b" ", body).replace(b" \r\n", b"\r\n")
        if body.endswith(b" "):
            body = body[:-1]
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def best(function: Callable[[bytes], object], data: bytes, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function(data)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=16.0, help="body size per shape")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = int(args.mib * (1 << 20))
    print(f"relaxed body canonicalisation, ms per MiB (best of {args.runs}), {args.mib:g} MiB")
    print(f"{'shape':16}{'sha256':>10}{'mailstrom':>12}{'regex/run':>12}{'ratio':>8}")
    for name, line in SHAPES.items():
        body = (line + b"\r\n") * max(1, size // (len(line) + 2))
        assert relaxed_body(body) == by_regular_expression(body)
        mib = len(body) / (1 << 20)
        hashing = best(lambda data: hashlib.sha256(data).digest(), body, args.runs) / mib
        ours = best(relaxed_body, body, args.runs) / mib
        regex = best(by_regular_expression, body, args.runs) / mib
        print(
            f"{name:16}{hashing * 1000:10.2f}{ours * 1000:12.2f}{regex * 1000:12.2f}"
            f"{regex / ours:8.1f}"
        )
    print("ratio: the regular expression's time ÷ mailstrom's")


if __name__ == "__main__":
    main()
