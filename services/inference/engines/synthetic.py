"""A model-free engine: deterministic tokens at a set time-to-first-token and inter-token delay.

Used for benchmarks and drills, where the cost of the platform must be measured apart from
the cost of a model. It is named as such in /v1/models.

With `echo` set it answers with a digest of the context it was given, one word per message
(`<role initial>:<first word>`), so a test can see which turns a conversation's context kept.
With `stamp` set each word is `t<CLOCK_MONOTONIC ns>` taken as it is emitted, so a client on the same
machine can tell how long each token took to reach it (`dualgate bench overhead`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.engines.base import Finished, GenerationRequest, TokenDelta

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa")


@dataclass(frozen=True)
class SyntheticEngine:
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    tokens: int = 32
    echo: bool = False
    stamp: bool = False

    @classmethod
    def from_params(cls, params: dict[str, float]) -> "SyntheticEngine":
        return cls(ttft_ms=float(params.get("ttft_ms", 20.0)), itl_ms=float(params.get("itl_ms", 5.0)),
                   tokens=int(params.get("tokens", 32)), echo=bool(params.get("echo", 0)),
                   stamp=bool(params.get("stamp", 0)))

    @staticmethod
    def count_prompt_tokens(messages: list[dict]) -> int:
        return sum(len(m["content"].split()) + 4 for m in messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        # the same prompt always yields the same words: caches and tests can rely on it
        digest = hashlib.sha256(repr(request.messages).encode()).digest()
        if self.echo:
            words = [f"{m['role'][:1]}:{(m['content'].split() or ['-'])[0]}" for m in request.messages]
        else:
            words = [WORDS[digest[i % len(digest)] % len(WORDS)] for i in range(self.tokens)]
        length = min(len(words), request.max_tokens)
        text = ""
        await asyncio.sleep(self.ttft_ms / 1000)
        for i in range(length):
            if i:
                await asyncio.sleep(self.itl_ms / 1000)
            word = f"t{time.monotonic_ns()}" if self.stamp else words[i]
            piece = ("" if i == 0 else " ") + word
            emitted = len(text)
            text += piece
            cut = min((text.find(s) for s in request.stop if s and s in text), default=-1)
            if cut >= 0:  # never emit the stop string or what follows it
                if cut > emitted:
                    yield TokenDelta(text[emitted:cut])
                yield Finished("stop", self.count_prompt_tokens(request.messages), i)
                return
            yield TokenDelta(piece)
        if self.echo:
            reason = "length" if length < len(words) else "stop"
        else:
            reason = "length" if length == request.max_tokens else "stop"
        yield Finished(reason, self.count_prompt_tokens(request.messages), length)
