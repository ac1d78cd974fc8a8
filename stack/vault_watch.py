"""Configure the stack's Vault again whenever supervisord restarts it (a supervisord event listener).

The local Vault runs in dev mode, which keeps everything in memory. When it crashes and supervisord
restarts it, it comes back with no engines, policies, AppRoles or secrets. The services keep what
they already fetched, but any service that starts after that cannot log in, and so cannot start at
all. `dualgate up` starts this listener after its own bootstrap. From then on, each time Vault runs
again the listener re-applies `vault_bootstrap.bootstrap`, with the versions recorded in the stack's
credentials (rotations included). The JWT transit key is the exception: Vault generates it, so it
cannot be restored, and a restart acts as a JWT key rotation (user JWTs signed before it stop verifying).

Protocol: supervisor's event listener protocol on stdin/stdout (`supervisor.childutils.listener`),
so nothing else may write to stdout; logs go to stderr.
"""

from __future__ import annotations

import logging
import sys

from supervisor import childutils
from tenacity import before_sleep_log, retry, stop_after_delay, wait_exponential

from stack import vault_bootstrap
from stack.config import StackConfig
from stack.credentials import load_or_create

LISTENER = "vault-bootstrap"
EVENTS = "PROCESS_STATE_RUNNING"
BOOTSTRAP_WITHIN_S = 300.0  # Postgres may be restarting too: its database engine needs it

log = logging.getLogger("dualgate.vault_watch")


@retry(stop=stop_after_delay(BOOTSTRAP_WITHIN_S), wait=wait_exponential(multiplier=0.2, max=5),
       before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)
def configure(config: StackConfig) -> None:
    """Bootstrap the restarted Vault. Credentials are read again each time, so rotations recorded
    since the stack came up are the ones applied."""
    vault_bootstrap.bootstrap(config, load_or_create(config))


def handle(headers: dict[str, str], payload: str, config: StackConfig) -> None:
    body, _ = childutils.eventdata(payload + "\n")
    if headers.get("eventname") == EVENTS and body.get("processname") == "vault":
        log.warning("vault is running again; configuring it")
        configure(config)
        log.warning("vault configured again")


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = StackConfig()
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        try:
            handle(headers, payload, config)
        except Exception:  # one failed attempt must not stop the listener: the next restart tries again
            log.exception("configuring vault failed")
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
