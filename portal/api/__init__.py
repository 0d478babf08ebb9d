"""The JSON API, version 1 (``/api/v1``): the pages' permissions and domain functions behind bearer tokens.

``core`` holds the machinery (authentication, errors, pagination, the
``operation`` decorator that both routes a view and describes it for the
OpenAPI document); ``schemas`` the marshmallow schemas; ``views`` the
resources; ``openapi`` builds the document from what ``operation`` recorded.
"""

from __future__ import annotations

from flask import Flask


def json_error(exc):
    from .core import _http_error

    return _http_error(exc)


def init_app(app: Flask) -> None:
    from . import attributes, core, networks, openapi, tokens_page, usage, views  # noqa: F401 - they register routes
    from . import clusters  # noqa: F401 - registers the virtual clusters' routes

    app.register_blueprint(core.bp)
    tokens_page.init_app(app)
