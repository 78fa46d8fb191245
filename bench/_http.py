"""Raw HTTP/1.1 requests the serving benchmarks send (built once, sent many times over keep-alive sockets)."""

from __future__ import annotations

import uuid


def multipart_predict_request(host: str, image: bytes, content_type: str = "image/jpeg", filename: str = "x.jpg") -> bytes:
    """A complete POST /v1/predict with `image` as the multipart field `file`."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body
