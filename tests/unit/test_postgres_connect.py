"""What mailstrom makes of a PostgreSQL store URL (stores/postgres/connect.py): the
parameters it adds so that a server that vanished is noticed within about a minute (the
URL's own win), and ``prepare_threshold`` and ``lock_timeout``, its own, taken out before
libpq sees them."""

from __future__ import annotations

import psycopg
import pytest

from mailstrom.cli.exits import EX_TEMPFAIL, exit_code_for
from mailstrom.errors import InvalidStoreURL, StoreLocked
from mailstrom.stores.postgres.connect import (
    check_conninfo,
    check_url,
    connection_options,
    split_url,
)
from mailstrom.stores.postgres.locks import LockBound

URL = "postgresql://mail@db.internal/mail"


@pytest.fixture(autouse=True)
def no_env_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)


def test_a_bare_url_gets_keepalives_a_user_timeout_and_a_connect_timeout() -> None:
    options = connection_options(URL)
    assert options["keepalives"] == "1"
    assert options["keepalives_idle"] == "30"
    assert options["keepalives_interval"] == "10"
    assert options["keepalives_count"] == "3"
    assert options["connect_timeout"] == "10"
    if psycopg.pq.version() >= 120000:
        assert options["tcp_user_timeout"] == "60000"
    else:  # an older libpq refuses the keyword
        assert "tcp_user_timeout" not in options


@pytest.mark.parametrize(
    "url",
    [
        URL + "?keepalives_idle=5&connect_timeout=3",
        "host=db.internal dbname=mail keepalives_idle=5 connect_timeout=3",
    ],
)
def test_what_the_url_sets_is_left_to_it(url: str) -> None:
    options = connection_options(url)
    assert "keepalives_idle" not in options and "connect_timeout" not in options
    assert options["keepalives_count"] == "3"


def test_the_callers_connect_timeout_rounds_up_to_a_second() -> None:
    assert connection_options(URL, connect_timeout=0.2)["connect_timeout"] == "1"
    assert connection_options(URL, connect_timeout=30)["connect_timeout"] == "30"


def test_pgconnect_timeout_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "4")
    assert "connect_timeout" not in connection_options(URL)


@pytest.mark.parametrize(
    ("url", "libpq", "threshold"),
    [
        (URL, URL, 5),
        (URL + "?prepare_threshold=none", URL, None),
        (URL + "?prepare_threshold=OFF", URL, None),
        (URL + "?prepare_threshold=0", URL, 0),
        (
            URL + "?sslmode=require&prepare_threshold=none&options=-c%20search_path%3Dmail",
            URL + "?sslmode=require&options=-c%20search_path%3Dmail",
            None,
        ),
    ],
)
def test_prepare_threshold_is_taken_out_of_the_url(
    url: str, libpq: str, threshold: int | None
) -> None:
    conninfo, params = split_url(url)
    assert (conninfo, params.prepare_threshold) == (libpq, threshold)


# "%D9%A3" is ARABIC-INDIC DIGIT THREE: str.isdigit() took it, and int() read it as 3.
@pytest.mark.parametrize("value", ["", "-1", "sometimes", "2.5", "%D9%A3", "\u0663", "%C2%B2"])
def test_a_bad_prepare_threshold_is_an_invalid_store_url(value: str) -> None:
    with pytest.raises(InvalidStoreURL, match="prepare_threshold"):
        split_url(f"{URL}?prepare_threshold={value}")


@pytest.mark.parametrize(
    ("query", "bound"),
    [
        ("", LockBound(ms=30_000, given=False)),  # mailstrom's default, where nobody set one
        ("?lock_timeout=1s", LockBound(ms=1000, given=True)),
        ("?lock_timeout=250ms", LockBound(ms=250, given=True)),
        ("?lock_timeout=2", LockBound(ms=2000, given=True)),  # a bare number is seconds
        ("?lock_timeout=0.5", LockBound(ms=500, given=True)),
        ("?lock_timeout=%202m%20", LockBound(ms=120_000, given=True)),
        ("?lock_timeout=1s&lock_timeout=3s", LockBound(ms=3000, given=True)),  # the last
        ("?lock_timeout=0", None),  # mailstrom sets none: PostgreSQL's own setting stands
        ("?lock_timeout=0s", None),
    ],
)
def test_lock_timeout_is_taken_out_of_the_url(query: str, bound: LockBound | None) -> None:
    conninfo, params = split_url(f"{URL}{query}{'&' if query else '?'}sslmode=require")
    assert conninfo == f"{URL}?sslmode=require"
    assert params.lock_bound == bound
    assert params.prepare_threshold == 5


