"""Server-sent events: encode frames, and read `data:` payloads from a byte stream.

Only hops that must read content parse the stream; the others relay bytes untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from common.errors import ErrorEnvelope

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
