"""`Healer`: a replica takes up the streams of replicas that died.

Every replica looks every `heal_poll_seconds` (`RayLimits`, 1 s) for recorded replicas whose Ray actor is gone (`placement.dead_replicas`:
Ray's own record, not a heartbeat, so a slow replica is never robbed); exactly one survivor claims each
(`placement.claim`). With a state root (`serve-ray --livevlm-state-dir ROOT`, on storage every replica's
node reaches) each replica checkpoints its streams into `ROOT/<its tag>/` (the single server's
`Checkpointer`), and the claimant restores every checkpoint of the dead one into its own dir (the stream
keeps its id, its owner token and its memory as of the checkpoint, and reports the frames it lost) and
records the stream's new home (`placement`) only once it holds the stream. Then it records the dead
replica as healed: its streams without a record (no state root, no checkpoint, or one that failed to
restore) answer 404 from then on instead of 503. Dirs of replicas the cluster never recorded (an earlier
cluster's, on the same root) are taken up the same way: an application started again resumes its streams.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_livevlm.log import get_logger
from vllm_livevlm.portable.checkpoints import SUFFIX
from vllm_livevlm.serving.ray import placement
from vllm_livevlm.serving.ray.ids import is_tag

if TYPE_CHECKING:
    from vllm_livevlm.serving.service import StreamService

logger = get_logger(__name__)

def own_dir(root: Path, tag: str) -> Path:
    """A new replica's state dir under the root (its replica is recorded first: `placement.record_replica`)."""
    directory = root / tag
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class Healer:
    def __init__(self, service: "StreamService", root: Path | None, tag: str, poll_s: float):
        self.service, self.root, self.tag, self.poll_s = service, root, tag, poll_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                for dead in await asyncio.to_thread(self._claim_dead):
                    await self._take_up(dead)
            except Exception:  # one failed round never stops healing
                logger.exception("LiveVLM: healing streams of dead replicas failed")

    def _claim_dead(self) -> list[str]:
        """The tags of dead replicas this replica won: recorded ones whose actor is gone, and the dirs of
        replicas this cluster never recorded (an earlier cluster's, on the same state root)."""
        dead = set(placement.dead_replicas())
        if self.root is not None:
            dead |= {d.name for d in self.root.iterdir()
                     if is_tag(d.name) and d.is_dir() and not placement.recorded(d.name)}
        return [tag for tag in sorted(dead) if tag != self.tag and placement.claim(tag, self.tag)]

    async def _take_up(self, dead_tag: str) -> None:
        directory = self.root / dead_tag if self.root is not None else None
        files = sorted(directory.glob(f"*{SUFFIX}")) if directory is not None and directory.is_dir() else []
        logger.info("LiveVLM: replica %s died: restoring its %d checkpointed streams here (%s)", dead_tag,
                    len(files), self.tag)
        for path in files:
            stream_id = path.name.removesuffix(SUFFIX)
            try:
                await self.service.checkpointer.adopt(path)
                await asyncio.to_thread(placement.set_home, stream_id, self.tag)
            except Exception as e:  # this stream only: lost (its requests answer 404 from now on)
                logger.error("LiveVLM: stream %s of dead replica %s not restored: %s", stream_id, dead_tag, e)
                await asyncio.to_thread(placement.set_home, stream_id, placement.LOST)
        await asyncio.to_thread(placement.mark_healed, dead_tag)
        if directory is not None and directory.is_dir():
            await asyncio.to_thread(_remove_tree, directory)


def _remove_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    directory.rmdir()
