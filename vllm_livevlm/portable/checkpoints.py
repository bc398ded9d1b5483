"""Checkpoints: every stream of a server written to its state dir, and restored from it when the server starts.

A stream is written after `checkpoint_every_clips` clips or `checkpoint_every_seconds` seconds, whichever
comes first, and only if it changed; each write replaces `<stream id>.livevlm` atomically (temporary file in
the same dir, fsync, rename, fsync of the dir), so a crash leaves the previous checkpoint or the new one,
never half of either. Writing runs on an asyncio task, the file's bytes are built and written in a thread:
the engine is blocked only for the memory snapshot that the export reads.

What a crash can cost: the frames a stream received after its last checkpoint. Each push notes the stream's
`frames_received` in `<stream id>.received` (a write, no fsync: it survives the process, not the machine),
so a restored stream reports the frame it continues from and how many it lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_livevlm.log import get_logger

if TYPE_CHECKING:
    from vllm_livevlm.serving.service import StreamService
    from vllm_livevlm.streams import LiveStream

logger = get_logger(__name__)

SUFFIX = ".livevlm"
RECEIVED_SUFFIX = ".received"
TEMP_SUFFIX = ".tmp"
REJECTED = "rejected"  # subdirectory that files which failed to restore are moved to
TICK_SECONDS = 0.25    # how often the schedule looks at the streams


class StateDirError(RuntimeError):
    """The state dir cannot hold checkpoints (missing and not creatable, not a directory, not writable)."""


def check_state_dir(path: str | os.PathLike) -> Path:
    """The state dir, created if missing and proven writable by writing, fsyncing and removing a file:
    a server that could not checkpoint refuses to start rather than lose its streams later."""
    directory = Path(path).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory, f".probe-{os.getpid()}", b"livevlm")
        (directory / f".probe-{os.getpid()}").unlink()
    except OSError as e:
        raise StateDirError(f"--livevlm-state-dir {str(path)!r} cannot hold checkpoints: {e.strerror or e} "
                            "(it must be a writable directory)") from None
    return directory


def write_atomically(directory: Path, name: str, data: bytes) -> None:
    """Replace `directory/name` with `data`: the old file or the new one survives any crash, never a mix."""
    temp = directory / f".{name}.{os.getpid()}{TEMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, directory / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Written:
    """What a stream's last checkpoint held: its change key, its clip count and when it was taken."""

    key: tuple
    clips: int
    at: float


def checkpoint_due(last: Written | None, key: tuple, clips: int, now: float,
                   every_clips: int, every_seconds: float) -> bool:
    """Whether a stream is written now: never written yet, or changed since and `every_clips` clips or
    `every_seconds` seconds past its last checkpoint (0 turns that trigger off)."""
    if last is None:
        return True
    if key == last.key:
        return False
    return bool(every_clips and clips - last.clips >= every_clips
                or every_seconds and now - last.at >= every_seconds)


def change_key(stream: "LiveStream") -> tuple:
    """What a checkpoint of `stream` depends on: its frame counters, clips and question history."""
    return (stream.frames_received, stream.frames_encoded, stream.frames_dropped, stream.frames_sampled_out,
            stream.clips_encoded, tuple(stream._history))


def stream_path(directory: Path, stream_id: str, suffix: str = SUFFIX) -> Path:
    """A stream's file in the state dir (stream ids are hex; anything else could name another path)."""
    if not stream_id or len(stream_id) > 64 or not all(c in "0123456789abcdef" for c in stream_id):
        raise ValueError(f"stream id {stream_id!r} cannot name a checkpoint file")
    return directory / (stream_id + suffix)


class ReceivedNotes:
    """Each stream's `frames_received`, noted at every push in `<id>.received`: one `pwrite` on a file kept
    open (no fsync), which a killed process cannot take back. A restore compares it with the checkpoint."""

    WIDTH = 20  # digits: a fixed-size record, overwritten in place

    def __init__(self, directory: Path):
        self.directory = directory
        self._fds: dict[str, int] = {}

    def note(self, stream_id: str, frames_received: int) -> None:
        fd = self._fds.get(stream_id)
        if fd is None:
            path = stream_path(self.directory, stream_id, RECEIVED_SUFFIX)
            fd = self._fds[stream_id] = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.pwrite(fd, b"%*d" % (self.WIDTH, frames_received), 0)

    def read(self, stream_id: str) -> int | None:
        try:
            return int(stream_path(self.directory, stream_id, RECEIVED_SUFFIX).read_bytes()[:self.WIDTH])
        except (OSError, ValueError):
            return None

    def forget(self, stream_id: str) -> None:
        fd = self._fds.pop(stream_id, None)
        if fd is not None:
            os.close(fd)
        stream_path(self.directory, stream_id, RECEIVED_SUFFIX).unlink(missing_ok=True)


