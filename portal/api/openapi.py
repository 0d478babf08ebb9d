"""The OpenAPI 3.1 document, built from the operations the views declared and their marshmallow schemas
(apispec), and a browsable page rendered on the server from the same document."""

from __future__ import annotations

import re
from functools import lru_cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import jsonify, render_template

from . import schemas as s
from .core import MAX_ID, OPERATIONS, bp

ERROR_STATUSES = {400: "Bad request (e.g. a cookie session without its CSRF token)",
                  401: "No valid token", 403: "Not allowed (role, or a read-only token)", 404: "No such object "
                  "(or not yours)", 409: "Refused by a rule, or busy with another task", 422: "Invalid input; "
                  "error.fields names the fields", 429: "Rate limited; see Retry-After", 503: "Queue unavailable"}


def _resolver(schema) -> str:
    name = schema.__name__ if isinstance(schema, type) else type(schema).__name__
    return name.removesuffix("Schema") or name


@lru_cache(maxsize=1)
def build() -> dict:
    marshmallow = MarshmallowPlugin(schema_name_resolver=_resolver)
    spec = APISpec(title="Corral API", version="1", openapi_version="3.1.0", plugins=[marshmallow],
                   info={"description": "Corral's JSON API. Authenticate with a personal token from the Account "
                                        "page: `Authorization: Bearer corral_…`. Long operations answer 202 with "
                                        "the task to poll."},
                   servers=[{"url": "/api/v1"}])
    spec.components.security_scheme("token", {"type": "http", "scheme": "bearer"})
    spec.components.schema("ErrorEnvelope", schema=s.ErrorEnvelope)
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": "ErrorEnvelope"}}}
              for code, text in ERROR_STATUSES.items()}
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        path = re.sub(r"<int:(\w+)>", r"{\1}", op.rule)
        parameters = [{"in": "path", "name": p, "required": True, "example": 1,
                       "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}} for p in op.path_params]
        if op.query is not None:
            parameters.append({"in": "query", "schema": op.query})
        operation = {"operationId": op.endpoint, "summary": op.summary, "tags": [op.tag],
                     "security": [{"token": []}], "parameters": parameters,
                     "responses": {str(op.status): {"description": "OK" if op.status < 300 else "Accepted",
                                                    **({"content": {"application/json": {"schema": op.response}}}
                                                       if op.response else {})}, **errors}}
        if op.status == 202:  # a 202 names its task: clients (and stateful tests) follow it
            operation["responses"]["202"]["links"] = {
                name: {"operationId": target, "parameters": {"task_id": "$response.body#/task/id"}}
                for name, target in (("GetTask", "get_task"), ("CancelTask", "cancel_task"))}
        if op.description:
            operation["description"] = op.description
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": op.body}}}
        if op.form is not None:
            # One flat object: the form's fields (as marshmallow describes them) and the file parts.
            form = marshmallow.converter.schema2jsonschema(op.form)
            binary = {"type": "string", "contentMediaType": "application/octet-stream"}
            parts = {name: ({"type": "array", "items": binary, "minItems": 1, "description": what} if several
                            else {**binary, "description": what}) for name, (several, what) in op.files.items()}
            operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "properties": {**form["properties"], **parts},
                "required": sorted({*form.get("required", []), *parts})}}}}
        paths.setdefault(path, {})[op.method.lower()] = operation
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(build())


@bp.get("/docs")
def docs():
    """The document as a page: every operation, its parameters and schemas (no JavaScript needed)."""
    return render_template("api/docs.html", spec=build())
