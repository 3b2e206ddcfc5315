"""The router replicas' shared rollbacks (`serve_app.router.version_board`): each replica's loop
sends its own rollbacks to the board and applies the others', and a board that does not answer
only delays them."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app.config import AppConfig
from serve_app.router.version_board import share_rollbacks
from serve_app.router.versions import RollbackBoard, Versions


def versioned() -> Versions:
    return Versions(AppConfig.model_validate({"tiers": [{"name": "small", "candidate": {
        "version": "v2", "weight_percent": 100}}]}))  # fmt: skip


class Method:
    def __init__(self, fn: Any, failing: list[bool]) -> None:
        self._fn = fn
        self._failing = failing

    def remote(self, *args: Any) -> Any:
        async def call() -> Any:
            if self._failing[0]:
                raise ConnectionError("the board is restarting")
            return self._fn(*args)

        return call()


class BoardHandle:
    """The board deployment's handle, in process."""

    def __init__(self, board: RollbackBoard) -> None:
        self.failing = [False]
        self.sync = Method(board.sync, self.failing)
        self.forget = Method(board.forget, self.failing)


def test_a_rollback_decided_by_one_replica_reaches_the_other() -> None:
    one, two, handle = versioned(), versioned(), BoardHandle(RollbackBoard())
    applied: list[str] = []

    async def run() -> None:
        handle.failing[0] = True  # the board is down at first: nothing is lost
        loops = [
            asyncio.create_task(share_rollbacks(handle, lambda: one, applied.append, 0.01)),  # type: ignore[arg-type]
            asyncio.create_task(share_rollbacks(handle, lambda: two, applied.append, 0.01)),  # type: ignore[arg-type]
        ]
        one.roll_back("small@v2", "error_rate: seen by one")
        await asyncio.sleep(0.05)
        assert not two.rolled_back
        handle.failing[0] = False
        for _ in range(100):
            if two.rolled_back:
                break
            await asyncio.sleep(0.01)
        for loop in loops:
            loop.cancel()

    asyncio.run(run())
    assert two.rolled_back["small@v2"].reason == "error_rate: seen by one"
    assert applied == ["small@v2"]  # the replica that learnt it records its metric
    assert two.pick("small", "s:a").version == "stable"
