"""The load generator's side of every bench: a keep-alive HTTP/1.1 client over a bare socket that parses
in C, the synthetic workload it asks for, and what it records."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass, field

import httptools

from stack.config import StackConfig
from stack.report import percentiles

SYNTHETIC = {"ttft_ms": 20, "itl_ms": 5, "tokens": 32}
STAMPED = "bench-synthetic-stamped"  # the synthetic engine, each token its emission time (CLOCK_MONOTONIC ns)
STAMPED_PARAMS = {**SYNTHETIC, "stamp": 1}
BLOCKS = 4  # alternate direct/chain blocks per level
ANSWER_TIMEOUT = 30.0
STREAM_SECONDS = (SYNTHETIC["ttft_ms"] + SYNTHETIC["tokens"] * SYNTHETIC["itl_ms"]) / 1000  # one answer, alone
FIRST_TOKEN = re.compile(rb'"content":"[^"]')  # the role chunk carries "content":"" and does not count
TOKEN_STAMP = re.compile(rb'"content":" ?t(\d+)"')


@dataclass
class Samples:
    total_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)  # each token, from its emission to its arrival
    errors: int = 0


def raw_request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """One HTTP/1.1 request as the bytes sent (keep-alive is HTTP/1.1's default)."""
    head = f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode() + body


class StreamedAnswer:
    """What the load generator reads of one answer, from httptools' (C, llhttp) parser callbacks."""

    __slots__ = ("hit", "first", "complete", "closing", "token_ms", "_tail")

    def __init__(self) -> None:
        self.token_ms: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.hit = False  # x-cache: hit
        self.first = 0.0  # when the first generated token arrived
        self.complete = False
        self.closing = False  # the server closes the connection after this answer
        self.token_ms.clear()
        self._tail = b""  # an event cut between two reads is matched when the rest arrives

    def on_header(self, name: bytes, value: bytes) -> None:
        if value == b"hit" and name.lower() == b"x-cache":
            self.hit = True
        elif value.lower() == b"close" and name.lower() == b"connection":
            self.closing = True

    def on_body(self, body: bytes) -> None:
        if not self.first and FIRST_TOKEN.search(body):
            self.first = time.perf_counter()
        now, data, end = time.monotonic_ns(), self._tail + body, 0
        for stamp in TOKEN_STAMP.finditer(data):
            self.token_ms.append((now - int(stamp[1])) / 1e6)
            end = stamp.end()
        self._tail = data[end:][-64:]

    def on_message_complete(self) -> None:
        self.complete = True


class RawConnection:
    """A keep-alive HTTP/1.1 client over a bare socket, parsing in C: the load generator shares the two
    cores with the servers it measures, so it must cost as little as it can per request and per chunk
    (an httpx client cost more CPU per streamed answer than the router relaying it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.answer = StreamedAnswer()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = None

    async def exchange(self, request: bytes) -> int:
        """Send `request`, read its whole answer; returns the status (self.answer holds the rest)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._parser = httptools.HttpResponseParser(self.answer)
        self.answer.reset()
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                self._writer.write(request)
                while not self.answer.complete:
                    data = await self._reader.read(65536)
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    self._parser.feed_data(data)
        except (OSError, httptools.HttpParserError):  # TimeoutError included
            self.close()
            raise
        status = self._parser.get_status_code()
        if self.answer.closing:
            self.close()
        return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def one_request(connection: RawConnection, request, samples: Samples) -> None:
    """One streamed request; `request` builds its bytes (each one new, so each is a cache miss)."""
    started = time.perf_counter()
    try:
        status = await connection.exchange(request())
    except (OSError, httptools.HttpParserError):
        samples.errors += 1
        return
    if status != 200:
        samples.errors += 1
        return
    done = time.perf_counter()
    samples.total_ms.append((done - started) * 1000)
    samples.ttft_ms.append(((connection.answer.first or done) - started) * 1000)
    samples.token_ms.extend(connection.answer.token_ms)


async def run_block(host: str, port: int, request, count: int, concurrency: int, samples: Samples,
                    advance, stagger: float = 0.0) -> None:
    """`count` requests, `concurrency` at a time; worker i starts i * `stagger` seconds in."""
    queue = iter(range(count))

    async def worker(i: int):
        await asyncio.sleep(i * stagger)  # an arrival schedule, not a wait for a condition
        connection = RawConnection(host, port)
        try:
            for _ in queue:
                await one_request(connection, request, samples)
                advance()
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


def summarize(samples: Samples) -> dict:
    return {
        "requests": len(samples.total_ms), "errors": samples.errors,
        "total_ms": percentiles(samples.total_ms),
        "ttft_ms": percentiles(samples.ttft_ms),
        "token_ms": percentiles(samples.token_ms),
        "tokens": len(samples.token_ms),
        "mean_total_ms": round(statistics.fmean(samples.total_ms), 2) if samples.total_ms else None,
    }


def ms_text(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def process_cpu(config: StackConfig) -> dict[str, float]:
    """CPU seconds used so far by each running component (and by this load generator)."""
    import psutil

    from stack.supervisor import Supervisor

    used = {"load-generator": sum(psutil.Process().cpu_times()[:2])}
    for name, info in Supervisor(config).processes().items():
        if info.get("pid"):
            try:
                process = psutil.Process(info["pid"])
                used[name] = sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
            except psutil.Error:
                pass
    return used
