"""multipart/form-data (RFC 7578) for POST /v1/predict, parsed from the body in memory.

The body is already bounded by serve.max_upload_bytes (BodyLimitMiddleware), so it is read whole and
split with bytes.find: no spooled temporary files and no per-chunk Python callbacks. On this path that
was about half of the service's own CPU per request (FastAPI's File() parameters re-inspect their type
annotations on every request, and python-multipart's parser calls back into Python per chunk).
Anything that is not well-formed raises `MalformedMultipart`; the service answers 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# one header parameter: ; name=token or ; name="quoted \" string"
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")
MAX_PARTS = 1024
MAX_HEADER_BYTES = 8192


class MalformedMultipart(ValueError):
    """The body is not valid multipart/form-data."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None for a plain (non-file) field
    content_type: str | None
    data: bytes


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="file"; filename="a.jpg"' -> ('form-data', {'name': 'file', 'filename': 'a.jpg'})."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return main.strip().lower(), params


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a multipart/form-data Content-Type, or None when it is not one (or names none)."""
    kind, params = header_params(content_type)
    if kind != "multipart/form-data":
        return None
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        return None
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        return None


def parse_form_data(body: bytes, boundary: bytes) -> list[Part]:
    """Every part of `body`, in order. Raises MalformedMultipart."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    if body.startswith(delimiter):
        pos = 0
    else:  # a preamble is allowed before the first delimiter line
        pos = body.find(separator)
        if pos < 0:
            raise MalformedMultipart("no multipart boundary in the body")
        pos += 2
    parts: list[Part] = []
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts  # the close delimiter; an epilogue may follow and is ignored
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise MalformedMultipart("a boundary line has trailing characters or no line end")
        headers_start = line_end + 2
        if body.startswith(b"\r\n", headers_start):  # a part without headers
            headers_end, content_start = headers_start, headers_start + 2
        else:
            headers_end = body.find(b"\r\n\r\n", headers_start, headers_start + MAX_HEADER_BYTES)
            if headers_end < 0:
                raise MalformedMultipart("a part's headers do not end (or exceed 8 KiB)")
            content_start = headers_end + 4
        content_end = body.find(separator, content_start)
        if content_end < 0:
            raise MalformedMultipart("a part is not closed by the boundary")
        parts.append(make_part(body[headers_start:headers_end], body[content_start:content_end]))
        if len(parts) > MAX_PARTS:
            raise MalformedMultipart(f"more than {MAX_PARTS} parts")
        pos = content_end + 2


def make_part(raw_headers: bytes, data: bytes) -> Part:
    disposition = content_type = None
    for line in raw_headers.split(b"\r\n") if raw_headers else ():
        name, colon, value = line.partition(b":")
        if not colon:
            raise MalformedMultipart("a part header line has no colon")
        key = name.strip().lower()
        text = value.strip().decode("utf-8", errors="replace")
        if key == b"content-disposition":
            disposition = text
        elif key == b"content-type":
            content_type = text
    if disposition is None:
        raise MalformedMultipart("a part has no Content-Disposition header")
    kind, params = header_params(disposition)
    if kind != "form-data" or "name" not in params:
        raise MalformedMultipart("a part's Content-Disposition is not form-data with a name")
    return Part(params["name"], params.get("filename"), content_type, data)
