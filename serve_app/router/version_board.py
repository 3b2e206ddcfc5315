"""The rollbacks of every router replica in one place: a deployment of the router's application
(`version-board`, one replica, like the quota ledger), and each router replica's loop that
shares its own rollbacks and takes the others' (`share_rollbacks`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from .versions import RollbackBoard, Versions

logger = logging.getLogger("ray.serve")
SYNC_PERIOD_S = 1.0


@serve.deployment
class VersionBoardDeployment:
    def __init__(self) -> None:
        self._board = RollbackBoard()

    def sync(self, live: list[str], mine: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return self._board.sync(live, mine)

    def forget(self, keep: list[str]) -> None:
        self._board.forget(keep)


async def share_rollbacks(
    handle: DeploymentHandle,
    versions: Callable[[], Versions],
    on_rollback: Callable[[str], None],
    period_s: float = SYNC_PERIOD_S,
) -> None:
    """Forever: this replica's rollbacks to the board, everyone's back (`on_rollback` for each
    one new here). A board that does not answer is tried again at the next period."""
    forgotten: list[str] | None = None
    while True:
        current = versions()
        live = current.candidates
        try:
            if forgotten != live:  # candidates changed: the board drops those gone
                await handle.forget.remote(live)
                forgotten = live
            mine = {key: vars(entry) for key, entry in current.rolled_back.items()}
            board = await handle.sync.remote(live, mine)
            for key in current.merge(board):
                on_rollback(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("the version board did not answer; rollbacks are shared later")
        await asyncio.sleep(period_s)
