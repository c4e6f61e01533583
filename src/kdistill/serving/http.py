"""One HTTP call to a vLLM server (a served teacher, the student's engine), with errors that name the URL."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from kdistill.errors import KdistillError


def http_json(url: str, body: dict | None, timeout: float, text: bool = False) -> Any:
    """POST `body` (GET when None) and read a JSON answer (with `text`, any answer, as text); one try,
    errors say the URL and what went wrong."""
    try:
        return request_json(url, body, timeout, text)
    except KdistillError as err:
        raise KdistillError(err.args[0].removeprefix("permanent: ")) from None


def request_json(url: str, body: dict | None, timeout: float, text: bool = False) -> Any:
    """POST `body` (GET when None) and read a JSON answer (or, with `text`, the answer's text); errors
    say the URL and what went wrong.

    An error the server answered (4xx: a wrong model name, too many log-probs asked for) is marked
    permanent: retrying it cannot help.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
            return answer.decode(errors="replace") if text else json.loads(answer)
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        kind = "permanent: " if 400 <= err.code < 500 else ""
        raise KdistillError(f"{kind}server {url} answered {err.code}: {detail}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, json.JSONDecodeError) as err:
        reason = getattr(err, "reason", err)
        raise KdistillError(f"server {url} cannot be reached or gave no JSON ({reason})") from None
