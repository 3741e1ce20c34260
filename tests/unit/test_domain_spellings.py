"""A domain typed in capitals finds the domain its recipients are queued at.

Recipients' domains are stored as IDNA 2008 gives them (UTS #46 maps a capital sigma to
the small sigma). ``str.lower()`` does not: it writes the final sigma where no letter
follows, before a hyphen or a digit too, and the final sigma is a letter of another
domain's name. Lowered first, a Greek domain in capitals with a sigma before a hyphen
became an A-label no recipient has.
"""

from __future__ import annotations

import pytest

from mailstrom.config import Config
from mailstrom.message.addrspec import validate_address
from mailstrom.stores.operator import filter_domain, normalize_domain
from mailstrom.suppression import normalize_target, stored_forms

# Greek capitals, a sigma before a hyphen:
ELLAS_NEA = "\u0395\u039b\u039b\u0391\u03a3-\u039d\u0395\u0391.example"
SPELLINGS = [
    ELLAS_NEA,
    "\u0391\u03a39.example",
    "mail.\u03a4\u0395\u03a3\u03a4\u0391\u03a3",
    ELLAS_NEA + ".",
]


def queued(domain: str) -> str:
    """The domain a recipient at ``domain`` is queued with."""
    return validate_address("bob@" + domain.rstrip(".")).envelope.rpartition("@")[2]


@pytest.mark.parametrize("domain", SPELLINGS)
def test_filters_and_destinations_name_the_queued_domain(domain: str) -> None:
    assert queued(domain).startswith(("xn--", "mail.xn--"))
    assert filter_domain(domain) == queued(domain)  # queue --domain, QueueFilter, dashboard
    assert normalize_domain(domain) == queued(domain)  # suspend, resume, destinations


@pytest.mark.parametrize("domain", SPELLINGS[:3])
def test_a_suppression_entry_applies_to_the_queued_domain(domain: str) -> None:
    # Kept under the lowered form, the entry was listed and suppressed nobody.
    assert normalize_target(domain) == queued(domain)
    assert normalize_target("Bob@" + domain) == "bob@" + queued(domain)


@pytest.mark.parametrize("domain", SPELLINGS[:3])
def test_an_entry_with_a_quoted_local_part_applies_to_the_queued_domain(domain: str) -> None:
    # The quotes were taken off the lowered text, its domain with them.
    assert normalize_target('"Bob"@' + domain) == "bob@" + queued(domain)
    assert normalize_target('<"John Doe"@' + domain + ">") == '"john doe"@' + queued(domain)


def test_removing_reaches_the_entry_earlier_builds_stored_after_str_lower() -> None:
    # Before, a_label(text.lower()): the final sigma's A-label, kept by those builds.
    final_sigma = "bob@xn----ylbbnc7aas7b.example"
    for text in ("Bob@" + ELLAS_NEA, '"Bob"@' + ELLAS_NEA):
        forms = stored_forms(text)
        assert forms[0] == "bob@" + queued(ELLAS_NEA) != final_sigma
        assert final_sigma in forms
        assert len(forms) == len(set(forms))
    assert stored_forms("bob@Bücher.example") == [
        "bob@xn--bcher-kva.example",
        "bob@bücher.example",
    ]


def test_metrics_domains_count_the_queued_domain() -> None:
    config = Config(helo_name="mail.example.com", metrics_domains=SPELLINGS)
    assert config.metrics_domains == tuple(queued(d) for d in SPELLINGS)
