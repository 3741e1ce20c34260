"""No sequence of bytes from an SMTP peer makes :class:`SMTPConnection` misbehave.

A scripted raw asyncio peer on 127.0.0.1 answers each thing the client sends (the
connection itself, each command line, each final dot; after a 2xx to STARTTLS, each chunk
of what should be a TLS handshake) with the next answer of a hypothesis-generated script:
mostly what a good server says, and here and there a wrong code, a malformed or unsolicited
line, random bytes, a 421, a hang-up or silence, written in several pieces. The client opens
a connection, submits one to three transactions and closes it. Whatever the peer did:

1. every outcome is a :class:`TransactionResult` or a :class:`DeliveryError`, never
   another exception (an escaping ``LocalProtocolError``, ``AssertionError``, ``KeyError``);
2. everything ends well within a bound set by the (short) timeouts: no hang;
3. asyncio logs nothing (no "Exception in callback", "Fatal error on transport", "Task
   exception was never retrieved");
4. the results hold together, and the engine's reading of them (``Outcomes``) delivers a
   recipient only on a 2xx to its RCPT and a 2xx to the final dot.

``MAILSTROM_FUZZ_EXAMPLES`` sets how many examples to run (150 by default), for a longer
search by hand (pytest-timeout's 120 s is for the whole test, so lift it):
``MAILSTROM_FUZZ_EXAMPLES=2000 pytest --timeout=0 tests/integration/test_peer_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mailstrom import Config, Timeouts
from mailstrom.errors import DeliveryError, SMTPProtocolError
from mailstrom.runtime.connection import SMTPConnection, StartTLS, TransactionResult
from mailstrom.runtime.outcomes import Outcomes, Where
from mailstrom.status import RecipientState
from mailstrom.stores.base import LeasedRecipient, WorkItem

TIMEOUT = 0.3
QUICK = Timeouts(
    connect=TIMEOUT,
    greeting=TIMEOUT,
    command=TIMEOUT,
    data_init=TIMEOUT,
    data_block=TIMEOUT,
    data_end=TIMEOUT,
)
BOUND = 3.0
"""Longest an example may take: one timeout ends the session, so a few timeouts at most."""
IDLE = 0.05
"""The peer hangs up after this long without a command: a client waiting for the rest of
a reply the script left unfinished ends quickly, not after a timeout (explicit silence in
the script covers the timeouts)."""
EXAMPLES = int(os.environ.get("MAILSTROM_FUZZ_EXAMPLES", "150"))
MAX_RANDOM = 2048
"""Most random octets in one answer."""
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


# --- what the peer says ------------------------------------------------------------------


class Unit(StrEnum):
    """What the client sent that the peer answers."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DOT = "."
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    TLS = "tls"
    """A chunk of the TLS handshake the client started after a 2xx to STARTTLS."""
    OTHER = "other"


_VERBS = {unit.value.encode(): unit for unit in Unit if unit.value.isupper()}


class Kind(StrEnum):
    GOOD = "good"
    """What a good server says to this command (a 220/250/354/221)."""
    REFUSE = "refuse"
    """A 4xx or 5xx refusal."""
    CODE = "code"
    """Any three digits, right or wrong for the command (1xx, 3xx to RCPT, 6xx, 999...)."""
    CLOSING = "421"
    MALFORMED = "malformed"
    RANDOM = "random"
    CLOSE = "close"
    """Hang up without a word."""
    SILENCE = "silence"
    """Say nothing, ever: the client's timeout must end it."""


@dataclass(frozen=True, slots=True)
class Answer:
    kind: Kind = Kind.GOOD
    code: int = 0
    enhanced: str | None = None
    lines: int = 1
    raw: bytes = b""
    extra: bytes = b""
    """Unsolicited lines after the answer, in the same write."""
    splits: tuple[int, ...] = ()
    """Offsets at which the answer is cut into separate writes."""
    close_after: bool = False


@dataclass(frozen=True, slots=True)
class Style:
    """How the good answers look in one example."""

    extensions: tuple[str, ...]
    enhanced: bool
    multiline: bool


