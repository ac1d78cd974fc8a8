"""Context building: the system prompt, then the newest turns that fit the model's window minus the
tokens reserved for the answer, then this request's messages — counted with the model's tokenizer.

Tokenizers are `tokenizers` (Rust) files, never transformers: the chat process does not import torch.
They load once per model, in a thread; counting a large batch runs in a thread too. Counts per past
turn are cached, so a long conversation is not re-tokenized on every turn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from common.contracts import ModelRecord
from common.errors import ApiError
from services.chat.schemas import HistoryTurn

log = logging.getLogger(__name__)

INLINE_CHARS = 8_000  # count on the event loop below this many characters, in a thread above
RETRY_MISSING_TOKENIZER_S = 60.0


class TokenCounter:
    """Counts tokens of chat messages the way a model's chat template lays them out (closely enough:
    the engine still refuses a prompt that does not fit)."""

    name = "chars"
    per_message = 8  # role and separators around each message
    base = 16  # the generation prompt, and a default system prompt some templates add
    exact = False  # an estimate: trims history, but never refuses a request on its own

    def count(self, texts: list[str]) -> list[int]:
        # no tokenizer: about 3 characters a token, rounded up (a conservative guess)
        return [math.ceil(len(t) / 3) for t in texts]


class WordCounter(TokenCounter):
    """The synthetic engine's own count: words, plus 4 per message."""

    name = "words"
    per_message = 4
    base = 0
    exact = True

    def count(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]


class HFTokenizerCounter(TokenCounter):
    per_message = 5  # <|im_start|> role \n ... <|im_end|> \n
    base = 3 + 32  # "<|im_start|>assistant\n", plus room for a template's default system prompt
    exact = True

    def __init__(self, name: str, tokenizer) -> None:
        self.name = name
        self._tokenizer = tokenizer

    def count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


class Tokenizers:
    """One counter per model, loaded on first use off the event loop."""

    def __init__(self, model_cache: Path) -> None:
        self.model_cache = Path(model_cache)
        self._loaded: dict[str, TokenCounter] = {"words": WordCounter(), "chars": TokenCounter()}
        self._missing: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future] = {}

    @staticmethod
    def name_for(model: ModelRecord) -> str:
        if model.tokenizer:
            return model.tokenizer
        return "words" if model.deployment.engine == "synthetic" else "chars"

    async def counter(self, model: ModelRecord) -> TokenCounter:
        name = self.name_for(model)
        if (found := self._loaded.get(name)) is not None:
            return found
        if self._missing.get(name, 0) > time.monotonic():
            return self._loaded["chars"]
        if (pending := self._loading.get(name)) is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[name] = future
        try:
            counter = await asyncio.to_thread(self._load, name)
        except Exception as exc:
            log.warning("tokenizer unavailable; estimating tokens from characters",
                        extra={"tokenizer": name, "error": f"{type(exc).__name__}: {exc}"})
            self._missing[name] = time.monotonic() + RETRY_MISSING_TOKENIZER_S
            counter = self._loaded["chars"]
        else:
            self._loaded[name] = counter
        finally:
            del self._loading[name]
        future.set_result(counter)
        return counter

    def _load(self, name: str) -> TokenCounter:
        from tokenizers import Tokenizer  # Rust; no torch

        path = self.model_cache / name / "tokenizer.json"
        if ".." in Path(name).parts or not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json for '{name}' under {self.model_cache}")
        return HFTokenizerCounter(name, Tokenizer.from_file(str(path)))


@dataclass
class Context:
    messages: list[dict[str, str]]
    prompt_tokens: int  # as counted here
    kept_turns: int
    dropped_turns: int


class TurnCounts:
    """Token counts of past turns per tokenizer, so each turn is tokenized once (bounded LRU)."""

    def __init__(self, limit: int = 50_000) -> None:
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.limit = limit

    def get(self, tokenizer: str, turn_id: str) -> int | None:
        value = self._counts.get((tokenizer, turn_id))
        if value is not None:
            self._counts.move_to_end((tokenizer, turn_id))
        return value

    def put(self, tokenizer: str, turn_id: str, count: int) -> None:
        self._counts[(tokenizer, turn_id)] = count
        while len(self._counts) > self.limit:
            self._counts.popitem(last=False)


def history_messages(turn: HistoryTurn) -> list[dict[str, str]]:
    """What a past turn contributes to the context: what the user said (system messages of that request
    applied to that request only) and the assistant's answer."""
    said = [m for m in turn.messages if m.get("role") not in ("system", "developer")]
    return [*said, {"role": "assistant", "content": turn.assistant}]


async def _count(counter: TokenCounter, texts: list[str]) -> list[int]:
    if not texts:
        return []
    if sum(len(t) for t in texts) <= INLINE_CHARS:
        return counter.count(texts)
    return await asyncio.to_thread(counter.count, texts)


async def build_context(*, counter: TokenCounter, window: int, reserve: int, system_prompt: str,
                        history: list[HistoryTurn], request_messages: list[dict[str, str]],
                        counts: TurnCounts) -> Context:
    """system prompt + newest past turns that fit + this request's messages, within window - reserve."""
    budget = window - reserve
    system = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [m for m in request_messages if m["role"] == "system"]
    current = [m for m in request_messages if m["role"] != "system"]
    fixed_messages = system + current
    fixed = counter.base + sum(n + counter.per_message for n in
                               await _count(counter, [m["content"] for m in fixed_messages]))
    if fixed > budget and counter.exact:
        raise ApiError(400, f"The messages need about {fixed} tokens, but this model's window of {window} tokens "
                            f"leaves {budget} once {reserve} are reserved for the answer. Shorten the messages "
                            f"or lower max_tokens.", param="messages", code="context_length_exceeded")
    # count the turns not counted before, in one batch
    missing = [t for t in history if counts.get(counter.name, t.turn_id) is None]
    if missing:
        texts: list[str] = []
        spans: list[tuple[HistoryTurn, int, int]] = []
        for turn in missing:
            messages = history_messages(turn)
            spans.append((turn, len(texts), len(messages)))
            texts.extend(m["content"] for m in messages)
        numbers = await _count(counter, texts)
        for turn, start, n in spans:
            counts.put(counter.name, turn.turn_id,
                       sum(numbers[start:start + n]) + counter.per_message * n)
    used = fixed
    kept: list[HistoryTurn] = []
    for turn in reversed(history):  # newest first; stop at the first that does not fit
        cost = counts.get(counter.name, turn.turn_id) or 0
        if used + cost > budget:
            break
        used += cost
        kept.append(turn)
    kept.reverse()
    messages = [*system]
    for turn in kept:
        messages.extend(history_messages(turn))
    messages.extend(current)
    return Context(messages=messages, prompt_tokens=used, kept_turns=len(kept),
                   dropped_turns=len(history) - len(kept))
