"""Authentication, errors, scopes, rate limits and pagination of the JSON API.

Every request is authenticated by ``Authorization: Bearer <token>`` (CSRF
does not apply: a browser never sends that header by itself) or by the
pages' session cookie (then CSRF applies to unsafe methods, as on the pages).
Errors are ``{"error": {"code", "message", "fields"}}`` with a stable code.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from functools import wraps

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask_login import current_user
from flask_wtf.csrf import CSRFError
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError
from werkzeug.exceptions import HTTPException

from .. import api_tokens
from ..extensions import csrf, db

bp = Blueprint("api_v1", __name__, url_prefix="/api/v1")
csrf.exempt(bp)  # checked in authenticate() for cookie sessions only

MAX_ID = 2 ** 31 - 1

# Stable codes: clients branch on these, never on messages.
CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "rate_limited",
         503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, fields: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.fields, self.extra = status, code, message, fields or {}, extra


def error_response(status: int, code: str, message: str, fields: dict | None = None, **extra) -> Response:
    resp = jsonify({"error": {"code": code, "message": message, "fields": fields or {}, **extra}})
    resp.status_code = status
    return resp


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError):
    resp = error_response(exc.status, exc.code, exc.message, exc.fields, **exc.extra)
    if exc.status == 429:
        resp.headers["Retry-After"] = str(exc.extra.get("retry_after", 60))
    return resp


@bp.errorhandler(CSRFError)
def _csrf_error(exc: CSRFError):
    return error_response(400, "csrf_failed", "Cookie sessions must send the CSRF token (X-CSRFToken); "
                                              "scripts use a bearer token instead.")


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    status = exc.code or 500
    return error_response(status, CODES.get(status, "error"), _MESSAGES.get(status, exc.description or exc.name))


for _code in (400, 403, 404, 405, 413, 415, 500):  # before the pages' HTML handlers for these codes
    bp.register_error_handler(_code, _http_error)

_MESSAGES = {404: "No such object, or you may not see it.", 403: "You are not allowed to do that.",
             405: "That method is not allowed here.", 401: "Send a valid token: Authorization: Bearer corral_…"}


@bp.before_request
def authenticate():
    header = request.headers.get("Authorization", "")
    g.api_token = None
    if header:
        scheme, _, secret = header.partition(" ")
        token = api_tokens.authenticate(secret.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise ApiError(401, "unauthorized", "That token is not valid (unknown, expired or revoked).")
        db.session.commit()  # its last use, before the request's own work
        g.api_token = token
        g._login_user = token.user  # Flask-Login's current_user for this request only; no session is written
        key = f"t{token.id}"
    else:
        if not current_user.is_authenticated:
            raise ApiError(401, "unauthorized", _MESSAGES[401])
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            csrf.protect()
        key = f"u{current_user.id}"
    wait = api_tokens.rate_limited(key)
    if wait:
        raise ApiError(429, "rate_limited", f"Too many requests; try again in {wait} s.", retry_after=wait)


@bp.after_request
def _no_session_for_tokens(resp: Response) -> Response:
    if getattr(g, "api_token", None) is not None:
        resp.headers.pop("Set-Cookie", None)
        resp.headers["Cache-Control"] = "no-store"
    return resp


def require_write() -> None:
    token = getattr(g, "api_token", None)
    if token is not None and token.scope != "write":
        raise ApiError(403, "read_only_token", "This token is read-only; create a read-write token for changes.")


# --- Operations: one decorator routes a view and describes it for OpenAPI -----------------

@dataclass
class Operation:
    method: str
    rule: str
    endpoint: str
    summary: str
    tag: str
    query: type[Schema] | None = None
    body: type[Schema] | None = None
    response: type[Schema] | None = None
    status: int = 200
    many: bool = False
    description: str = ""
    path_params: list[str] = field(default_factory=list)
    form: type[Schema] | None = None  # multipart/form-data fields ...
    files: dict[str, tuple[bool, str]] = field(default_factory=dict)  # ... and file parts: (several, what)


OPERATIONS: list[Operation] = []


def operation(method: str, rule: str, *, summary: str, tag: str, query=None, body=None, response=None,
              status: int = 200, prepared: bool = False, form=None, files=None):
    """Route ``view(**path_args, query=..., body=...)`` at ``rule`` and record it for the OpenAPI document.

    ``form`` and ``files`` document a multipart/form-data request (an upload): its fields' schema and
    its file parts (name -> (several allowed, description)). The view loads them itself (after its
    permission check) from ``request.form`` and ``request.files``.

    Path arguments are ``<int:name>`` ids; query and body are loaded with their
    schemas (bad input: 422 naming the fields); unsafe methods need a
    read-write token; the view's return value is dumped with ``response``, unless ``prepared`` says the
    view built that shape from plain JSON values itself (cheaper on long lists; the schema tests check it).
    """
    def decorate(view):
        params = [part[5:-1] for part in rule.split("/") if part.startswith("<int:")]
        op = Operation(method, rule, view.__name__, summary, tag, query, body, response, status,
                       description=(view.__doc__ or "").strip(), path_params=params, form=form,
                       files=dict(files or {}))
        OPERATIONS.append(op)

        @wraps(view)
        def wrapper(**kwargs):
            for name in params:
                if not 0 < kwargs[name] <= MAX_ID:
                    raise ApiError(404, "not_found", _MESSAGES[404])
            if method != "GET":
                require_write()
            if query is not None:
                kwargs["query"] = load(query(unknown=EXCLUDE), request.args.to_dict())
            if body is not None:
                data = request.get_json(silent=True)
                if not isinstance(data, dict):
                    raise ApiError(422, "invalid", "Send a JSON object (Content-Type: application/json).")
                kwargs["body"] = load(body(unknown=RAISE), data)
            result = view(**kwargs)
            if isinstance(result, Response):
                return result
            resp = jsonify(result if prepared or response is None else response().dump(result))
            resp.status_code = status
            if status == 202 and isinstance(result, dict) and result.get("task_url"):
                resp.headers["Location"] = result["task_url"]
            return resp

        bp.add_url_rule(rule.replace("<int:", "<int(signed=True):"), view.__name__, wrapper, methods=[method])
        return wrapper

    return decorate


def load(schema: Schema, data: dict) -> dict:
    try:
        return schema.load(data)
    except ValidationError as exc:
        fields = {k: (v if isinstance(v, list) else [str(v)]) for k, v in exc.normalized_messages().items()}
        fields = {k: [m if isinstance(m, str) else str(m) for m in v] for k, v in fields.items()}
        raise ApiError(422, "invalid", "Some fields are not valid: " + ", ".join(sorted(fields)), fields) from exc


def refused(exc: Exception, status: int = 409, code: str = "refused") -> ApiError:
    """A domain rule said no: its message, unchanged, under a stable code."""
    return ApiError(status, code, str(exc))


# --- Pagination: ``limit`` and an opaque ``cursor`` (the last id seen) ----------------------

def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, value = raw.partition(":")
        last = int(value)
        if version != "v1" or not 0 <= last <= MAX_ID:
            raise ValueError(raw)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ApiError(422, "invalid", "That cursor is not one this API gave out.", {"cursor": ["Not a valid cursor."]})
    return last


def page(stmt, id_column, query: dict, *, newest_first: bool = False):
    """One page of ``stmt`` ordered by ``id_column``: ``{"items", "next_cursor"}`` (items are model objects)."""
    limit, after = query["limit"], decode_cursor(query.get("cursor"))
    if after is not None:
        stmt = stmt.where(id_column < after if newest_first else id_column > after)
    stmt = stmt.order_by(None).order_by(id_column.desc() if newest_first else id_column).limit(limit + 1)
    rows = list(db.session.execute(stmt).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": rows, "next_cursor": encode_cursor(rows[-1].id) if more else None}


def api_rate_limit() -> int:
    return int(current_app.config.get("API_RATE_LIMIT") or 0)
