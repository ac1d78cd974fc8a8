"""`dualgate chat`: a terminal chat with the platform, as its users see it.

Each answer streams token by token. The conversation lives on the server: one is made with the first
message and every turn names it, so the platform builds the context (`/history` reads it back). An
answer a fallback layer gave says so (`x-dualgate-degraded`), and an error is the API's own message.

    /model [name]   list the models your plan allows, or switch to one
    /new            start a new conversation
    /history        the conversation so far, from the server
    /quit           (or end of input)

The key: --key, else DUALGATE_API_KEY, else the local stack's demo key. The edge: --base-url, else
DUALGATE_BASE_URL, else the local stack's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

import httpx

from common.contracts import DEGRADED_HEADER

HELP = "commands: /model [name], /new, /history, /help, /quit"


class ChatError(Exception):
    """What the API answered instead: its message (and code) as the user should read it."""


def _error_of(response: httpx.Response) -> ChatError:
    try:
        error = response.json()["error"]
        return ChatError(f"{response.status_code} {error.get('code') or error.get('type')}: {error['message']}")
    except (ValueError, KeyError, TypeError):
        return ChatError(f"{response.status_code}: {response.text[:200]}")


class ChatSession:
    def __init__(self, http: httpx.Client, out: TextIO, model: str | None = None, max_tokens: int = 256) -> None:
        self.http = http
        self.out = out
        self.model = model
        self.max_tokens = max_tokens
        self.conversation: str | None = None

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def models(self) -> list[str]:
        response = self.http.get("/v1/models")
        if response.status_code != 200:
            raise _error_of(response)
        return [m["id"] for m in response.json()["data"]]

    def choose_model(self, name: str | None = None) -> None:
        available = self.models()
        if name is None:
            self.say("models: " + ", ".join(f"{m} (current)" if m == self.model else m for m in available))
        elif name in available:
            self.model = name
            self.say(f"model: {name}")
        else:
            self.say(f"no model {name!r} for your plan; /model lists them")

    def new(self) -> None:
        self.conversation = None
        self.say("new conversation")

    def _ensure_conversation(self) -> None:
        if self.conversation is not None:
            return
        response = self.http.post("/v1/conversations", json={"title": "dualgate chat"})
        if response.status_code == 201:
            self.conversation = response.json()["id"]
        elif response.status_code < 500:
            raise _error_of(response)
        else:  # the platform answers on without history: say so, and try again next turn
            self.say(f"(no conversation: {_error_of(response)}; this answer has no history)")

    def send(self, text: str) -> None:
        if self.model is None:
            self.model = self.models()[0]
        self._ensure_conversation()
        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": text}]}
        if self.conversation:
            body["conversation_id"] = self.conversation
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise _error_of(response)
            layer = response.headers.get(DEGRADED_HEADER)
            self._print_stream(response)
        if layer:
            self.say(f"[degraded: answered by the {layer} layer]")

    def _print_stream(self, response: httpx.Response) -> None:
        finished = False
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                break
            event = json.loads(data)
            if "error" in event:
                self.say()
                raise ChatError(f"stream ended: {event['error'].get('message')}")
            for choice in event.get("choices", ()):
                self.say(choice.get("delta", {}).get("content") or "", end="")
        self.say()
        if not finished:
            raise ChatError("the answer was cut off before it ended")

    def history(self) -> None:
        if self.conversation is None:
            self.say("(no conversation yet)")
            return
        after, shown = None, 0
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            response = self.http.get(f"/v1/conversations/{self.conversation}/messages", params=params)
            if response.status_code != 200:
                raise _error_of(response)
            page = response.json()
            for message in page["data"]:
                flag = f" [degraded: {message['degraded']}]" if message.get("degraded") else ""
                self.say(f"{message['role']}: {message['content']}{flag}")
                shown += 1
            if not page.get("has_more"):
                break
            after = page["last_id"]
        if not shown:
            self.say("(nothing stored yet)")

    def handle(self, line: str) -> bool:
        """One line from the user; False once they are done."""
        command, _, rest = line.strip().partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return False
            if command == "/help":
                self.say(HELP)
            elif command == "/model":
                self.choose_model(rest.strip() or None)
            elif command == "/new":
                self.new()
            elif command == "/history":
                self.history()
            elif command.startswith("/"):
                self.say(f"unknown command {command}; {HELP}")
            elif line.strip():
                self.send(line.strip())
        except ChatError as exc:
            self.say(f"error: {exc}")
        except httpx.HTTPError as exc:
            self.say(f"error: cannot reach the platform ({type(exc).__name__}: {exc})")
        return True


def _defaults() -> tuple[str, str | None]:
    """The local stack's edge and demo key, where there is one."""
    from stack.config import StackConfig

    config = StackConfig()
    key = None
    if config.credentials_file.exists():
        key = json.loads(config.credentials_file.read_text()).get("demo_key")
    return config.base_url, key


def main(args: argparse.Namespace) -> int:
    base_url, stack_key = _defaults()
    base_url = args.base_url or os.environ.get("DUALGATE_BASE_URL") or base_url
    key = args.key or os.environ.get("DUALGATE_API_KEY") or stack_key
    if not key:
        print("no API key: pass --key, set DUALGATE_API_KEY, or start the local stack (dualgate up)", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    with httpx.Client(base_url=base_url.rstrip("/"), headers={"authorization": f"Bearer {key}"},
                      timeout=httpx.Timeout(120.0, connect=5.0)) as http:
        session = ChatSession(http, sys.stdout, args.model, args.max_tokens)
        if interactive:
            session.say(f"dualgate chat at {base_url}; {HELP}")
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if not session.handle(line):
                break
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal: streamed answers, a server-kept conversation")
    chat.add_argument("--model", help="the model to start with (default: the first your plan allows)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--key", help="API key (default: DUALGATE_API_KEY, else the local stack's demo key)")
    chat.add_argument("--base-url", help="the edge (default: DUALGATE_BASE_URL, else the local stack's)")
    chat.set_defaults(func=main)