# 25 days is past PostgreSQL's largest lock_timeout; 0.1ms rounds to 0, which would
# silently mean "no bound"; "%D9%A3" is ARABIC-INDIC DIGIT THREE.
@pytest.mark.parametrize(
    "value", ["", "soon", "-1", "25d", "0.1ms", "1e3", "%D9%A3", "30 seconds", "x" * 300]
)
def test_a_bad_lock_timeout_is_an_invalid_store_url(value: str) -> None:
    with pytest.raises(InvalidStoreURL, match=r"^lock_timeout in a PostgreSQL store URL") as info:
        split_url(f"{URL}?lock_timeout={value}")
    assert "from 1ms to 24 days" in str(info.value)
    assert len(str(info.value)) < 200  # what was given is quoted cut short


@pytest.mark.parametrize(
    ("query", "seconds"),
    [
        ("", 120.0),  # two minutes, where the URL says nothing
        ("?dead_after=30s", 30.0),
        ("?dead_after=5m", 300.0),
        ("?dead_after=90", 90.0),  # a bare number is seconds
        ("?dead_after=1s&dead_after=1d", 86400.0),  # the last
        ("?dead_after=0", None),  # nobody is judged: leases expire
    ],
)
def test_dead_after_is_taken_out_of_the_url(query: str, seconds: float | None) -> None:
    conninfo, params = split_url(f"{URL}{query}{'&' if query else '?'}sslmode=require")
    assert conninfo == f"{URL}?sslmode=require"
    assert params.dead_after == seconds


@pytest.mark.parametrize("value", ["", "soon", "-1", "0.5", "2d", "1e3", "%D9%A3", "x" * 300])
def test_a_bad_dead_after_is_an_invalid_store_url(value: str) -> None:
    with pytest.raises(InvalidStoreURL, match=r"^dead_after in a PostgreSQL store URL") as info:
        split_url(f"{URL}?dead_after={value}")
    assert "from 1s to 1 day" in str(info.value)
    assert len(str(info.value)) < 200


def test_a_lock_waited_for_in_vain_exits_75_like_other_passing_store_errors() -> None:
    assert exit_code_for(StoreLocked("waited 1s for a lock")) == EX_TEMPFAIL


def test_a_malformed_url_is_an_invalid_store_url() -> None:
    """PostgresStore(url) splits the URL first: a bare ValueError from urlsplit was an
    internal error."""
    with pytest.raises(InvalidStoreURL, match="Invalid IPv6 URL"):
        split_url("postgresql://mail@[::1/mail")


def test_what_libpq_cannot_parse_is_an_invalid_store_url() -> None:
    """Not the StoreError (exit 75, try again) that connecting with it would raise."""
    with pytest.raises(InvalidStoreURL, match=r'invalid URI query parameter: "bogus"$'):
        check_conninfo(f"{URL}?bogus=1")
    check_conninfo(f"{URL}?sslmode=require")


@pytest.mark.parametrize("scheme", ["PostgreSQL", "POSTGRES"])
def test_a_scheme_in_capitals_is_the_scheme(scheme: str) -> None:
    """A URL's scheme is case-insensitive (RFC 3986 §3.1), and mailstrom takes
    ``PostgreSQL://`` for a PostgreSQL store; libpq knows the lower-case spellings only,
    and refused it unless a parameter of mailstrom's had the URL written anew."""
    url = f"{scheme}://mail@db.internal/mail?sslmode=require"
    check_url(url)
    assert split_url(url)[0] == f"{scheme.lower()}://mail@db.internal/mail?sslmode=require"
    assert split_url(f"{url}&dead_after=1m")[0] == split_url(url)[0]