@dataclass(frozen=True, slots=True)
class Script:
    style: Style
    answers: dict[int, Answer]
    """By the position of what they answer (0 is the greeting)."""
    by_command: dict[tuple[Unit, int], Answer]
    """By command and its occurrence (the second RCPT, the first RSET), where ``answers``
    has none. The rest are good."""

    def answer(self, units: Sequence[Unit]) -> Answer:
        """The answer to the last of ``units``, the things answered so far."""
        position = len(units) - 1
        occurrence = units.count(units[-1]) - 1
        answer = self.answers.get(position) or self.by_command.get((units[-1], occurrence))
        return answer or Answer()


_GOOD: dict[Unit, tuple[int, str, str]] = {
    Unit.GREETING: (220, "", "peer.test ESMTP"),
    Unit.HELO: (250, "", "peer.test"),
    Unit.STARTTLS: (220, "2.0.0", "Ready to start TLS"),
    Unit.AUTH: (235, "2.7.0", "Authentication successful"),
    Unit.MAIL: (250, "2.1.0", "Ok"),
    Unit.RCPT: (250, "2.1.5", "Ok"),
    Unit.DATA: (354, "", "End data with <CR><LF>.<CR><LF>"),
    Unit.DOT: (250, "2.0.0", "Ok: queued as 4Fz"),
    Unit.RSET: (250, "2.0.0", "Ok"),
    Unit.NOOP: (250, "2.0.0", "Ok"),
    Unit.QUIT: (221, "2.0.0", "Bye"),
    Unit.OTHER: (500, "5.5.2", "Error: command not recognized"),
}


def reply(code: int, enhanced: str | None, texts: Sequence[str]) -> bytes:
    """``code`` with each of ``texts`` on its own line (``enhanced`` before each)."""
    prefix = f"{enhanced} " if enhanced else ""
    lines = [
        f"{code:03d}{' ' if i == len(texts) - 1 else '-'}{prefix}{text}"
        for i, text in enumerate(texts)
    ]
    return "".join(line + "\r\n" for line in lines).encode()


def good(unit: Unit, style: Style, lines: int) -> bytes:
    if unit is Unit.EHLO:
        return reply(250, None, ["peer.test", *style.extensions])
    if unit is Unit.TLS:
        return b"this is not TLS\r\n"  # a server that said 220 but cannot do TLS
    code, enhanced, text = _GOOD[unit]
    texts = [f"{text} ({n})" for n in range(1, lines)] + [text]
    return reply(code, enhanced if style.enhanced and enhanced else None, texts)


def render(answer: Answer, unit: Unit, style: Style) -> bytes:
    """The octets ``answer`` puts on the wire for ``unit``."""
    if answer.kind is Kind.GOOD:
        lines = answer.lines if answer.lines > 1 or not style.multiline else 2
        body = good(unit, style, lines)
    elif answer.kind in (Kind.REFUSE, Kind.CODE, Kind.CLOSING):
        texts = [f"line {n}" for n in range(1, answer.lines)] + ["refused"]
        body = reply(answer.code, answer.enhanced, texts)
    elif answer.kind in (Kind.MALFORMED, Kind.RANDOM):
        body = answer.raw
    else:
        body = b""
    return body + answer.extra


def pieces(data: bytes, splits: tuple[int, ...]) -> list[bytes]:
    cuts = sorted({s % (len(data) + 1) for s in splits} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


# --- the scripted peer -------------------------------------------------------------------


@dataclass
class Transcript:
    """What the peer saw and said, and how it ended."""

    units: list[Unit] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    errors: list[BaseException] = field(default_factory=list)


class Hangup(Exception):
    """The script says the peer hangs up now."""


class ScriptedPeer:
    """Answers one connection per example with the script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.transcript = Transcript()
        self.last_said = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (Hangup, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug in this peer: reported by the test
            self.transcript.errors.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = await self._answer(Unit.GREETING, reader, writer)
        while True:
            if tls:
                # The client is talking TLS to a peer that cannot: each chunk gets the
                # next answer (rendered as garbage) until the script or the client ends.
                chunk = await asyncio.wait_for(reader.read(4096), IDLE)
                if not chunk:
                    return
                await self._answer(Unit.TLS, reader, writer)
                continue
            line = await asyncio.wait_for(reader.readline(), IDLE)
            if not line:
                return
            # After a 334 challenge the client's next line is its AUTH response.
            unit = Unit.AUTH if self._challenged() else _unit(line)
            if unit is None:
                continue  # a line of the message content
            tls = await self._answer(unit, reader, writer)

    def _challenged(self) -> bool:
        """True when the last answer was a 334 challenge to AUTH."""
        last_line = self.last_said.rstrip(b"\r\n").rpartition(b"\n")[2]
        units = self.transcript.units
        return bool(units) and units[-1] is Unit.AUTH and last_line.startswith(b"334")

    async def _answer(
        self, unit: Unit, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Say the next answer; True when it was a 2xx to STARTTLS (TLS should start)."""
        transcript = self.transcript
        transcript.units.append(unit)
        answer = self.script.answer(transcript.units)
        if answer.kind is Kind.SILENCE:
            while await reader.read(4096):  # until the client gives up and hangs up
                pass
            raise Hangup
        data = self.last_said = render(answer, unit, self.script.style)
        for piece in pieces(data, answer.splits):
            transcript.sent += piece
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)  # let the client read this piece on its own
        if answer.kind is Kind.CLOSE or answer.close_after:
            raise Hangup
        if unit is Unit.QUIT and answer.kind is Kind.GOOD:
            raise Hangup
        return unit is Unit.STARTTLS and data[:1] == b"2"


