"""What every engine takes and yields, so the routes treat them alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    messages: list[dict]
    max_tokens: int = 256
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class TokenDelta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class EngineBusy(Exception):
    """The engine's queue is full: answer 429 with Retry-After."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__(f"engine busy, retry after {retry_after:.1f}s")
        self.retry_after = retry_after
