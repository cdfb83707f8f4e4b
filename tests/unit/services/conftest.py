"""Service tests: real services and SQLite, a fake outbox and a fake clock."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.services import Harness, HarnessWith, World, build_world, harness


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path / "data") as running:
        yield running


@pytest.fixture
async def world(h: Harness) -> World:
    return await build_world(h)


@pytest.fixture
def harness_with(tmp_path: Path) -> HarnessWith:
    """``async with harness_with(max_group_members=3) as h:`` for per-test settings;
    each call is a fresh data directory unless ``data_dir`` names one (a restart)."""
    counter = itertools.count()

    def make(
        data_dir: Path | None = None, **overrides: Any
    ) -> AbstractAsyncContextManager[Harness]:
        return harness(data_dir or tmp_path / f"data{next(counter)}", **overrides)

    return make