def _unit(line: bytes) -> Unit | None:
    """What a line from the client is: a command, the final dot, or content (None)."""
    if line == b".\r\n":
        return Unit.DOT
    verb = line.split(b" ", 1)[0].rstrip(b"\r\n").upper()
    unit = _VERBS.get(verb)
    if unit is not None:
        return unit
    if verb.startswith((b"MAIL", b"RCPT")):
        return _VERBS[verb[:4]]
    return None  # our content lines ("Subject: ...", "", "hello") start with no verb


@contextlib.asynccontextmanager
async def serving(peer: ScriptedPeer) -> AsyncIterator[int]:
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        await peer.handle(reader, writer)

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # The client has closed its end, so the peer is done or about to be (it reads to
        # the end of the stream). Not cancelled: Python 3.11's start_server then logs
        # "Exception in callback" for the cancelled task.
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=1.0)
            for task in stuck:
                task.cancel()
                peer.transcript.errors.append(RuntimeError("the peer did not finish"))
        await server.wait_closed()


# --- the strategies ----------------------------------------------------------------------

EXTENSIONS = [
    "PIPELINING",
    "SIZE 10240000",
    "SIZE 20",
    "SIZE 0",
    "SIZE x",
    "8BITMIME",
    "SMTPUTF8",
    "STARTTLS",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "AUTH PLAIN LOGIN",
    "CHUNKING",
    "X-UNKNOWN   spaced  params",
    "",
]

MALFORMED = [
    b"25 ok\r\n",
    b"2500 ok\r\n",
    b"250\r\n",
    b"250",  # never finished
    b"250 ok",  # no line end
    b"250 ok\r",
    b"250 ok\n",  # bare LF
    b"\r\n",
    b"\n",
    b" 250 ok\r\n",
    b"250\tok\r\n",
    b"250-first\r\n",  # a multi-line reply that never ends
    b"250-first\r\n251 second\r\n",
    b"250-first\r\n550 second\r\n",
    b"354-go\r\n354 on\r\n",
    b"abc\r\n",
    b"\x00\x00\x00\r\n",
    b"\xff\xfe250 ok\r\n",
    "250 ünïcödé ✓\r\n".encode(),
    b"250 \x1b[31mred\x1b[0m\r\n",
    b"-250 ok\r\n",
    b"250 ok\r\n\r\n",
    b"099 low\r\n",
    b"160 six\r\n",
    b"600 bad\r\n",
    b"999 bad\r\n",
    b"2\r\n",
    b"\x16\x03\x01\x00\x05hello\r\n",  # looks like a TLS record
]

INTERESTING_CODES = [
    100, 199, 211, 220, 221, 235, 250, 251, 252, 300, 334, 354, 399,
    421, 450, 451, 452, 500, 501, 502, 503, 530, 550, 552, 554, 555, 599, 600, 999,
]  # fmt: skip

EXTRA_LINES = [
    b"",
    b"250 unsolicited\r\n",
    b"354 unsolicited\r\n",
    b"221 bye\r\n",
    b"421 4.3.2 going away\r\n",
    b"550 5.0.0 no\r\n",
    b"250-half of a\r\n",
    b"220 garbage after the go-ahead\r\n",
]

