"""Routing: the cost of one route for a domain whose route is already cached.

Prints µs per call (best of ``--repeat`` timeit runs; no assertions). A loopback DNS server
answers the first lookup of each domain; after that every call is served from the router's
cache, so the figures are pure CPU: ``Router.route`` awaited inside one coroutine (no event
loop turn per call), and ``Router.cached`` (the synchronous fast path) where it exists.

Domains: ``one.test`` (one MX host: nothing to shuffle), ``distinct.test`` (two MX hosts
of distinct preferences: nothing to shuffle) and ``equal.test`` (three MX hosts of equal
preference: shuffled on every call).

    .venv/bin/python benchmarks/route_cache.py [-n 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import timeit
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.dns_server import LoopbackDNS

from mailstrom.config import Config
from mailstrom.routing import Router

DOMAINS = {
    "one.test": [(10, "mx1.one.test")],
    "distinct.test": [(10, "mx1.distinct.test"), (20, "mx2.distinct.test")],
    "equal.test": [(10, "mx1.equal.test"), (10, "mx2.equal.test"), (10, "mx3.equal.test")],
}


def make_router(dns: LoopbackDNS) -> Router:
    config = Config(helo_name="bench.test", dns=dns.dns_config)
    for_config = getattr(Router, "for_config", None)
    if for_config is not None:
        return for_config(config)  # type: ignore[no-any-return]
    return Router(config.dns)  # before the route cache by domain string


async def measure(router: Router, number: int, repeat: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for domain in DOMAINS:
        await router.route(domain)  # warm the cache

        async def routes(domain: str = domain) -> float:
            began = timeit.default_timer()
            for _ in range(number):
                await router.route(domain)
            return timeit.default_timer() - began

        best = min([await routes() for _ in range(repeat)])
        row = {"route": best / number * 1e6}
        cached = getattr(router, "cached", None)
        if cached is not None:
            timer = timeit.Timer(lambda domain=domain, cached=cached: cached(domain))
            row["cached"] = min(timer.repeat(repeat=repeat, number=number)) / number * 1e6
        results[domain] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with LoopbackDNS() as dns:
        for domain, hosts in DOMAINS.items():
            dns.mx(domain, hosts)
            for _, host in hosts:
                dns.a(host, "192.0.2.1")
        results = asyncio.run(measure(make_router(dns), args.number, args.repeat))
    print(f"{'domain':<16}{'route() µs':>12}{'cached() µs':>13}")
    for domain, row in results.items():
        cached = f"{row['cached']:.2f}" if "cached" in row else "-"
        print(f"{domain:<16}{row['route']:>12.2f}{cached:>13}")


if __name__ == "__main__":
    main()
