"""The stack's credentials file under several processes at once: the Vault listener, drills and
benches read it while `dualgate secrets rotate` writes it."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor

import msgspec

from stack.config import StackConfig
from stack.credentials import Credentials, load_or_create, save


def test_reading_complete_credentials_does_not_write_them_back(tmp_path):
    config = StackConfig(home=tmp_path)
    created = load_or_create(config)
    before = os.stat(config.credentials_file)

    # a rotation saved between a reader's read and its write-back would be undone by that write
    assert load_or_create(config) == created
    after = os.stat(config.credentials_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert stat.S_IMODE(after.st_mode) == 0o600


def test_concurrent_writers_all_succeed_and_leave_one_whole_file(tmp_path):
    config = StackConfig(home=tmp_path)
    base = load_or_create(config)
    versions = [msgspec.structs.replace(base, demo_user=f"usr_{n}") for n in range(8)]

    def write_many(creds: Credentials) -> None:
        for _ in range(100):
            save(config, creds)

    with ThreadPoolExecutor(max_workers=len(versions)) as pool:
        list(pool.map(write_many, versions))  # re-raises any writer's error

    assert msgspec.json.decode(config.credentials_file.read_bytes(), type=Credentials) in versions
    assert [p.name for p in tmp_path.iterdir()] == [config.credentials_file.name]  # no temporary file left
