"""`dualgate chat`, driven as a person would: lines typed in, what the terminal shows read back."""

from __future__ import annotations

import subprocess
import sys

import httpx

from common.settings import REPO_ROOT
from stack.supervisor import Supervisor


def _chat(stack, lines: list[str], *args: str) -> str:
    env = {"DUALGATE_HOME": str(stack.config.home), "DUALGATE_PORT_OFFSET": str(stack.config.port_offset),
           "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "stack.cli", "chat", "--model", "synthetic", "--max-tokens", "6",
                          *args], input="\n".join(lines) + "\n", cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_chat_streams_keeps_the_conversation_on_the_server_and_switches_models(stack):
    out = _chat(stack, ["first question", "second question", "/history", "/model", "/model no-such-model",
                        "/new", "/history", "/quit", "never sent"])
    lines = out.splitlines()
    answers = [line for line in lines if line and not line.startswith(("user:", "assistant:", "models:", "no model",
                                                                       "new conversation", "("))]
    assert len(answers) == 2 and all(answers), out  # two streamed answers, each with text
    # the history comes from the server: both turns, in order, with the answers shown
    history = [line for line in lines if line.startswith(("user:", "assistant:"))]
    assert history == ["user: first question", f"assistant: {answers[0]}", "user: second question",
                       f"assistant: {answers[1]}"], out
    assert any(line.startswith("models: ") and "synthetic (current)" in line for line in lines), out
    assert "no model 'no-such-model' for your plan; /model lists them" in lines
    assert lines[-1] == "(no conversation yet)"  # /new forgot the conversation; nothing after /quit ran


def test_chat_shows_a_fallback_answer_as_degraded_and_an_error_as_the_api_said_it(stack, creds):
    supervisor = Supervisor(stack.config)
    supervisor.stop("inference")
    try:
        out = _chat(stack, ["are you there?"])
    finally:
        supervisor.start("inference")
        stack.wait_ready(("inference",), 60.0)
    assert "[degraded: answered by the" in out, out
    refused = _chat(stack, ["hello"], "--key", "dg-0000000000000000-not-a-real-secret")
    assert refused.startswith("error: 401"), refused
    with httpx.Client(base_url=stack.config.base_url, timeout=30) as http:  # the stack answers cleanly again
        answer = http.get("/v1/models", headers={"authorization": f"Bearer {creds.demo_key}"})
    assert answer.status_code == 200
