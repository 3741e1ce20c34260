"""Whether a name, an address or an HTTP ``Host`` header means this host by loopback.

The dashboard without a token and the metrics server on a loopback address answer only
requests that name them this way. A page on another site can rebind its own name to
127.0.0.1 (DNS rebinding): the browser then sends that page's requests, with the page's
name as ``Host``, to a server on loopback, and lets the page read the answers, since to
the browser they come from the page's own origin. Such requests are refused by name.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, their IPv4-mapped form ``::ffff:127.0.0.1`` and
    ``localhost``; False for every other address or name (a wildcard address such as
    0.0.0.0 listens on every interface).

    Only the IPv4-mapped form of 127.0.0.0/8 is this host: a dual-stack socket bound to
    it listens on 127.0.0.1, so a server there needs the same ``Host`` check. The other
    IPv6 forms that carry an IPv4 address (NAT64, 6to4, Teredo) lead through a translator
    or relay elsewhere, never to this host's loopback. (Python 3.11's ``is_loopback``
    does not look inside an IPv4-mapped address.)
    """
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def names_loopback(host_header: str | None) -> bool:
    """Whether a request's ``Host`` header names this host by a loopback name or address
    (``localhost``, ``127.0.0.1:8025``, ``[::1]:8025``)."""
    host = host_of(host_header)
    return host is not None and is_loopback(host)


def host_of(host_header: str | None) -> str | None:
    """The host a ``Host`` header (or a URL's authority) names, without its port or an
    IPv6 address's brackets, in lower case and without a final dot (``"Dash.Example.:80"``
    → ``"dash.example"``); None when there is none."""
    if not host_header:
        return None
    if host_header.startswith("["):  # [::1] or [::1]:8025
        host = host_header[1 : host_header.find("]")] if "]" in host_header else ""
    else:
        host = host_header.rpartition(":")[0] if ":" in host_header else host_header
    return host.lower().removesuffix(".")
