"""The dashboard as an ASGI application (Starlette, Jinja2 templates, no JavaScript).

Pages: ``/`` overview, ``/queue`` the queue, ``/message/{id}`` one message,
``/destinations`` pending mail per domain and the suspended ones. Actions (retry, hold,
release, cancel on a message; suspend, resume on a destination domain) are a
confirmation page at ``GET /action/{name}/{target}`` and the change at ``POST`` there,
CSRF-checked and logged on the ``mailstrom.web`` logger.

>>> from mailstrom.web import create_app
>>> app = create_app(store)  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8025)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from mailstrom.cli.output import age
from mailstrom.config import MIN_SECRET
from mailstrom.errors import MailstromError, UnknownMessage, UnreadableRow
from mailstrom.loopback import host_of, is_loopback, names_loopback
from mailstrom.policy.reasons import advice_for
from mailstrom.readmodel import (
    InvalidQuery,
    Overview,
    PageCursor,
    QueueQuery,
    QueueView,
    ReadModel,
    Search,
    SortOrder,
    open_read_model,
)
from mailstrom.readmodel.ttl import TTLCache
from mailstrom.safetext import bidi_escaped
from mailstrom.settings import parse_duration, parse_origin
from mailstrom.status import RecipientState
from mailstrom.stores.base import Store
from mailstrom.stores.clock import in_utc
from mailstrom.stores.dead_holders import HolderInfo, live_workers
from mailstrom.stores.operator import Suspension, filter_domain, next_try
from mailstrom.web.actions import (
    ACTIONS,
    InvalidTarget,
    Target,
    destination_domain,
    status_of,
)
from mailstrom.web.chart import throughput_chart
from mailstrom.web.headers import MAX_BODY_BYTES, MAX_HEADER_BYTES, header_fields, shown_body
from mailstrom.web.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    MAX_TOKEN,
    SECURITY_HEADERS,
    Access,
    Guesses,
    csrf_matches,
    is_bearer,
    made_here,
    new_csrf_token,
    same_origin,
    serves_host,
    session_cookie,
    unsendable,
)

log = logging.getLogger("mailstrom.web")

PAGE_SIZES = (25, 50, 100, 200)
MAX_OFFSET = 10**9
"""The largest ``offset`` of the destinations page (a store's integers end at 2**63)."""
_DIGITS = re.compile(r"[0-9]{1,12}")
"""A number as a query string or header gives it (not str.isdigit, which takes "²")."""
_MESSAGE_ID = re.compile(r"[0-9a-fA-F]{32}")  # fullmatch: "$" would let a final "\n" in
"""A message id as the API and ``mailstrom status`` take it: 32 hex digits in any case,
stored in lower case (an id copied in upper case was a 404)."""
_DOMAIN = re.compile(r"^[^\s/\x00-\x1f\x7f]{1,253}$")  # NUL: PostgreSQL refuses it


def _domain_filter(text: str | None) -> str | None:
    """A ``domain`` query parameter (:func:`filter_domain`), None when empty."""
    return filter_domain(text or "") or None


_PUBLIC_PATHS = ("/login", "/static/")

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def create_app(
    store: Store,
    *,
    read_model: ReadModel | None = None,
    token: str | None = None,
    cache_seconds: float = 5.0,
    clock: Clock = _utc_now,
    secure_cookies: bool = False,
    public_origin: str | None = None,
    guesses: Guesses | None = None,
    hosts: Iterable[str] = (),
) -> Starlette:
    """The dashboard over ``store`` (the caller keeps ownership of ``store``; the read model
    made here, if none is given, is closed with the application).

    ``token`` makes every page require it (see :mod:`mailstrom.web.security`); without
    one, only clients on this host that name it by a loopback name are answered;
    ``cache_seconds`` is how old the overview's and destinations' numbers may be;
    ``secure_cookies`` marks cookies ``Secure`` (behind an HTTPS proxy);
    ``public_origin`` is the dashboard's address as browsers reach it through a proxy
    (``"https://dash.example.org"``): forms posted from there are accepted (with their
    CSRF token, as always); it needs a token, and an ``https`` one makes cookies
    ``Secure``. A malformed ``public_origin``, or a ``token`` under
    :data:`~mailstrom.config.MIN_SECRET` (16) or over
    :data:`~mailstrom.web.security.MAX_TOKEN` characters or one no header can carry
    (white space at either end, a control character), is a ValueError.
    ``guesses`` bounds the failed tries at the token per client address (default:
    ``Guesses()``, 10 in 10 minutes; see :mod:`mailstrom.web.security`).
    ``hosts`` are the names (``"dash.example.org"``) besides loopback ones, address
    literals and ``public_origin``'s under which a dashboard with a token answers: a
    request naming another is refused (400) before its token counts as a guess
    (:func:`~mailstrom.web.security.serves_host`).
    """
    clock = in_utc(clock)  # a suspension's end is reckoned from it
    if token is not None and not token:
        # An empty token would be "required" and matched by an empty one.
        raise ValueError("token must not be empty (None lets everyone in)")
    if token is not None and len(token) < MIN_SECRET:
        raise ValueError(f"token must be at least {MIN_SECRET} characters")
    if token is not None and len(token) > MAX_TOKEN:
        # Tries are read up to MAX_TOKEN (longer ones refused unread): none would match.
        raise ValueError(f"token must be at most {MAX_TOKEN} characters")
    if token is not None and unsendable(token):
        raise ValueError(
            "token must not begin or end with white space nor hold a control character:"
            " no Authorization header can carry it"
        )
    if public_origin is not None:
        if token is None:
            # Reached through a proxy, the dashboard is not on loopback any more; without
            # a token it would take anyone's forms from the public address.
            raise ValueError("a public origin needs a token")
        public_origin = parse_origin(public_origin)
        # Browsers keep a Secure cookie only over HTTPS, which is what they use here.
        secure_cookies = secure_cookies or public_origin.startswith("https://")
    model = (
        read_model
        if read_model is not None
        else open_read_model(store, cache_seconds=cache_seconds)
    )
    owns_model = read_model is None
    access = Access(token)
    given = (*hosts, *([public_origin.partition("://")[2]] if public_origin else []))
    names = frozenset(host for name in given if (host := host_of(name)) is not None)
    guesses = Guesses() if guesses is None else guesses
    cache: TTLCache[Any] = TTLCache(cache_seconds)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mailstrom.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_shown_in_order,
    )
    env.filters["urlencode"] = _url_quoted
    env.filters["listed"] = _listed
    templates = Jinja2Templates(env=env)

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        now = clock()
        context.update(
            now=now,
            age=lambda when: age(when, now),
            # Set by the guard; a page made outside it (an error page Starlette asks
            # for before or after it ran) has none, and no form that needs one.
            csrf=getattr(request.state, "csrf", ""),
            auth=access.required,
            path=request.url.path,
        )
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def problem(request: Request, status: int, text: str) -> Response:
        return render(request, "error.html", status_code=status, status=status, text=text)

    # --- pages --------------------------------------------------------------------------

    async def overview(request: Request) -> Response:
        now = clock()
        view: Overview = await run_in_threadpool(
            cache.get, "overview", lambda: model.overview(now=now)
        )
        workers: list[HolderInfo] | None = await run_in_threadpool(
            cache.get, "workers", lambda: live_workers(store, log=log)
        )
        pending = view.by_state.get(RecipientState.QUEUED, 0) + view.by_state.get(
            RecipientState.DEFERRED, 0
        )
        return render(
            request,
            "overview.html",
            view=view,
            states=list(RecipientState),
            pending=pending,
            chart=throughput_chart(view.throughput),
            workers=workers,
        )

    async def queue(request: Request) -> Response:
        params = request.query_params
        try:
            query = _queue_query(params)
        except (InvalidQuery, ValueError) as exc:
            return problem(request, 400, str(exc))
        page = await run_in_threadpool(model.queue_page, query, now=clock())
        filters = {
            "view": query.view.value,
            "domain": query.domain or "",
            "age": params.get("age", ""),
            "q": params.get("q", ""),
            "order": query.order.value,
            "limit": str(query.limit),
        }
        kept = {k: v for k, v in filters.items() if v}
        next_url = None
        if page.next is not None:
            next_url = "/queue?" + urllib.parse.urlencode({**kept, "after": page.next.encode()})
        return render(
            request,
            "queue.html",
            page=page,
            filters=filters,
            views=list(QueueView),
            orders=list(SortOrder),
            sizes=PAGE_SIZES,
            next_url=next_url,
            first_url="/queue?" + urllib.parse.urlencode(kept) if query.after else None,
        )

    async def message(request: Request) -> Response:
        mid = request.path_params["id"]
        if not _MESSAGE_ID.fullmatch(mid):
            return problem(request, 404, "no such message")
        mid = mid.lower()
        show_body = request.query_params.get("body") == "1"
        after_text = request.query_params.get("after")
        if after_text is not None and not _DIGITS.fullmatch(after_text):
            return problem(request, 400, "after must be a recipient's position (digits)")
        after = -1 if after_text is None else int(after_text)
        try:
            # The recipients and attempts the page shows and no more (see
            # SHOWN_RECIPIENTS, MAX_SHOWN_ATTEMPTS).
            found = await run_in_threadpool(
                lambda: model.message_status(
                    mid, attempts=MAX_SHOWN_ATTEMPTS, after=after, recipients=SHOWN_RECIPIENTS
                )
            )
            status = found.status
            # What the page shows and no more: a message may be tens of megabytes.
            limit = MAX_BODY_BYTES + 1 if show_body else MAX_HEADER_BYTES
            data = await run_in_threadpool(lambda: model.message_data(mid, limit=limit))
        except UnknownMessage:
            return problem(request, 404, f"no message {mid} in the queue")
        except UnreadableRow as exc:
            # Not "try again later" (the 503 of a store that cannot be reached): the row
            # was changed outside mailstrom and stays so; the list pages leave it out.
            log.warning("%s: %s", _shown(request.url.path), exc)
            return problem(
                request,
                500,
                f"This message cannot be shown: {exc}. Its pending recipients fail as"
                f" unreadable when a worker leases them; `mailstrom cancel {mid}` cancels"
                " them now.",
            )
        now = clock()
        suspensions: list[Suspension] = await run_in_threadpool(
            cache.get, "suspensions", lambda: model.suspensions(now=now)
        )
        suspended = {s.domain: s for s in suspensions}
        body, cut = shown_body(data) if show_body else ("", False)
        pending = not status.is_final
        return render(
            request,
            "message.html",
            message=status,
            headers=header_fields(data),
            body=body if show_body else None,
            cut=cut,
            advice={r.address: advice_for(r) for r in status.recipients},
            kept=found.kept,
            total=found.recipients,
            next_url=(
                None
                if found.next_after is None
                else f"/message/{mid}?" + urllib.parse.urlencode({"after": found.next_after})
            ),
            first_url=f"/message/{mid}" if after_text is not None else None,
            # As `mailstrom status` says it: a pending recipient's next attempt (its
            # send_at, its destination's pause's end, not before its suspended
            # destination's end); none while held.
            due={r.address: next_try(status, r, suspended) for r in status.recipients},
            actions=[
                a
                for a in ACTIONS.values()
                if a.target is Target.MESSAGE
                and _applies(a.name, held=status.held, pending=pending)
            ],
            done=_done_notice(request.query_params.get("done")),
        )

    async def destinations(request: Request) -> Response:
        params = request.query_params
        domain = _domain_filter(params.get("domain"))
        offset_text = params.get("offset") or "0"
        if not _DIGITS.fullmatch(offset_text) or int(offset_text) > MAX_OFFSET:
            return problem(request, 400, f"offset must be a number from 0 to {MAX_OFFSET:,}")
        offset = int(offset_text)
        if domain is not None and not _DOMAIN.match(domain):
            return problem(request, 400, "not a domain")
        size = 100
        now = clock()
        found = await run_in_threadpool(
            cache.get,
            ("destinations", domain, offset),
            lambda: model.destinations(limit=size + 1, offset=offset, domain=domain, now=now),
        )
        suspended = await run_in_threadpool(
            cache.get, "suspensions", lambda: model.suspensions(now=now)
        )
        throttled, running = await run_in_threadpool(
            cache.get,
            "throttles",
            lambda: (
                model.throttles(now=now, limit=MAX_SHOWN_THROTTLES),
                model.throttle_count(now=now),
            ),
        )
        try:
            # A domain typed into the filter can be suspended even with nothing pending.
            actionable = destination_domain(domain) if domain else None
        except InvalidTarget:
            actionable = None
        return render(
            request,
            "destinations.html",
            destinations=found[:size],
            suspendable={d.domain for d in found[:size] if _suspendable(d.domain)},
            domain=domain or "",
            actionable=actionable,
            suspensions=suspended,
            throttles=throttled,
            more_throttles=max(0, running - len(throttled)),
            suspended_domains={s.domain for s in suspended},
            next_offset=offset + size if len(found) > size else None,
            offset=offset,
            done=_done_notice(params.get("done")),
        )

    # --- actions ------------------------------------------------------------------------

    def action_and_target(request: Request) -> tuple[Any, str] | Response:
        action = ACTIONS.get(request.path_params["name"])
        target = request.path_params["target"]
        if action is None:
            return problem(request, 404, "no such action")
        if action.target is Target.MESSAGE:
            if not _MESSAGE_ID.fullmatch(target):
                return problem(request, 404, f"no such {action.target.value}")
            return action, target.lower()
        try:
            return action, action.target_of(target)
        except InvalidTarget as exc:
            return problem(request, 400, f"{exc}: give a destination such as example.org")

    async def confirm(request: Request) -> Response:
        found = action_and_target(request)
        if isinstance(found, Response):
            return found
        action, target = found
        if action.target is Target.MESSAGE:
            # As the message's own page: no question about a message that is not there.
            try:
                await run_in_threadpool(status_of, model, target)
            except UnknownMessage:
                return problem(request, 404, f"no message {target} in the queue")
            except UnreadableRow:
                pass  # it is there; cancelling is what its page advises
        return render(
            request,
            "confirm.html",
            action=action,
            target=target,
            question=action.question.format(target=target),
            back=_target_url(action.target, target),
            durations=action.durations,
        )

    async def perform(request: Request) -> Response:
        found = action_and_target(request)
        if isinstance(found, Response):
            return found
        action, target = found
        form = await request.form(max_files=0, max_fields=8)
        if not csrf_matches(request.cookies.get(CSRF_COOKIE), _str(form.get(CSRF_FIELD))):
            log.warning(
                "refused %s %s from %s: bad or missing CSRF token",
                action.name,
                target,
                _client(request),
            )
            return problem(
                request,
                403,
                "This form has expired or did not come from this "
                "dashboard. Go back, reload the page and try again.",
            )
        duration = None
        if action.durations:
            chosen = action.durations.get(_str(form.get("for")) or "")
            if chosen is None:
                return problem(request, 400, "choose one of the offered durations")
            duration = chosen[1]
        try:
            outcome = await run_in_threadpool(action.run, store, model, target, clock(), duration)
        except UnknownMessage:
            return problem(request, 404, f"no message {target} in the queue")
        cache.clear()
        log.info("%s %s by %s: %s", action.name, target, _client(request), outcome)
        done = urllib.parse.quote(f"{action.label}: {outcome}")
        back = _target_url(action.target, target)
        joiner = "&" if "?" in back else "?"  # a destination's page has a query already
        return RedirectResponse(f"{back}{joiner}done={done}", 303)

    # --- logging in ---------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        return render(
            request, "login.html", next=_safe_next(request.query_params.get("next")), failed=False
        )

    async def login(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=8)
        following = _safe_next(_str(form.get("next")))
        if not csrf_matches(request.cookies.get(CSRF_COOKIE), _str(form.get(CSRF_FIELD))):
            return problem(request, 403, "The login form expired; reload it and try again.")
        client = _client(request)
        if wait := guesses.wait(client):
            return _too_many_guesses(client, wait)
        if not access.token_matches(_str(form.get("token"))):
            guesses.failed(client)
            log.warning("failed login from %s", client)
            failed = render(request, "login.html", status_code=401, next=following, failed=True)
            failed.headers["WWW-Authenticate"] = _CHALLENGE
            return failed
        log.info("login from %s", client)
        response = RedirectResponse(following, 303)
        response.set_cookie(
            request.state.session_cookie,
            access.session_value(),
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
        )
        return response

    async def logout(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=8)
        if not csrf_matches(request.cookies.get(CSRF_COOKIE), _str(form.get(CSRF_FIELD))):
            return problem(request, 403, "This form expired; reload the page and try again.")
        # Ended here, not only forgotten by this browser: a copy of it is refused too.
        access.end_session(request.cookies.get(request.state.session_cookie))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(request.state.session_cookie)
        return response

    # --- middleware ---------------------------------------------------------------------

    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Every answer, a refusal included, carries them: a plain-text 400 is a page too.
        return _secured(await guarded(request, call_next))

    async def guarded(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """The answer to ``request``: a refusal, or the page past the checks."""
        try:
            path = request.url.path
        except ValueError:
            # Starlette before 1.1 builds request.url from the Host header, and a malformed
            # one ("[::1") fails to parse; later versions fall back to the socket's address.
            return PlainTextResponse("malformed Host header", 400)
        host_header = request.headers.get("host")
        if not access.required and _from_elsewhere(_client(request)):
            # The Host check below stops a page that rebinds its own name, not a client
            # that names the dashboard as it likes: served on another address (an
            # application mounting create_app() without a token), anyone sending "Host:
            # 127.0.0.1" had the queue and its actions.
            log.warning(
                "refused %s %s from %s: no token, and not on this host",
                request.method,
                _shown(path),
                _client(request),
            )
            return PlainTextResponse(
                "Without a token (web.token) this dashboard answers only clients on this host.",
                403,
            )
        if access.required:
            # Before the token is looked at: a page rebinding its name to this address
            # spent the tries at the token, and locked the operator's address out.
            wrong_host = not serves_host(host_header, names)
            refusal = (
                "This dashboard answers to a loopback name, an address, the name it "
                "listens on or the host of web.public_url; not to this one."
            )
        else:
            # Without a token, being reachable only on loopback is the protection; a
            # rebound name would make the dashboard another site's (see security.py).
            wrong_host = not names_loopback(host_header)
            refusal = (
                "This dashboard answers only to localhost, 127.0.0.1 or [::1] unless it "
                "has a token (web.token)."
            )
        if wrong_host:
            log.warning(
                "refused %s %s for Host %s", request.method, _shown(path), _shown(host_header)
            )
            return PlainTextResponse(refusal, 400)
        fresh = not made_here(request.cookies.get(CSRF_COOKIE))
        request.state.csrf = new_csrf_token() if fresh else request.cookies[CSRF_COOKIE]
        if request.method == "POST" and (
            "transfer-encoding" in request.headers
            or not _small_body(request.headers.get("content-length"))
        ):
            # Every form here is a few short fields; the login form is open to anyone. A
            # Transfer-Encoding beside the length wins over it (h11 reads the body chunked,
            # as RFC 9112 §6.1 says), so the length would bound nothing.
            return PlainTextResponse("request body missing its length or too large", 413)
        if request.method == "POST" and not same_origin(
            request.headers.get("origin"),
            request.headers.get("host"),
            request.url.scheme,
            public=public_origin,
        ):
            origin = request.headers.get("origin")
            log.warning("refused a POST to %s from origin %s", _shown(path), _shown(origin))
            return PlainTextResponse("cross-site request refused", 403)
        authorization = request.headers.get("authorization")
        # Named by the port the browser uses: a dashboard on another port of this host
        # (cookies ignore the port) keeps its own session.
        request.state.session_cookie = session_cookie(
            host_header, request.url.scheme, public=public_origin
        )
        session = request.cookies.get(request.state.session_cookie)
        # A try at the token is a bearer token, unless a session lets the request in: a
        # proxy's Basic credentials are none, and a browser logged in keeps its session
        # while its address (a proxy's, shared by all) may not try.
        guessing = (
            access.required
            and is_bearer(authorization)
            and not access.allows(cookie=session, authorization=None)
        )
        response: Response
        if guessing and (wait := guesses.wait(_client(request))):
            response = _too_many_guesses(_client(request), wait)
        elif not path.startswith(_PUBLIC_PATHS) and not access.allows(
            cookie=session, authorization=authorization
        ):
            if guessing:
                guesses.failed(_client(request))  # a wrong bearer token is a guess too
            if request.method in ("GET", "HEAD"):  # HEAD is answered as GET (RFC 9110 §9.3.2)
                target = path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(
                    "/login?" + urllib.parse.urlencode({"next": target}), 303
                )
            else:
                response = PlainTextResponse(
                    "log in first", 401, headers={"WWW-Authenticate": _CHALLENGE}
                )
        else:
            try:
                response = await call_next(request)
            except ClientDisconnect:
                # A form whose body stopped coming: the client went, or was cut off at the
                # server's request deadline. What clients do, not an error of the app.
                log.info(
                    "%s %s: the client left before its form arrived", request.method, _shown(path)
                )
                response = PlainTextResponse("the request did not arrive", 400)
            except MailstromError as exc:
                log.warning("%s: %s", _shown(path), exc)
                response = problem(request, 503, f"The queue cannot be read right now: {exc}")
        if fresh:
            response.set_cookie(
                CSRF_COOKIE,
                request.state.csrf,
                httponly=True,
                samesite="strict",
                secure=secure_cookies,
            )
        return response

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        response = problem(request, status, "no such page" if status == 404 else "error")
        if status == 405:
            # RFC 9110 §15.5.6: a 405 says which methods the page takes. Starlette's
            # names only those of the first route of the path (a page's GET and POST are
            # two routes here), and this page stands in for Starlette's.
            methods = {
                method
                for route in request.app.router.routes
                if isinstance(route, Route)
                and route.methods
                and route.matches(request.scope)[0] is not Match.NONE
                for method in route.methods
            }
            allow = ", ".join(sorted(methods)) if methods else None
            if allow is None and isinstance(exc, HTTPException) and exc.headers:
                allow = exc.headers.get("Allow")
            if allow is not None:
                response.headers["Allow"] = allow
        return response

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware asks for this page, outside the guard (it is
        # outermost), and then raises the exception on for uvicorn to log: the headers
        # the guard would add are added here.
        return _secured(problem(request, 500, "Something went wrong; the server's log says what."))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owns_model:
                model.close()

    app = Starlette(
        routes=[
            Route("/", overview),
            Route("/queue", queue),
            Route("/message/{id}", message),
            Route("/destinations", destinations),
            Route("/action/{name}/{target}", confirm, methods=["GET"]),
            Route("/action/{name}/{target}", perform, methods=["POST"]),
            Route("/login", login_form, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Mount("/static", StaticFiles(packages=[("mailstrom.web", "static")]), name="static"),
        ],
        middleware=[Middleware(_OriginForm), Middleware(BaseHTTPMiddleware, dispatch=guard)],
        exception_handlers={404: not_found, 405: not_found, Exception: server_error},
        lifespan=lifespan,
    )
    # Starlette answers "/queue/" with a redirect to an absolute URL made from the
    # request's Host header; every redirect here is a path on this server instead, and
    # no page of the dashboard has a trailing slash (a 404 says so).
    app.router.redirect_slashes = False
    return app


def _secured(response: Response) -> Response:
    """``response`` with the headers every answer of the dashboard carries
    (:data:`~mailstrom.web.security.SECURITY_HEADERS`); one it set itself is kept."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


class _OriginForm:
    """A request whose target is in absolute form (``GET http://127.0.0.1:8025/queue
    HTTP/1.1``, RFC 9112 §3.2.2) served as the same request in origin form (``GET
    /queue``), with the target's authority as its ``Host``, which that section says wins
    over the Host header. Servers must accept it, and HTTP/1.1 clients that were set to
    use a proxy send it; uvicorn's h11 server (which ``mailstrom web`` runs) passes the
    whole URL on as the path, so every such request was a 404. A target of another
    form that is not a path (``*``, ``host:port``) is left to be a 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/"):
            scope = _in_origin_form(scope)
        await self.app(scope, receive, send)


def _in_origin_form(scope: Scope) -> Scope:
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    try:
        target = urllib.parse.urlsplit(raw)
    except ValueError:  # "http://[::1/": a bracket that closes no IPv6 address
        return scope
    if target.scheme.lower() not in (b"http", b"https") or not target.netloc:
        return scope
    # RFC 9110 §4.2.4: userinfo in an http URI is not to be sent; never part of the host.
    authority = target.netloc.rpartition(b"@")[2]
    raw_path = target.path or b"/"  # "http://host" with no path: the server's root
    headers = [(name, value) for name, value in scope["headers"] if name != b"host"]
    return {
        **scope,
        "path": urllib.parse.unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "headers": [(b"host", authority), *headers],
    }


_CHALLENGE = 'Bearer realm="mailstrom"'
"""A 401's WWW-Authenticate (RFC 9110 §15.5.2): the token, as ``Authorization: Bearer``
(a browser shows no dialog for it; the login form is how a person gives it)."""


def _queue_query(params: Any) -> QueueQuery:
    """The queue page's query string → a QueueQuery (ValueError on bad values)."""
    view_text = params.get("view") or QueueView.PENDING.value
    order_text = params.get("order") or SortOrder.NEWEST.value
    try:
        view, order = QueueView(view_text), SortOrder(order_text)
    except ValueError:
        raise InvalidQuery(
            f"unknown view or order: {view_text[:20]!r} {order_text[:20]!r}"
        ) from None
    limit_text = params.get("limit") or "50"
    if not _DIGITS.fullmatch(limit_text) or int(limit_text) not in PAGE_SIZES:
        raise InvalidQuery(f"page size must be one of {', '.join(map(str, PAGE_SIZES))}")
    domain = _domain_filter(params.get("domain"))
    if domain is not None and not _DOMAIN.match(domain):
        raise InvalidQuery("not a domain")
    # parse_duration() trims ASCII white space; str.strip() here would take U+3000 too.
    age_text = params.get("age") or ""
    after = params.get("after")
    return QueueQuery(
        view=view,
        domain=domain,
        older_than=parse_duration(age_text) if age_text.strip(" \t") else None,
        search=Search.parse(params.get("q") or ""),
        order=order,
        after=PageCursor.decode(after) if after else None,
        limit=int(limit_text),
    )


# What an action returns ("3 recipients due now", "suspended for 2h", "1 recipient due
# now, 2 due once resumed, 1 due once the pause ends"). ASCII digits: a str pattern's \d
# would take "\u0663" and the like, and a link could show any number.
_OUTCOME = re.compile(  # fullmatch: "$" lets a "\n" in
    r"[0-9]{0,9} ?[a-z0-9 ]{1,40}(, [0-9]{1,9} [a-z ]{1,24}){0,2}"
)


def _done_notice(text: str | None) -> str | None:
    """The notice after an action, shown only in the form an action writes: a link
    carrying any other text (``?done=Your account is closed``) shows nothing."""
    if text is None:
        return None
    label, sep, outcome = text.partition(": ")
    known = {a.label for a in ACTIONS.values()}
    return text if sep and label in known and _OUTCOME.fullmatch(outcome) else None


def _suspendable(domain: str) -> bool:
    """Whether a destination can be suspended: a domain name, not the address literal
    (``[192.0.2.1]``) of mail to an address, which no suspension names."""
    try:
        destination_domain(domain)
    except InvalidTarget:
        return False
    return True


def _applies(action: str, *, held: bool, pending: bool) -> bool:
    if action == "hold":
        return pending and not held
    if action == "release":
        return held
    return pending  # retry, cancel


def _target_url(target: Target, value: str) -> str:
    if target is Target.MESSAGE:
        return f"/message/{value}"
    return "/destinations?" + urllib.parse.urlencode({"domain": value})


def _safe_next(value: str | None) -> str:
    """Only a path on this server (never ``//elsewhere`` or a full URL)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value[:2000]


MAX_SHOWN_THROTTLES = 100
"""Throttled destinations the destinations page lists at most, soonest end first: each
is a throttling reply's doing, and recipients at 5,000 subdomains of one hostile domain
answering "421 rate limited" made a page of 3.4 MB (``mailstrom queue --throttled``
lists them all)."""

SHOWN_RECIPIENTS = 200
"""Recipients a message page lists at most, by position; a "next" link leads on. The
recipients of a message have no upper bound: one to 1,000, each deferred once, made a
page of 819 KB, every recipient read and made a status for it."""
MAX_SHOWN_ATTEMPTS = 500
"""Attempt rows a message page shows at most, shared alike among its recipients, each
one's latest (:func:`~mailstrom.readmodel.base.attempt_shares`; past that many
recipients, the later ones get none: their latest reply is in the table of recipients).
Every one of a message to 1,000 recipients deferred 30 times each was 9.3 MB of HTML, its
rendering holding the server's event loop (every other request) for 2.4 s; and the
read model reads only those (all 30,000 took 0.9 s)."""


MAX_LISTED_SUBJECT = 200
"""Characters of a subject the queue's page shows (the message's page shows it whole). A
Subject field may be 64 KiB: a page of 200 messages with such subjects was 12.7 MB."""


def _listed(text: str) -> str:
    """The start of ``text`` (a subject) for a line of a list, "…" marking a cut."""
    if len(text) <= MAX_LISTED_SUBJECT:
        return text
    return text[: MAX_LISTED_SUBJECT - 1] + "…"


MAX_FORM_BYTES = 16 * 1024
"""The largest form body accepted (the forms hold a token, a path and a CSRF token)."""


def _shown_in_order(value: Any) -> Any:
    """Every value a page shows, with its bidirectional controls (and lone surrogates) as
    escapes: a subject, an address, a reply or a tag (what applications and servers wrote)
    holding U+202E showed the text after it reversed, ``invoice\u202efdp.exe`` as
    ``invoiceexe.pdf``.
    Markup the app built itself (the chart; it has ``__html__``) is left as it is."""
    if isinstance(value, str) and not hasattr(value, "__html__"):
        return bidi_escaped(value)
    return value


def _url_quoted(value: object) -> str:
    """Jinja's ``urlencode`` of one value (a domain in a link), taking lone surrogates
    too: SQLite's octets that are not UTF-8 are read as such (a suspension's domain
    changed by hand), which Jinja's cannot encode, and the whole page answered 500. The
    link carries the octets as stored."""
    text = str(value)
    try:
        octets = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no octet
        octets = text.encode("utf-8", "backslashreplace")
    return urllib.parse.quote(octets, safe="/")


def _shown(text: str | None) -> str:
    """A path or header for a log line, whatever a client sent: quoted, so that a line
    break (``%0A`` in a path) cannot forge a line of its own, and short."""
    return repr((text or "")[:100])


def _small_body(length: str | None) -> bool:
    return length is not None and bool(_DIGITS.fullmatch(length)) and int(length) <= MAX_FORM_BYTES


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _too_many_guesses(client: str, wait: float) -> Response:
    log.warning("refused a try at the token from %s: too many failed", client)
    return PlainTextResponse(
        "too many wrong tokens from this address; try again later",
        429,
        headers={"Retry-After": str(max(1, round(wait)))},
    )


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _from_elsewhere(client: str) -> bool:
    """Whether a client is at a network address other than this host's loopback. One with
    no address (a Unix socket's; "unknown") is on this host."""
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return False
    return not is_loopback(client)
