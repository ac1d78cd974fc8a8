from __future__ import annotations

import msgspec

from common.openai_schema import Usage


class StreamPeek(msgspec.Struct):
    """The few fields of a chunk the chat service reads to persist the turn; the rest is relayed."""

    choices: list[dict] = []
    usage: Usage | None = None
    error: dict | None = None
    id: str = ""