def test_libpq_s_reason_is_left_out_when_the_url_holds_a_password() -> None:
    # libpq quotes the token it cannot decode: here, the password.
    with pytest.raises(InvalidStoreURL) as info:
        check_conninfo("postgresql://mail:%zzsecret@db.internal/mail")
    assert "secret" not in str(info.value)
    assert "mail:***@db.internal" in str(info.value)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e12, 0, -1, "30"])
def test_a_timeout_that_is_no_wait_is_an_invalid_argument(timeout: object) -> None:
    """inf raised OverflowError, NaN ValueError, 1e12 OverflowError ("timestamp out of
    range"); 0 or a negative one a StoreUnreachable ("pool initialization incomplete
    after 0 sec") that blamed a server nobody had asked. Refused before connecting."""
    from mailstrom.errors import InvalidArgument
    from mailstrom.stores.postgres import PostgresStore

    with pytest.raises(InvalidArgument, match="timeout"):
        PostgresStore("postgresql://mail@127.0.0.1:1/mail", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize("password", ["pa#ss", "pa?ss", "p@ss", "p[a]ss", "#?@"])
def test_a_password_libpq_takes_unescaped_is_taken_and_never_shown(password: str) -> None:
    """libpq reads a URL's user information up to an ``@`` and takes ``#``, ``?`` or
    ``[`` in a password as they are; urlsplit ended the host there. Such a URL was refused
    as malformed ("Port could not be cast to integer value as 'pa'"), with the password
    in the message, and redact_url, which every log line and error quoting a store URL
    goes through, showed it as it was. (An ``@`` in it ended it for libpq, and the rest
    was taken for the host.)"""
    from psycopg.conninfo import conninfo_to_dict

    from mailstrom.stores.url import check_store_url, redact_url

    url = f"postgresql://mail:{password}@127.0.0.1:5432/mail?sslmode=disable"
    check_store_url(url)
    assert redact_url(url) == "postgresql://mail:***@127.0.0.1:5432/mail?sslmode=disable"
    assert redact_url(f"failed: '{url}': why") == f"failed: '{redact_url(url)}': why"
    for query in ("", "&lock_timeout=5s&dead_after=1m"):
        conninfo, params = split_url(url + query)
        assert conninfo_to_dict(conninfo) == {
            "user": "mail",
            "password": password,
            "host": "127.0.0.1",
            "port": "5432",
            "dbname": "mail",
            "sslmode": "disable",
        }
    assert params.lock_bound == LockBound(ms=5000, given=True)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mail:correct horse battery@127.0.0.1/mail",
        "postgresql://mail@127.0.0.1/mail?password=correct horse battery",
        # Malformed for urlsplit too (a "/" ends libpq's user information: %2F).
        "postgresql://mail:correct horse/battery@127.0.0.1/mail",
    ],
)
def test_a_password_with_spaces_is_never_shown(url: str) -> None:
    """A passphrase written unencoded in a store URL (libpq refuses the spaces) was quoted
    whole in the error, and libpq's reason quoted it again: redact_url ended a password at
    the first space, so it found none to hide (or hid its first word alone)."""
    from mailstrom.stores.url import check_store_url, redact_url

    with pytest.raises(InvalidStoreURL) as caught:
        check_store_url(url)
    shown = [str(caught.value), redact_url(url), redact_url(f"lost {url}: why")]
    for text in shown:
        assert not [word for word in ("correct", "horse", "battery") if word in text], text


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=bogus",
        "sslmode=Require",
        "gssencmode=yes",
        "channel_binding=maybe",
        "target_session_attrs=master",
        "connect_timeout=abc",
        "keepalives_idle=x",
        "tcp_user_timeout=1.5",
    ],
)
def test_an_option_value_libpq_refuses_is_an_invalid_store_url(query: str) -> None:
    """libpq refuses such a value only when it connects: the store then failed with
    StoreUnreachable ("connection is bad: invalid sslmode value"), exit 75, and a worker
    waited for a server that was never the trouble. Refused before connecting, as
    InvalidStoreURL (exit 64), by a configuration check too."""
    from mailstrom.stores.postgres import PostgresStore

    with pytest.raises(InvalidStoreURL, match=query.partition("=")[0]):
        check_url(f"{URL}?{query}")
    with pytest.raises(InvalidStoreURL):
        PostgresStore(f"postgresql://mail:secret@127.0.0.1:1/mail?{query}", timeout=1)


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=verify-full",
        "sslmode=disable&gssencmode=disable&channel_binding=prefer",
        "target_session_attrs=prefer-standby",
        "connect_timeout=5&keepalives=0&keepalives_idle=%2060&tcp_user_timeout=-1",
    ],
)
def test_option_values_libpq_takes_are_taken(query: str) -> None:
    check_url(f"{URL}?{query}")


