"""Server-sent events: encode frames, and read `data:` payloads from a byte stream.

Only hops that must read content parse the stream; the others relay bytes untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from common.errors import ErrorBody, ErrorEnvelope
from common.openai_schema import Usage

DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()


def frame(payload: msgspec.Struct | dict) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def error_frame(error: ErrorEnvelope) -> bytes:
    """A terminal error event: the OpenAI SDK raises on a `data: {"error": ...}` event."""
    return frame(error) + DONE


async def iter_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield each event's `data:` payload (bytes) from a raw SSE byte stream, `[DONE]` included."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[:end], buffer[end + 2:]
            data = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data)


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


# ---- reading what a gateway must from a relayed stream ------------------------------------

_USAGE_MARK = b'"usage":{'
_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_ERROR_MARK = b'data: {"error"'
_FINISH_MARK = b'"finish_reason":"'


class _UsagePeek(msgspec.Struct):
    usage: Usage | None = None
    choices: list[msgspec.Raw] = []


_usage_decoder = msgspec.json.Decoder(_UsagePeek)


class StreamTap:
    """Cuts a relayed SSE byte stream at event boundaries and notes what the gateway needs.

    `feed(chunk)` returns the complete events to relay now (a partial event waits for its end),
    so an error event appended later always starts on a boundary. It decodes nothing but the
    final usage chunk: tokens are counted by a byte search, per chunk, not per JSON document.
    With `drop_usage` the usage-only chunk (which the gateway asked for itself) is not relayed.
    """

    __slots__ = ("_pending", "_drop_usage", "tokens", "usage", "done", "errored", "finished")

    def __init__(self, drop_usage: bool = False) -> None:
        self._pending = b""
        self._drop_usage = drop_usage
        self.tokens = 0  # content deltas seen (one per generated token on our engines)
        self.usage: Usage | None = None
        self.done = False  # `data: [DONE]` seen
        self.errored = False  # an error event seen
        self.finished = False  # a finish_reason seen

    def feed(self, chunk: bytes) -> bytes:
        if self._pending:
            chunk = self._pending + chunk
        cut = chunk.rfind(b"\n\n")
        if cut < 0:
            self._pending = chunk
            return b""
        out, self._pending = chunk[:cut + 2], chunk[cut + 2:]
        self.tokens += out.count(_CONTENT) - out.count(_EMPTY_CONTENT)
        if not self.finished and _FINISH_MARK in out:
            self.finished = True
        if _ERROR_MARK in out:
            self.errored = True
        if _USAGE_MARK in out:
            out = self._read_usage(out)
        if out.endswith(DONE):
            self.done = True
        return out

    def _read_usage(self, out: bytes) -> bytes:
        kept = []
        for event in out.split(b"\n\n")[:-1]:
            if _USAGE_MARK in event and event.startswith(b"data: "):
                try:
                    peek = _usage_decoder.decode(event[6:])
                except msgspec.MsgspecError:
                    peek = None
                if peek is not None and peek.usage is not None:
                    self.usage = peek.usage
                    if self._drop_usage and not peek.choices:
                        continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    @property
    def complete(self) -> bool:
        """Ended as a whole answer: [DONE], a finish reason, usage, no error."""
        return self.done and self.finished and self.usage is not None and not self.errored


def error_event(message: str, *, type: str = "server_error", code: str | None = None) -> bytes:
    """A terminal error event (`data: {"error": ...}` then `data: [DONE]`): never a silent cut."""
    return error_frame(ErrorEnvelope(ErrorBody(message=message, type=type, code=code)))