enhanced_codes = st.one_of(
    st.none(),
    st.sampled_from(["2.0.0", "4.2.2", "5.1.1", "5.7.1", "4.7.0", "9.9.9", "5.1234.1", "4."]),
)
splits = st.lists(st.integers(0, MAX_RANDOM + 200), max_size=4).map(tuple)
modifiers = st.fixed_dictionaries(
    {},
    optional={
        "extra": st.sampled_from(EXTRA_LINES),
        "splits": splits,
        "close_after": st.booleans(),
        "lines": st.integers(1, 4),
    },
)


def _answer(kind: Kind, **fixed: object) -> st.SearchStrategy[Answer]:
    return modifiers.map(lambda extra: Answer(kind, **(fixed | extra)))  # type: ignore[arg-type]


answers = st.one_of(
    _answer(Kind.GOOD),
    st.builds(
        lambda code, enhanced, rest: Answer(Kind.REFUSE, code, enhanced, **rest),
        st.sampled_from([450, 451, 452, 454, 500, 501, 502, 503, 530, 550, 552, 553, 554]),
        enhanced_codes,
        modifiers,
    ),
    st.builds(
        lambda code, enhanced, rest: Answer(Kind.CODE, code, enhanced, **rest),
        st.one_of(st.sampled_from(INTERESTING_CODES), st.integers(0, 999)),
        enhanced_codes,
        modifiers,
    ),
    st.builds(
        lambda close, rest: Answer(Kind.CLOSING, 421, "4.3.2", **(rest | {"close_after": close})),
        st.booleans(),
        modifiers,
    ),
    st.builds(
        lambda raw, rest: Answer(Kind.MALFORMED, raw=raw, **rest),
        st.sampled_from(MALFORMED),
        modifiers,
    ),
    st.builds(
        lambda raw, rest: Answer(Kind.RANDOM, raw=raw, **rest),
        st.binary(max_size=MAX_RANDOM),
        modifiers,
    ),
    st.just(Answer(Kind.CLOSE)),
    st.just(Answer(Kind.SILENCE)),
)

styles = st.builds(
    Style,
    extensions=st.lists(st.sampled_from(EXTENSIONS), max_size=6, unique=True).map(tuple),
    enhanced=st.booleans(),
    multiline=st.booleans(),
)

