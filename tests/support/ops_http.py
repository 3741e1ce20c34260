"""Reading an ops server's pages (``/metrics``, ``/healthz``) as a scraper or a probe does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of a scrape, by name and sorted labels."""


def scrape(url: str) -> Samples:
    """``url``/metrics, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def healthz(url: str) -> tuple[int, dict[str, Any]]:
    """``url``/healthz: the status code and the JSON body, whatever the code."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())
