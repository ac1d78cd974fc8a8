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
    # what keeps a conversation on one runtime worker (its prefix cache): the conversation id when
    # there is one; engines without workers ignore it
    affinity_key: str | None = None
    model: str = ""  # the model name the runtime serves (SGLang's "model" field)


@dataclass
class TokenDelta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    worker: str | None = None  # which runtime worker answered, for engines that have several


class EngineBusy(Exception):
    """The engine's queue is full: answer 429 with Retry-After."""

    def __init__(self, retry_after: float = 1.0) -> None:
        super().__init__(f"engine busy, retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """No capacity can answer at all (every worker down): answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineRejected(Exception):
    """The runtime refused the request itself (its 4xx): the caller's problem, passed on as 400."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
