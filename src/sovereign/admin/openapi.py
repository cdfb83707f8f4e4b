"""The OpenAPI 3.1 document of the admin API, served at ``/admin/api/openapi.json``.

Written by hand next to the routes it describes (``admin/http.py``); the schemathesis
test in ``tests/integration/test_admin_openapi.py`` checks the server against it.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "integer"},
                "message": {"type": "string"},
                "field": {"type": "string"},
            },
        }
    },
}
_PAGINATION = {
    "type": "object",
    "required": ["offset", "limit", "total"],
    "properties": {
        "offset": {"type": "integer"},
        "limit": {"type": "integer"},
        "total": {"type": "integer"},
    },
}
_USER = {
    "type": "object",
    "required": ["id", "username", "display_name", "is_admin", "enabled", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "username": {"type": "string"},
        "display_name": {"type": "string"},
        "is_admin": {"type": "boolean"},
        "enabled": {"type": "boolean"},
        "created_at": {"type": "integer"},
    },
}
_SETTING = {
    "type": "object",
    "required": ["key", "value", "source"],
    "properties": {
        "key": {"type": "string"},
        "value": {},
        "source": {"enum": ["default", "file", "env", "flag", "admin"]},
    },
}
_PAGE_PARAMS = [
    {
        "name": "offset",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
    },
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {
        400: "Malformed JSON",
        401: "No valid admin credentials",
        403: "Not a server admin, or a cross-origin cookie write",
        404: "Not found",
        409: "Conflict (the last admin)",
        413: "Body too large",
        422: "A field is invalid (named in error.field)",
    }
    return {str(c): _json(_ref("Error"), names[c]) for c in codes}


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "pagination"],
        "properties": {"data": {"type": "array", "items": item}, "pagination": _ref("Pagination")},
    }


def _op(
    summary: str,
    ok: dict[str, Any],
    *errors: int,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    status: int = 200,
    body_required: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(status): ok, **_errors(401, 403, *errors)},
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": body}},
        }
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_NO_CONTENT = {"description": "Done"}


def document(version: str) -> dict[str, Any]:
    settings_body = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "server_name": {"type": "string", "minLength": 1, "maxLength": 64},
            "registration": {"enum": ["open", "invite", "closed"]},
            "max_connections": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "max_connections_per_user": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1_000,
                "description": "at most max_connections (422 otherwise)",
            },
            "rate_limit_per_second": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 1_000_000,
            },
            "rate_limit_burst": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "max_message_size_bytes": {
                "type": "integer",
                "minimum": 1,
                "description": "at most max_envelope_bytes (422 otherwise)",
            },
            "session_timeout_hours": {"type": "integer", "minimum": 1, "maximum": 87_600},
            "min_key_packages": {
                "type": "integer",
                "minimum": 0,
                "description": "at most max_key_packages (422 otherwise)",
            },
        },
    }
    settings_list = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": _ref("Setting")}},
    }
    paths: dict[str, Any] = {
        "/admin/api/info": {
            "get": _op("Server overview", _json({"type": "object"})),
        },
        "/admin/api/stats": {
            "get": _op("Connections and messages per minute, last hour", _json({"type": "object"}))
        },
        "/admin/api/users": {
            "get": _op(
                "List users",
                _json(_list(_ref("User"))),
                422,
                params=[
                    {"name": "search", "in": "query", "schema": {"type": "string"}},
                    *_PAGE_PARAMS,
                ],
            )
        },
        "/admin/api/users/{id}": {
            "get": _op("User detail", _json(_ref("User")), 404, params=_ID),
            "put": _op(
                "Change display_name, enabled, is_admin",
                _json(_ref("User")),
                400,
                404,
                409,
                413,
                422,
                params=_ID,
                body={
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        "display_name": {"type": "string", "minLength": 1, "maxLength": 64},
                        "enabled": {"type": "boolean"},
                        "is_admin": {"type": "boolean"},
                    },
                },
            ),
            "delete": _op("Delete a user", _NO_CONTENT, 404, 409, params=_ID, status=204),
        },
        "/admin/api/users/{id}/sessions": {
            "delete": _op(
                "Revoke every session of a user", _json({"type": "object"}), 404, params=_ID
            )
        },
        "/admin/api/settings": {
            "get": _op("Runtime settings with their source", _json(settings_list)),
            "put": _op(
                "Change settings (validated whole, applied live, stored)",
                _json(settings_list),
                400,
                413,
                422,
                body=settings_body,
            ),
        },
        "/admin/api/settings/{key}": {
            "delete": _op(
                "Reset a setting to its start-up value",
                _json(settings_list),
                404,
                params=[
                    {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            )
        },
        "/admin/api/sessions": {
            "get": _op(
                "Active sessions",
                _json(_list({"type": "object"})),
                422,
                params=[
                    {"name": "user_id", "in": "query", "schema": {"type": "string"}},
                    *_PAGE_PARAMS,
                ],
            )
        },
        "/admin/api/sessions/{id}": {
            "delete": _op(
                "Revoke a session (closes its sockets 4004)",
                _NO_CONTENT,
                404,
                params=_ID,
                status=204,
            )
        },
        "/admin/api/invites": {
            "get": _op("Invites", _json(_list({"type": "object"})), 422, params=_PAGE_PARAMS),
            "post": _op(
                "Create a single-use invite (the code is shown once)",
                _json({"type": "object", "required": ["code"]}, "Created"),
                400,
                413,
                422,
                body={
                    "type": "object",
                    "properties": {
                        "expires_in_hours": {"type": "integer", "minimum": 0, "maximum": 8760}
                    },
                },
                status=201,
                body_required=False,
            ),
        },
        "/admin/api/invites/{code}": {
            "delete": _op(
                "Revoke an invite (by code or by id)",
                _NO_CONTENT,
                404,
                params=[
                    {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                status=204,
            )
        },
        "/admin/api/mls/conversations": {
            "get": _op(
                "MLS health per conversation",
                _json(_list({"type": "object"})),
                422,
                params=_PAGE_PARAMS,
            )
        },
        "/admin/api/mls/devices": {
            "get": _op(
                "KeyPackage pools per device",
                _json(_list({"type": "object"})),
                422,
                params=_PAGE_PARAMS,
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sovereign admin API",
            "version": version,
            "description": "SPEC §10. Bearer session token of a server admin, or the panel's "
            "cookie. The passkey ceremonies (/admin/api/login/*, /admin/api/setup/*) are for "
            "the browser panel and are not listed.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR,
                "Pagination": _PAGINATION,
                "User": _USER,
                "Setting": _SETTING,
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
