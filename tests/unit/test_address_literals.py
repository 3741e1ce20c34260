"""An address literal's domain as validation hands it on: in the form it accepts again."""

from __future__ import annotations

import pytest

from mailstrom.bounces.notice import mailer_daemon_domain
from mailstrom.message.addrspec import validate_address


@pytest.mark.parametrize(
    ("written", "envelope"),
    [
        ("bob@[IPv6:2001:DB8:0::1]", "bob@[IPv6:2001:db8::1]"),
        ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
        ("Bob@Mail.Example.ORG", "Bob@mail.example.org"),
    ],
)
def test_the_envelope_form_validates_again_unchanged(written: str, envelope: str) -> None:
    # Was: "bob@[ipv6:2001:db8::1]", which email-validator before 2.4 refuses (the tag is
    # matched case-sensitively there): a bounce notice from such a host was never sent.
    assert validate_address(written).envelope == envelope
    assert validate_address(envelope).envelope == envelope


def test_a_bounce_notice_from_an_ipv6_literal_host_has_a_valid_sender() -> None:
    assert mailer_daemon_domain(["[IPv6:2001:db8::1]"]) == "[IPv6:2001:db8::1]"