@pytest.mark.parametrize("password", ["s3cr/Et9x", "s3cr/Et9x@q", "s3cr:Et9x/"])
def test_a_password_holding_a_slash_is_refused_without_being_shown(password: str) -> None:
    """libpq ends a URL's authority at the first "/", so a "/" in a password must be
    written %2F. Unwritten so, the URL is malformed ("user:s3cr" is a host and a port
    that is no number), and the error quoted it whole, password and all, and named the
    part before the "/" as the port."""
    from mailstrom.stores.url import check_store_url

    with pytest.raises(InvalidStoreURL, match="malformed store URL") as raised:
        check_store_url(f"postgresql://mail:{password}@127.0.0.1:5432/mail")
    shown = str(raised.value)
    assert "s3cr" not in shown
    assert "Et9x" not in shown
    assert "%2F" in shown  # how to write it


def test_a_store_given_such_a_url_refuses_it_without_showing_the_password() -> None:
    """PostgresStore itself: libpq read "mail" as the host and "s3cr" as the port, and
    connecting failed as a server out of reach (StoreUnreachable, waited for by a
    worker), not as the mistake in the URL."""
    from mailstrom.stores.postgres import PostgresStore

    with pytest.raises(InvalidStoreURL, match="%2F") as raised:
        PostgresStore("postgresql://mail:s3cr/Et9x@127.0.0.1:5432/mail", timeout=2)
    assert "s3cr" not in str(raised.value)
    assert "Et9x" not in str(raised.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A user name holding what libpq takes in it: "?", "#", "@" (escaped by split_url).
        ("postgresql://a?b:s3cret@db/m", "postgresql://a?b:***@db/m"),
        ("postgresql://a#b:s3cret@db/m", "postgresql://a#b:***@db/m"),
        ("postgresql://a@b:s3cret@db/m", "postgresql://a@b:***@db/m"),
        # A quoted conninfo value holding an escaped quote.
        (r"host=db password='s3\'cret' user=x", "host=db password=*** user=x"),
        # A raw "/" (to be written %2F): libpq reads "app" as the host, the password's
        # start as its port, and fails; the password is no less a secret.
        ("postgresql://app:s3/cret@db/mail", "postgresql://app:***@db/mail"),
        (
            "lost postgresql://app:s3/c/ret@db/m?user=x@y: why",
            "lost postgresql://app:***@db/m?user=x@y: why",
        ),
        ("postgresql://app:s3/c@et@db:5432/m", "postgresql://app:***@db:5432/m"),
        # Nothing hidden where there is no password: a port before the path.
        ("postgresql://db:5432/m?user=x@y", "postgresql://db:5432/m?user=x@y"),
        ("postgresql://h1:5432,h2:5433/m?user=x@y", "postgresql://h1:5432,h2:5433/m?user=x@y"),
        ("postgresql://[::1]:5432/m?user=x@y", "postgresql://[::1]:5432/m?user=x@y"),
        (
            "postgresql://app@db:5432/m to bob@example.org",
            "postgresql://app@db:5432/m to bob@example.org",
        ),
    ],
)
def test_redact_url_hides_every_password_libpq_would_parse(text: str, shown: str) -> None:
    """redact_url read a user name as ending at "?", "#" or "@" and a quoted value as
    ending at its first quote, escaped or not, so a password after them was shown (or its
    end); and a password holding a raw "/" was shown whole."""
    from psycopg.conninfo import conninfo_to_dict

    from mailstrom.stores.url import escape_userinfo, redact_url

    assert redact_url(text) == shown
    if "s3cret@" in text:  # the user names libpq takes, with the password after them
        assert conninfo_to_dict(escape_userinfo(text))["password"] == "s3cret"
