"""The context of a predict request's images (site, line, camera, lighting, batch...): the served model's
metadata columns, sent as non-file multipart fields (`site=C`) or as `X-Lensmith-Context-<column>: C`
headers (for clients that send no form fields); one context applies to every image of the request. It is
echoed in each prediction and kept in the prediction log and the review queue, so drift windows and review
items can be cut by it.

Checked before any image is decoded: at most serve.max_context_fields fields; only the model's metadata
columns (`unknown_context` naming them; a model that records none refuses every field); values UTF-8 text of
1 to serve.max_context_value_chars printable characters; a column sent twice must carry one value. Every
refusal is a 422 naming the field. A multipart field must match the column's name exactly; a header matches
it ignoring case and `-` vs `_` (HTTP header names are case-insensitive, and proxies often drop names with `_`).

A request without context costs one pass over its header names and its multipart parts: nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from lensmith.params import ServeParams
from lensmith.serve.apierrors import ApiError, loggable
from lensmith.serve.multipart import Part

HEADER_PREFIX = b"x-lensmith-context-"  # ASGI header names are lower-case
SHOWN_NAME_CHARS = 64


@dataclass(frozen=True)
class SentField:
    """One context field as the request sent it."""

    column: str  # the known column it names (a header's name already matched), or the name as sent
    raw: bytes
    origin: str  # how the messages call it: multipart field 'site' / header X-Lensmith-Context-site


def context_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """(name after the prefix, value) of every X-Lensmith-Context-* header of an ASGI header list."""
    return [(name[len(HEADER_PREFIX):], value) for name, value in headers if name.startswith(HEADER_PREFIX)]


def header_key(column: str) -> str:
    return column.lower().replace("_", "-")


def sent_fields(fields: list[Part], headers: list[tuple[bytes, bytes]], columns: tuple[str, ...]) -> list[SentField]:
    """The multipart fields, then the headers, each header name matched to the column it means."""
    by_header = {header_key(c): c for c in columns}
    sent = [SentField(p.name, p.data, f"multipart field {loggable(p.name, SHOWN_NAME_CHARS)!r}") for p in fields]
    for suffix, value in headers:
        name = suffix.decode("latin-1")
        sent.append(SentField(by_header.get(header_key(name), name), value, f"header X-Lensmith-Context-{loggable(name, SHOWN_NAME_CHARS)}"))
    return sent


def unknown_column(field: SentField, columns: tuple[str, ...], version: str) -> ApiError:
    if not columns:
        message = (
            f"{field.origin}: model {version} records no metadata columns, so it takes no context; send the images "
            "alone (a model trained on data with metadata columns, e.g. metadata.csv, takes them as context)"
        )
    else:
        message = f"{field.origin} is not a metadata column of model {version}; its context columns are {list(columns)}"
    return ApiError(422, "unknown_context", message)


def checked_value(field: SentField, max_chars: int) -> str:
    """The field's value as text; 422 invalid_context naming the field unless it is 1..max_chars printable characters."""
    try:
        value = field.raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_context", f"{field.origin}: the value is not UTF-8 text") from None
    if not value:
        raise ApiError(422, "invalid_context", f"{field.origin}: the value is empty")
    if len(value) > max_chars:
        raise ApiError(
            422, "invalid_context", f"{field.origin}: the value has {len(value)} characters; at most {max_chars} (serve.max_context_value_chars)"
        )
    if not value.isprintable():
        raise ApiError(422, "invalid_context", f"{field.origin}: the value holds control or other unprintable characters")
    return value


def request_context(
    fields: list[Part], headers: list[tuple[bytes, bytes]], columns: tuple[str, ...], version: str, params: ServeParams
) -> dict[str, str] | None:
    """column -> value of the request's context (None when it sent none), checked against the model's
    metadata `columns` and serve.max_context_*; ApiError 422 otherwise."""
    if not fields and not headers:
        return None
    sent = sent_fields(fields, headers, columns)
    if len(sent) > params.max_context_fields:
        raise ApiError(
            422, "invalid_context", f"{len(sent)} context fields sent; at most {params.max_context_fields} per request (serve.max_context_fields)"
        )
    context: dict[str, str] = {}
    for field in sent:
        if field.column not in columns:
            raise unknown_column(field, columns, version)
        value = checked_value(field, params.max_context_value_chars)
        if context.setdefault(field.column, value) != value:
            raise ApiError(422, "invalid_context", f"{field.origin}: column {field.column!r} was sent twice with different values")
    return context