# A few positions spread over the whole session (greeting, EHLO, STARTTLS, three
# transactions of up to five commands each, QUIT), and a few commands by occurrence (which
# reaches the RSET after a failed transaction, say), get something other than a good answer.
scripts = st.builds(
    Script,
    style=styles,
    answers=st.dictionaries(st.integers(0, 24), answers, max_size=4),
    by_command=st.dictionaries(
        st.tuples(st.sampled_from([u for u in Unit if u is not Unit.OTHER]), st.integers(0, 3)),
        answers,
        max_size=3,
    ),
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the client does."""

    starttls: StartTLS
    transactions: tuple[tuple[str, ...], ...]
    pipelined: bool
    """All submitted at once (else one after the other, each awaited)."""
    eightbit: bool
    smtputf8: bool
    auth: bool = False
    """Log in (AUTH PLAIN or LOGIN, when offered)."""
    reset: bool = False
    """The first transaction starts with RSET, as on a connection that sat idle."""


plans = st.builds(
    Plan,
    starttls=st.sampled_from([StartTLS.OPPORTUNISTIC, StartTLS.NEVER]),
    transactions=st.lists(
        st.integers(1, 3).map(lambda n: tuple(f"r{i}@b.test" for i in range(n))),
        min_size=1,
        max_size=3,
    ).map(lambda txns: tuple(tuple(f"t{t}.{r}" for r in rs) for t, rs in enumerate(txns))),
    pipelined=st.booleans(),
    eightbit=st.booleans(),
    smtputf8=st.booleans(),
    auth=st.booleans(),
    reset=st.booleans(),
)


# --- the client, and what must hold ---------------------------------------------------------

Outcome = TransactionResult | BaseException


@dataclass
class Run:
    opened: SMTPConnection | None = None
    open_error: BaseException | None = None
    outcomes: list[Outcome] = field(default_factory=list)


def content(n: int) -> bytes:
    return b"Subject: %d\r\n\r\nhello %d\r\n" % (n, n)


async def converse(plan: Plan, port: int, offers_auth: bool) -> Run:
    """Open, submit ``plan``'s transactions, close; log in only where the peer's good EHLO
    reply offers AUTH (else every such example would end at "no AUTH mechanism")."""
    run = Run()
    try:
        conn = await SMTPConnection.open(
            host="peer.test",
            ip="127.0.0.1",
            port=port,
            helo_name="client.test",
            timeouts=QUICK,
            starttls=plan.starttls,
            auth=("user", "secret") if plan.auth and offers_auth else None,
            plaintext_auth=True,  # the scripted peer has no TLS; its AUTH replies are fuzzed
        )
    except DeliveryError as exc:
        run.open_error = exc
        return run
    run.opened = conn
    try:
        submitted: list[asyncio.Future[TransactionResult] | BaseException] = []
        for n, recipients in enumerate(plan.transactions):
            try:
                future = conn.submit(
                    envelope_from="a@a.test",
                    recipients=recipients,
                    data=content(n),
                    # Only what the server offers: the rest is a caller error (ValueError).
                    eightbit=plan.eightbit and "8BITMIME" in conn.extensions,
                    smtputf8=plan.smtputf8 and "SMTPUTF8" in conn.extensions,
                    reset=plan.reset and n == 0,
                )
            except Exception as exc:  # checked below: DeliveryError only
                submitted.append(exc)
                continue
            if plan.pipelined:
                submitted.append(future)
                continue
            try:
                submitted.append(await future)  # type: ignore[arg-type]
            except Exception as exc:
                submitted.append(exc)
        for item in submitted:
            if isinstance(item, asyncio.Future):
                try:
                    run.outcomes.append(await item)
                except Exception as exc:
                    run.outcomes.append(exc)
            else:
                run.outcomes.append(item)  # type: ignore[arg-type]
    finally:
        await conn.close()
    return run


def check_result(result: TransactionResult, recipients: tuple[str, ...]) -> None:
    """What any transaction result must say, whatever the peer did."""
    replies = [r for r in (result.mail, result.data, result.final) if r is not None]
    replies += [reply for _, reply in result.rcpt]
    assert all(200 <= r.code < 600 for r in replies), replies  # the parser's range
    assert [address for address, _ in result.rcpt] == list(recipients[: len(result.rcpt)])
    mail_ok = result.mail is not None and 200 <= result.mail.code < 300
    if mail_ok:
        # MAIL accepted: every recipient has a reply, or the session ended (an error).
        assert len(result.rcpt) == len(recipients), result
    if result.data is not None:
        assert result.mail is not None and len(result.rcpt) == len(recipients), result
    if result.final is not None or result.uncertain:
        # Content went out only after a 354 to DATA, with MAIL and some RCPT accepted.
        assert result.data is not None and result.data.code == 354, result
        assert mail_ok and result.accepted, result
    if result.final is not None:
        assert not result.uncertain and result.cause is None, result
    if result.uncertain:
        assert result.final is None, result
        assert isinstance(result.cause, DeliveryError), result
    else:
        assert result.cause is None, result


OUTCOMES = Outcomes(Config(helo_name="client.test"), clock=lambda: NOW, rng=random.Random(1))


def check_engine_reading(result: TransactionResult, recipients: tuple[str, ...]) -> None:
    """The engine decides every recipient once, and delivers only on 2xx RCPT + 2xx dot."""
    item = WorkItem(
        message_id="m1",
        lease_token="lease",
        domain="b.test",
        envelope_from="a@a.test",
        recipients=tuple(
            LeasedRecipient(address=a, attempts=0, first_attempt_at=None, created_at=NOW)
            for a in recipients
        ),
        data=b"x",
        smtputf8=False,
        eightbit=False,
    )
    decided = OUTCOMES.from_transaction(item, result, 0.0, Where(host="peer.test"))
    assert sorted(r.address for r in decided) == sorted(recipients), (result, decided)
    rcpt = dict(result.rcpt)
    final_ok = result.final is not None and 200 <= result.final.code < 300
    for r in decided:
        if r.state is RecipientState.DELIVERED:
            assert final_ok and 200 <= rcpt[r.address].code < 300, (result, r)
        elif final_ok and r.address in rcpt and 200 <= rcpt[r.address].code < 300:
            raise AssertionError(f"accepted and delivered but not DELIVERED: {result}, {r}")


def check(run: Run, plan: Plan) -> None:
    if run.opened is None:
        assert isinstance(run.open_error, DeliveryError), run.open_error
        return
    assert len(run.outcomes) == len(plan.transactions)
    for outcome, recipients in zip(run.outcomes, plan.transactions, strict=True):
        if isinstance(outcome, TransactionResult):
            check_result(outcome, recipients)
            check_engine_reading(outcome, recipients)
        else:
            assert isinstance(outcome, DeliveryError), repr(outcome)
    assert not run.opened.usable  # closed
    transport = run.opened._transport
    assert transport is None or transport.is_closing()


def describe(run: Run) -> str:
    """How the example ended, for ``--hypothesis-show-statistics``."""
    if run.opened is None:
        return f"open failed: {type(run.open_error).__name__}"
    kinds = []
    for outcome in run.outcomes:
        if isinstance(outcome, TransactionResult):
            final = outcome.final.code // 100 if outcome.final else None
            kinds.append("uncertain" if outcome.uncertain else f"final {final}xx")
        else:
            kinds.append(type(outcome).__name__)
    return "opened: " + ", ".join(sorted(set(kinds)))


async def play(script: Script, plan: Plan) -> tuple[Run, Transcript]:
    peer = ScriptedPeer(script)
    async with serving(peer) as port:
        offers_auth = any(e.startswith("AUTH") for e in script.style.extensions)
        run = await asyncio.wait_for(converse(plan, port, offers_auth), BOUND)
    return run, peer.transcript


# Found by the test below: a refused RSET between two transactions.
REFUSED_RSET = Script(
    style=Style(extensions=(), enhanced=False, multiline=False),
    answers={},
    by_command={
        (Unit.RCPT, 0): Answer(Kind.REFUSE, 450),  # the first transaction gets nowhere...
        (Unit.DATA, 0): Answer(Kind.REFUSE, 554),  # (pipelined: "no valid recipients")
        (Unit.RSET, 0): Answer(Kind.REFUSE, 502),  # ...and the RSET before the second fails
        (Unit.MAIL, 1): Answer(Kind.REFUSE, 503),  # so MAIL is nested (a 5xx: a bounce)
    },
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts, plan=plans)
@example(
    script=REFUSED_RSET,
    plan=Plan(StartTLS.NEVER, (("a@b.test",), ("c@b.test",)), False, False, False),
)
def test_no_peer_makes_the_client_misbehave(
    script: Script, plan: Plan, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    caplog.clear()
    try:
        run, transcript = asyncio.run(play(script, plan))
    except TimeoutError:
        raise AssertionError(f"the example took longer than {BOUND}s: a hang") from None
    # A future or task whose exception nobody retrieved says so when it is collected.
    gc.collect()
    logged = [r for r in caplog.records if r.name.startswith("asyncio")]
    assert not logged, [r.getMessage() for r in logged]
    assert not transcript.errors, transcript.errors  # the peer itself must not break
    check(run, plan)
    event(describe(run))
    # The client sent content only after a 354 (counting every 354 line the peer sent,
    # unsolicited ones included, so this is a bound that holds for any pairing).
    go_aheads = len(re.findall(rb"(?m)^354", bytes(transcript.sent)))
    assert transcript.units.count(Unit.DOT) <= go_aheads, transcript.units


# --- what the fuzzing found ----------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_refused_rset_ends_the_session_not_the_event_loop(
    pipelining: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 5321 §4.1.1.5 wants 250 to RSET. A server refusing the RSET that leaves a failed
    transaction is still inside it: without PIPELINING the session would not let MAIL go
    (a LocalProtocolError escaped data_received, the loop logged "Fatal error" and the
    transaction waited for the connection to drop); with it, the 503 to the nested MAIL
    bounced the recipients. Either way the second transaction now fails as a protocol
    error, to be tried again."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    extensions = ("PIPELINING",) if pipelining else ()
    script = Script(
        style=Style(extensions=extensions, enhanced=False, multiline=False),
        answers={},
        by_command=REFUSED_RSET.by_command,
    )
    plan = Plan(
        starttls=StartTLS.NEVER,
        transactions=(("a@b.test",), ("c@b.test",)),
        pipelined=False,
        eightbit=False,
        smtputf8=False,
    )
    run, transcript = await play(script, plan)
    first, second = run.outcomes
    assert isinstance(first, TransactionResult) and not first.accepted
    assert isinstance(second, SMTPProtocolError)
    assert "refused RSET: 502" in second.text
    assert Unit.DOT not in transcript.units  # no content went for either
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("asyncio")]
