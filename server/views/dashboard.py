"""The operator dashboard at /dashboard: a login form, five pages, live fragments and a rollback.

Sign-in takes the operator token in a POST form and answers with a cookie
(Secure, HttpOnly, SameSite=Strict, Path=/dashboard) holding an expiry and an
HMAC of it keyed by the token: any worker can check it, it never contains the
token, and changing the token signs everyone out. The token never appears in
a URL. Every other dashboard route needs that cookie: pages redirect to the
login, fragments and forms answer 401 JSON. The rollback form also carries a
CSRF token (an HMAC of the cookie) and calls `VersionRegistry.rollback`, as
`python -m server rollback` does.

Live updates: each page's main block is re-fetched every few seconds with
`X-Dashboard-Fragment: 1` (static/dashboard.js) and swapped in place.
"""
from __future__ import annotations

import hashlib
import hmac
import time

from flask import Blueprint, Response, redirect, render_template, request

from server.dashboard import STATIC, TEMPLATES, data
from server.errors import ErrorCode, ProtocolError
from server.validation import MAX_INT
from server.views._common import limit, services

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder=str(TEMPLATES),
               static_folder=str(STATIC), static_url_path="/static")
COOKIE = "nightjar_dashboard"
SESSION_S = 12 * 3600
OPEN = {"dashboard.login", "dashboard.sign_in", "dashboard.static"}
POLL_MS = 2000


def _sign(message: str) -> str:
    return hmac.new(services().operator_token.encode(), message.encode(), hashlib.sha256).hexdigest()


def _signed_in() -> str | None:
    """The session cookie when it is genuine and unexpired."""
    value = request.cookies.get(COOKIE, "")
    expiry, _, mac = value.partition(".")
    if not expiry.isdigit() or int(expiry) < time.time():
        return None
    return value if hmac.compare_digest(mac.encode(), _sign(f"session:{expiry}").encode()) else None


def _csrf(session: str) -> str:
    return _sign(f"csrf:{session}")


@bp.app_template_filter("when")
def _when(t: float | None) -> str:
    """A timestamp of the server's clock, in UTC."""
    import datetime

    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@bp.before_request
def _require_session():
    if request.endpoint in OPEN:
        return None
    if _signed_in() is None:
        if request.method == "GET" and not request.headers.get("X-Dashboard-Fragment"):
            return redirect("/dashboard/login", 303)
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "sign in at /dashboard/login first")
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self';"
                                                   " frame-ancestors 'none'; form-action 'self'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _page(template: str, status: int = 200, **context) -> tuple[str, int]:
    session = _signed_in()
    fragment = bool(request.headers.get("X-Dashboard-Fragment"))
    return render_template(template, fragment=fragment, csrf=_csrf(session) if session else "",
                           poll_ms=POLL_MS, populations=services().populations(), **context), status


def _wants_html() -> bool:
    """A browser's form post shows its error on the page; any other client gets the usual JSON error."""
    return request.accept_mimetypes.best == "text/html" or "text/html" in (request.headers.get("Accept") or "")[:40]


def _population(name: str) -> str:
    if name not in services().populations():
        raise ProtocolError(ErrorCode.UNKNOWN_POPULATION, f"no population named {name!r}")
    return name


@bp.get("/login")
def login():
    return _page("login.html", error=None)


@bp.post("/login")
def sign_in():
    limit("login")
    given = (request.form.get("token") or "").strip()
    if not hmac.compare_digest(given.encode(), services().operator_token.encode()):
        if _wants_html():
            return _page("login.html", 401, error="That is not the operator token.")
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "that is not the operator token")
    expiry = str(int(time.time()) + SESSION_S)
    response = redirect("/dashboard", 303)
    response.set_cookie(COOKIE, f"{expiry}.{_sign(f'session:{expiry}')}", max_age=SESSION_S, path="/dashboard",
                        secure=True, httponly=True, samesite="Strict")
    return response


@bp.post("/logout")
def sign_out():
    response = redirect("/dashboard/login", 303)
    response.delete_cookie(COOKIE, path="/dashboard", secure=True, httponly=True, samesite="Strict")
    return response


@bp.get("")
def overview():
    return _page("overview.html", cards=data.overview(services()))


# The pages that only show a model of server.dashboard.data: (rule, endpoint, template, build, name).
# `build(services, population, *route_args)` makes the model, passed to the template under `name`
# (or spread into it when name is None).
PAGES = (
    ("/p/<population>/rounds", "rounds", "rounds.html", data.timeline, None),
    (f"/p/<population>/rounds/<int(max={MAX_INT}):number>", "round_detail", "round.html", data.round_detail, "r"),
    ("/p/<population>/participation", "participation", "participation.html", data.participation, None),
    (f"/p/<population>/versions/<int(max={MAX_INT}):number>", "version_detail", "version.html",
     data.version_detail, "v"),
    ("/p/<population>/health", "health", "health.html", data.health, None),
)


def _page_view(template: str, build, name: str | None):
    def view(population: str, **args):
        model = build(services(), _population(population), *args.values())
        return _page(template, population=population, **({name: model} if name else model))
    return view


for _rule, _endpoint, _template, _build, _name in PAGES:
    bp.add_url_rule(_rule, _endpoint, _page_view(_template, _build, _name), methods=["GET"])


@bp.get("/p/<population>/versions")
def versions(population: str, notice: str | None = None, error: str | None = None, status: int = 200):
    rolled = request.args.get("rolled_back", "")
    if notice is None and rolled.isdigit():
        notice = f"Apps now get version {int(rolled)}."
    return _page("versions.html", status, population=population, notice=notice, error=error,
                 **data.versions(services(), _population(population)))


@bp.post("/p/<population>/rollback")
def rollback(population: str):
    """The confirmed rollback: the same call as `python -m server rollback --to N`."""
    _population(population)
    session = _signed_in()
    if not hmac.compare_digest((request.form.get("csrf") or "").encode(), _csrf(session).encode()):
        raise ProtocolError(ErrorCode.FORBIDDEN, "the form's CSRF token is missing or wrong: reload the page")
    to = request.form.get("to", "")
    if not to.isdigit() or int(to) > MAX_INT:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'to' must be a version number")
    try:
        target = services().versions.rollback(population, int(to))
    except ProtocolError as e:
        if _wants_html() and e.code in (ErrorCode.CONFLICT, ErrorCode.UNKNOWN_VERSION):
            return versions(population, error=e.message, status=e.status)
        raise
    return redirect(f"/dashboard/p/{population}/versions?rolled_back={target.version}", 303)
