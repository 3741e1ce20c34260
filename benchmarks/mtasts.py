"""MTA-STS: what the TLS decision costs per connection once a worker knows the answer.

Prints µs per ``TLSDecider.requirement()`` call (best of ``--repeat`` runs; no assertions)
awaited inside one coroutine, for a destination whose MTA-STS state this worker already
looked up: MTA-STS off (the baseline), on for a domain that publishes no record, and on
for a domain with an ``enforce`` policy (cached in the store, so nothing is fetched). The
first call of each domain asks the loopback DNS server; the measured calls ask nobody.
Also µs per ``parse_policy`` of a four-line policy file.

    .venv/bin/python benchmarks/mtasts.py [-n 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import timeit
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.dns_server import LoopbackDNS

from mailstrom.config import Config, MTASTSConfig
from mailstrom.mtasts.hook import for_worker
from mailstrom.mtasts.policy import CachedPolicy, parse_policy
from mailstrom.stores import MemoryStore
from mailstrom.tls.decide import Destination, TLSDecider

POLICY = b"version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 604800\n"


async def direct(method, *args, **kwargs):  # type: ignore[no-untyped-def]
    return method(*args, **kwargs)


async def per_call(decider: TLSDecider, destination: Destination, number: int) -> float:
    await decider.requirement(destination)  # the first look: DNS (and the store)
    began = timeit.default_timer()
    for _ in range(number):
        await decider.requirement(destination)
    return (timeit.default_timer() - began) / number * 1e6


async def measure(dns: LoopbackDNS, number: int, repeat: int) -> dict[str, float]:
    now = datetime.now(UTC)
    store = MemoryStore()
    store.save_mta_sts_policy(CachedPolicy.of("sts.test", "b1", parse_policy(POLICY), now))
    base = Config(helo_name="bench.test", dns=dns.dns_config)
    off = TLSDecider.for_config(base)
    config = Config(helo_name="bench.test", dns=dns.dns_config, mta_sts=MTASTSConfig())
    hook = for_worker(config, store, None, store_call=direct, clock=lambda: datetime.now(UTC))
    assert hook is not None
    on = TLSDecider.for_config(config, mta_sts=hook)
    cases = {
        "mta_sts off": (off, Destination(domain="plain.test", mx_host="mx.plain.test")),
        "on, no record": (on, Destination(domain="plain.test", mx_host="mx.plain.test")),
        "on, enforce policy": (on, Destination(domain="sts.test", mx_host="mx1.sts.test")),
    }
    results: dict[str, float] = {}
    for name, (decider, destination) in cases.items():
        results[name] = min([await per_call(decider, destination, number) for _ in range(repeat)])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with LoopbackDNS() as dns:
        dns.txt("_mta-sts.sts.test", "v=STSv1; id=b1;")
        results = asyncio.run(measure(dns, args.number, args.repeat))
    timer = timeit.Timer(lambda: parse_policy(POLICY))
    parse = min(timer.repeat(repeat=args.repeat, number=args.number)) / args.number * 1e6
    print(f"{'TLS decision per connection':<30}{'µs':>8}")
    for name, micros in results.items():
        print(f"{name:<30}{micros:>8.2f}")
    print(f"{'parse_policy (4 lines)':<30}{parse:>8.2f}")


if __name__ == "__main__":
    main()