def _file_at_fault(error: Exception) -> bool:
    """Whether a restore failed because of the file (unreadable, another model, its id taken, ...): a
    `StreamFileError` or a ValueError naming the file, or a 4xx refusal; not a full server or an engine error."""
    status = getattr(error, "status", None)
    return isinstance(error, ValueError) if status is None else 400 <= status < 500


def owner_digest(data: bytes) -> bytes:
    """The owner token's sha256 a server's own stream file carries (its checkpoints, streams it hands over):
    the stream keeps its token. Raises `StreamFileError` if the header holds none."""
    from vllm_livevlm.portable.format import StreamFileError, read_header

    digest = read_header(data).get("owner_token_sha256")
    try:
        token_digest = bytes.fromhex(digest)
    except (TypeError, ValueError):
        raise StreamFileError(f"the header's owner_token_sha256 {str(digest)[:80]!r} is not a sha256") from None
    if len(token_digest) != 32:
        raise StreamFileError(f"the header's owner_token_sha256 holds {len(token_digest)} bytes, not 32")
    return token_digest


class Checkpointer:
    """A server's checkpoints: restores its state dir on `start`, then writes the streams on schedule."""

    def __init__(self, service: "StreamService", directory: Path):
        self.service = service
        self.directory = directory
        self.every_clips = service.limits.checkpoint_every_clips
        self.every_seconds = service.limits.checkpoint_every_seconds
        self.restoring = True  # from construction: no request may reach the service before the restore
        self.restored: dict[str, dict[str, Any]] = {}  # stream id -> what its restart cost
        self._notes = ReceivedNotes(directory)
        self._written: dict[str, Written] = {}
        self._failed: dict[str, tuple] = {}  # stream id -> change key its last write failed at (not retried)
        self._lock = asyncio.Lock()   # one write at a time; `flush` waits for the one in progress
        self._stopped = False
        self._task: asyncio.Task | None = None
        self._restore_left = 0
        self._restore_seconds: list[float] = []

    def start(self) -> None:
        """Restore, then checkpoint on schedule; called on the server's event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def retry_after(self) -> int:
        """Seconds a client should wait for the restore: the files left at the measured pace so far."""
        pace = sum(self._restore_seconds) / len(self._restore_seconds) if self._restore_seconds else 5.0
        return max(1, round(pace * self._restore_left))

    def received(self, stream: "LiveStream") -> None:
        """Note a push (what a crash would lose is counted against it). The push has been accepted by now:
        a note that cannot be written only makes a later `frames_lost_in_restart` a lower bound."""
        try:
            self._notes.note(stream.id, stream.frames_received)
        except OSError as e:
            logger.warning("LiveVLM: stream %s: cannot note received frames in %s: %s", stream.id,
                           self.directory, e)

    def forget(self, stream_id: str) -> None:
        """A deleted or expired stream leaves nothing behind to be restored."""
        self._written.pop(stream_id, None)
        self._failed.pop(stream_id, None)
        self.restored.pop(stream_id, None)
        try:
            self._notes.forget(stream_id)
            stream_path(self.directory, stream_id).unlink(missing_ok=True)
        except OSError as e:  # the stream is gone all the same; a restart would bring it back
            logger.error("LiveVLM: stream %s: cannot remove its checkpoint from %s: %s", stream_id,
                         self.directory, e)

    def report(self, stream_id: str) -> dict[str, Any]:
        """For a restored stream's description: the frame it continues from and the frames it lost."""
        restored = self.restored.get(stream_id)
        return {} if restored is None else {"restored": restored}

    async def flush(self) -> None:
        """At shutdown: stop the schedule and write every stream that changed since its checkpoint."""
        async with self._lock:
            self._stopped = True
            for stream in list(self.service.core.streams.values()):
                last = self._written.get(stream.id)
                if last is None or last.key != change_key(stream):
                    await self._write(stream)

    async def _run(self) -> None:
        try:
            await self._restore_all()
        except Exception:  # the dir itself failed (listing it): serve what was restored
            logger.exception("LiveVLM: restoring streams from %s failed", self.directory)
        finally:
            self.restoring = False
        while not self._stopped:
            await asyncio.sleep(TICK_SECONDS)
            try:
                async with self._lock:
                    if not self._stopped:
                        await self._write_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed round never stops the schedule
                logger.exception("LiveVLM: checkpointing failed")

    async def _write_due(self) -> None:
        now = time.time()
        for stream in list(self.service.core.streams.values()):
            key = change_key(stream)
            if self._failed.get(stream.id) != key and checkpoint_due(
                    self._written.get(stream.id), key, stream.clips_encoded, now, self.every_clips, self.every_seconds):
                await self._write(stream)

    async def _write(self, stream: "LiveStream") -> None:
        """Checkpoint one stream; a failure is logged and leaves its previous checkpoint in place."""
        key, clips, at = change_key(stream), stream.clips_encoded, time.time()
        try:
            data = await self.service.export_stream(stream)
            await asyncio.to_thread(write_atomically, self.directory, stream_path(self.directory, stream.id).name,
                                    data)
        except Exception as e:  # a failed or closing stream: tried again once it changes
            logger.warning("LiveVLM: stream %s: checkpoint failed (%s); its last one stays", stream.id, e)
            self._failed[stream.id] = key
            return
        if stream.closed and not self.service.draining:  # deleted while it was written
            stream_path(self.directory, stream.id).unlink(missing_ok=True)
            return
        self._written[stream.id] = Written(key, clips, at)

    # ---- restore ---------------------------------------------------------------------------------------------
    async def _restore_all(self) -> None:
        """Import every checkpoint in the dir with its id and owner-token digest; a file that fails is moved
        to `rejected/` with its reason logged, and the start goes on."""
        await asyncio.to_thread(self._remove_orphans)
        files = sorted(self.directory.glob(f"*{SUFFIX}"))
        self._restore_left = len(files)
        started = time.monotonic()
        restored = 0
        for path in files:
            if self.service.draining:  # shutting down: the files stay for the next start
                break
            began = time.monotonic()
            try:
                await self._restore(path)
                restored += 1
            except Exception as e:  # this file only, whatever failed
                reason = getattr(e, "message", None) or str(e) or type(e).__name__
                if _file_at_fault(e):
                    logger.warning("LiveVLM: checkpoint %s not restored: %s; moved to %s", path.name, reason,
                                   self.directory / REJECTED)
                    await asyncio.to_thread(self._move_aside, path)
                else:  # the server (full, failing): the next start tries the file again
                    logger.error("LiveVLM: checkpoint %s not restored: %s; left in place", path.name, reason,
                                 exc_info=not hasattr(e, "status"))
            self._restore_left -= 1
            self._restore_seconds.append(time.monotonic() - began)
        if files:
            logger.info("LiveVLM: restored %d of %d streams from %s in %.2f s", restored, len(files),
                        self.directory, time.monotonic() - started)

    async def _restore(self, path: Path) -> None:
        stream_id = path.name.removesuffix(SUFFIX)
        stream_path(self.directory, stream_id)  # the name is a stream id
        data = await asyncio.to_thread(path.read_bytes)
        stream, _ = await self.service.import_stream(data, stream_id=stream_id, token_digest=owner_digest(data),
                                                     max_bytes=self.service.own_file_bytes())
        start = stream.frames_received
        noted = self._notes.read(stream_id)
        lost = max(0, (noted or start) - start)
        self.restored[stream_id] = {"restored_from_frame": start, "frames_lost_in_restart": lost}
        logger.info("LiveVLM: stream %s restored from frame %d (%d frames received after its checkpoint "
                    "lost)", stream_id, start, lost)
        self._notes.note(stream_id, start)
        self._written[stream_id] = Written(change_key(stream), stream.clips_encoded, time.time())

    async def adopt(self, path: Path) -> None:
        """Restore a checkpoint a dead server left in its dir (`serving.ray.healing`): the file and its received
        note move into this dir first, so this server checkpoints the stream from now on. Raises as a restore
        fails; a file at fault is moved to `rejected/`."""
        own = stream_path(self.directory, path.name.removesuffix(SUFFIX))
        for source, target in ((path, own), (path.with_suffix(RECEIVED_SUFFIX), own.with_suffix(RECEIVED_SUFFIX))):
            if source.exists():
                await asyncio.to_thread(source.replace, target)
        try:
            await self._restore(own)
        except Exception as e:
            if _file_at_fault(e):
                await asyncio.to_thread(self._move_aside, own)
            raise

    def _move_aside(self, path: Path) -> None:
        """A checkpoint that failed to restore, with its received note, out of the way of the next start."""
        rejected = self.directory / REJECTED
        rejected.mkdir(exist_ok=True)
        for file in (path, path.with_suffix(RECEIVED_SUFFIX)):
            if file.exists():
                file.replace(rejected / file.name)
        fsync_dir(self.directory)

    def _remove_orphans(self) -> None:
        """Temporary files of writes a crash interrupted; notes of streams without a checkpoint."""
        for temp in self.directory.glob(f".*{TEMP_SUFFIX}"):
            temp.unlink()
        for note in self.directory.glob(f"*{RECEIVED_SUFFIX}"):
            if not note.with_suffix(SUFFIX).exists():
                note.unlink()
