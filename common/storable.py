"""Text Postgres cannot store: a NUL (text and jsonb refuse "\\u0000") and a lone UTF-16 surrogate (not a
character at all; msgspec refuses it without naming the field). A JSON body carrying either is refused
with a 400 naming the field before anything is answered or stored (common.errors.decode_body), so it
never becomes a retryable error, a turn the writer cannot store, or a 500."""

from __future__ import annotations

import json
import re

# the only ways such text gets into valid JSON: a \u0000 escape or a surrogate escape (raw NUL bytes and
# raw encoded surrogates are not valid JSON); a cheap scan spares the full walk for every other body
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_field(body: bytes) -> tuple[str, str] | None:
    """The path of the first string (or key) in a JSON body that Postgres cannot store, in the form
    msgspec names fields (`messages[0].content`; "" for the body itself), and what is wrong with it.
    None when there is none, or when the body is not JSON the stdlib reads (decoding reports that)."""
    if not _SUSPECT_ESCAPE.search(body):
        return None
    try:
        document = json.loads(body)  # unlike msgspec, it keeps lone surrogates, so they can be located
    except (ValueError, RecursionError):
        return None
    return _find(document, "")


def _problem(text: str) -> str:
    return "a NUL character (\\u0000)" if "\x00" in text else "an unpaired UTF-16 surrogate"


def _find(value: object, path: str) -> tuple[str, str] | None:
    pending = [(value, path)]
    while pending:  # iterative: a deeply nested body cannot exhaust the stack here
        value, path = pending.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                return path, _problem(value)
        elif isinstance(value, dict):
            found = []
            for key, item in value.items():
                if _UNSTORABLE.search(key):
                    return path, f"a key with {_problem(key)}"
                found.append((item, f"{path}.{key}" if path else key))
            pending.extend(reversed(found))  # depth first, in document order
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None
