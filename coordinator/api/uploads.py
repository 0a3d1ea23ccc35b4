"""Job creation with the user's weights file: ``multipart/form-data`` with a ``job`` JSON field and an optional
``weights`` file, so that weights reach a remote coordinator over REST (never as a server-side path)."""
from __future__ import annotations

import json
from typing import Any

from flask import Request

MAX_WEIGHTS_BYTES = 256 << 20  # a multipart job request; every other request keeps the app's JSON limit


class UploadError(ValueError):
    """The multipart job request is malformed; the message says what is expected."""


def multipart_job(request: Request) -> tuple[dict[str, Any], bytes | None, str]:
    """(job body, weights bytes or None, the file's name) from a multipart ``POST /jobs``."""
    request.max_content_length = MAX_WEIGHTS_BYTES  # before the form is parsed
    extra = sorted(set(request.form) - {"job"}) + sorted(set(request.files) - {"weights"})
    if extra:
        raise UploadError(f"unknown multipart field(s) {', '.join(map(repr, extra))}; allowed: 'job' (JSON), "
                          "'weights' (file)")
    raw = request.form.get("job")
    if raw is None:
        raise UploadError("multipart job request needs a 'job' field holding the job JSON")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise UploadError(f"multipart field 'job' is not valid JSON: {exc}") from None
    upload = request.files.get("weights")
    if upload is None:
        return body, None, ""
    data = upload.read()
    if not data:
        raise UploadError("uploaded weights file is empty")
    return body, data, upload.filename or "weights"
