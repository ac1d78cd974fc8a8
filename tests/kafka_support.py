"""Producing from a test the way any producer would: a broker just restarted by a drill (the embedded
Tansu keeps topics in memory) may refuse a first produce with UnknownError, so sends are retried.
A copy that did land is harmless: every consumer here is idempotent by event or turn id."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential


async def produce(producer: AIOKafkaProducer, topic: str, key: str, value: bytes) -> None:
    async for attempt in AsyncRetrying(retry=retry_if_exception_type(KafkaError), stop=stop_after_attempt(5),
                                       wait=wait_exponential(multiplier=0.2, max=2), reraise=True):
        with attempt:
            await producer.send_and_wait(topic, value, key=key.encode())
