"""Checkpoints (`--livevlm-state-dir`): the atomic writer, the schedule, the received-frame notes, the state
dir check and the restore gate without an engine; then a server killed with SIGKILL under load and
restarted on its state dir (issue 16, acceptance 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_livevlm.portable.checkpoints import (Checkpointer, ReceivedNotes, StateDirError, Written,
                                               check_state_dir, checkpoint_due, write_atomically)


# ---- the atomic writer ---------------------------------------------------------------------------------------
def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    write_atomically(tmp_path, "s.livevlm", b"first")
    write_atomically(tmp_path, "s.livevlm", b"second, longer")
    assert (tmp_path / "s.livevlm").read_bytes() == b"second, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.livevlm"]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_atomically(tmp_path, "s.livevlm", b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomically(tmp_path, "s.livevlm", b"new")
    assert (tmp_path / "s.livevlm").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.livevlm"]


# Child processes load the module from its file: `vllm_livevlm.portable` imports torch (seconds per child).
LOAD_CHECKPOINTS = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("checkpoints", sys.argv[2])
    checkpoints = sys.modules["checkpoints"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checkpoints)
""")
CHECKPOINTS_FILE = str(Path(__file__).parents[1] / "vllm_livevlm" / "portable" / "checkpoints.py")

KILLED_WRITER = LOAD_CHECKPOINTS + textwrap.dedent("""
    from pathlib import Path
    write_atomically = checkpoints.write_atomically
    directory = Path(sys.argv[1])
    write_atomically(directory, "s.livevlm", b"0" * 4_000_000)
    print("ready", flush=True)
    i = 0
    while True:
        i = (i + 1) % 10
        write_atomically(directory, "s.livevlm", str(i).encode() * 4_000_000)
""")


def test_a_writer_killed_mid_write_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    """SIGKILL at arbitrary points of a loop of 4 MB writes: the file is always one whole version."""
    for delay in (0.05, 0.13, 0.29):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), CHECKPOINTS_FILE],
                                 stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        data = (tmp_path / "s.livevlm").read_bytes()
        assert len(data) == 4_000_000 and data == data[:1] * len(data)


# ---- the schedule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("last", "key", "clips", "now", "every_clips", "every_seconds", "due"), [
    (None, (0,), 0, 0.0, 8, 30.0, True),                       # never written: at once
    (Written((5,), 3, 100.0), (5,), 20, 999.0, 8, 30.0, False),  # unchanged: never, whatever the counters
    (Written((5,), 3, 100.0), (6,), 10, 101.0, 8, 30.0, False),  # changed, 7 clips and 1 s later
    (Written((5,), 3, 100.0), (6,), 11, 101.0, 8, 30.0, True),   # 8 clips
    (Written((5,), 3, 100.0), (6,), 3, 130.0, 8, 30.0, True),    # 30 s (frames pushed, no clip)
    (Written((5,), 3, 100.0), (6,), 11, 129.0, 0, 30.0, False),  # clip trigger off
    (Written((5,), 3, 100.0), (6,), 3, 999.0, 8, 0.0, False),    # time trigger off
])
def test_checkpoint_due(last, key, clips, now, every_clips, every_seconds, due) -> None:
    assert checkpoint_due(last, key, clips, now, every_clips, every_seconds) is due


# ---- restore failures ---------------------------------------------------------------------------------------
def test_only_a_file_at_fault_is_moved_aside() -> None:
    """A bad file goes to `rejected/`; a full or failing server leaves it for the next start."""
    from vllm_livevlm.portable.checkpoints import _file_at_fault
    from vllm_livevlm.portable.format import StreamFileError
    from vllm_livevlm.serving.errors import APIError

    assert _file_at_fault(StreamFileError("checksum mismatch"))
    assert _file_at_fault(APIError(400, "invalid stream file: truncated"))
    assert _file_at_fault(APIError(409, "stream exists"))
    assert not _file_at_fault(APIError(503, "the server holds its maximum of 64 streams"))
    assert not _file_at_fault(RuntimeError("engine dead"))
    assert not _file_at_fault(OSError(5, "I/O error"))


# ---- what a crash loses -------------------------------------------------------------------------------------
NOTING_PROCESS = LOAD_CHECKPOINTS + textwrap.dedent("""
    import os, signal
    from pathlib import Path
    notes = checkpoints.ReceivedNotes(Path(sys.argv[1]))
    for n in (8, 16, 1234567):
        notes.note("ab" * 16, n)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_received_notes_survive_a_killed_process(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", NOTING_PROCESS, str(tmp_path), CHECKPOINTS_FILE])
    assert child.returncode == -signal.SIGKILL
    notes = ReceivedNotes(tmp_path)
    assert notes.read("ab" * 16) == 1234567
    assert notes.read("cd" * 16) is None
    notes.forget("ab" * 16)
    assert list(tmp_path.iterdir()) == []


def test_a_stream_id_never_names_another_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot name a checkpoint file"):
        ReceivedNotes(tmp_path).note("../../etc/x", 1)


# ---- the state dir ------------------------------------------------------------------------------------------
def test_state_dir_is_created_and_probed(tmp_path: Path) -> None:
    assert check_state_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_a_state_dir_that_cannot_be_written_is_refused(tmp_path: Path, where: str) -> None:
    (tmp_path / "f").write_bytes(b"")
    path = tmp_path / "f" / "state" if where == "under_a_file" else Path("/proc")  # not even root writes /proc
    with pytest.raises(StateDirError, match="cannot hold checkpoints.*must be a writable directory"):
        check_state_dir(path)


def test_serve_refuses_an_unwritable_state_dir_before_starting_vllm(tmp_path: Path) -> None:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "vllm_livevlm.cli", "serve", str(tmp_path), "--livevlm-state-dir",
                          "/proc/livevlm"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--livevlm-state-dir '/proc/livevlm' cannot hold checkpoints" in run.stderr
    assert time.monotonic() - started < 60  # refused by the CLI, no engine was loaded


def test_the_checkpoint_flags_reach_the_server() -> None:
    import argparse

    from vllm_livevlm.cli import limits_from_args
    from vllm_livevlm.config import LiveVLMConfig
    from vllm_livevlm.service_env import STATE_DIR_ENV, livevlm_env

    args = argparse.Namespace(livevlm_limits='{"max_streams": 4}', livevlm_checkpoint_every_clips=2,
                              livevlm_checkpoint_every_seconds=None)
    env = livevlm_env(LiveVLMConfig(), limits_from_args(args), "/var/state")
    assert json.loads(env["VLLM_LIVEVLM_LIMITS"]) == {"max_streams": 4, "checkpoint_every_clips": 2}
    assert env[STATE_DIR_ENV] == "/var/state"
    assert STATE_DIR_ENV not in livevlm_env(LiveVLMConfig())


# ---- the restore gate ---------------------------------------------------------------------------------------
def test_requests_during_the_restore_get_503_with_retry_after(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from vllm_livevlm.serving.restore_gate import RestoreGate

    async def ok(request):
        return PlainTextResponse("ok")

    async def socket(websocket):
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = Starlette(routes=[Route("/health", ok), Route("/v1/video/streams", ok, methods=["GET", "POST"]),
                            WebSocketRoute("/v1/video/streams/x/ws", socket)])
    app.add_middleware(RestoreGate)
    # The gate reads the service the plugin puts in `app.state.livevlm`: only its checkpointer here.
    service = SimpleNamespace(limits=SimpleNamespace(checkpoint_every_clips=8, checkpoint_every_seconds=30.0))
    service.checkpointer = Checkpointer(service, tmp_path)
    app.state.livevlm = service
    client = TestClient(app)
    refused = client.post("/v1/video/streams", json={})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "restoring its streams" in refused.json()["error"]["message"]
    assert client.get("/health").text == "ok"
    with pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/v1/video/streams/x/ws"):
            pass
    assert closed.value.code == 1013
    service.checkpointer.restoring = False
    assert client.get("/v1/video/streams").text == "ok"
    with client.websocket_connect("/v1/video/streams/x/ws") as ws:
        assert ws.receive_text() == "hi"


# ---- acceptance 2: SIGKILL under load, restart on the same state dir ----------------------------------------
CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 256, "page_tokens": 16}
LIMITS = {"checkpoint_every_clips": 1, "checkpoint_every_seconds": 1.0}
STREAMS = 4
CORRUPT = "ff" * 16  # a checkpoint file of this id holds garbage


def _png(frame) -> bytes:
    import cv2

    return cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def _push(url: str, stream_id: str, owner: dict, frames, wait: bool = False, timeout: float = 120):
    import requests

    files = [("frames", (f"{i}.png", _png(f), "image/png")) for i, f in enumerate(frames)]
    return requests.post(f"{url}/v1/video/streams/{stream_id}/frames", params={"wait": "true"} if wait else None,
                         headers=owner, files=files, timeout=timeout)


def _answer(url: str, stream_id: str, owner: dict) -> dict:
    import requests

    r = requests.post(f"{url}/v1/chat/completions", headers=owner, timeout=300, json={
        "model": "m", "messages": [{"role": "user", "content": "what is happening in the video?"}],
        "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "session_id": stream_id})
    assert r.status_code == 200, r.text
    return r.json()


class Load:
    """One client thread per stream pushing 2 new frames at a time (no waiting for encodes); `sent` holds
    every frame of a push the server may have taken, in order, `accepted` those it confirmed."""

    def __init__(self, url: str, streams: dict[str, dict]):
        import threading

        self.url, self.streams = url, streams
        self.stop = threading.Event()
        self.sent = {sid: [] for sid in streams}
        self.accepted = dict.fromkeys(streams, 0)
        self.threads = [threading.Thread(target=self._run, args=(i, sid), daemon=True)
                        for i, sid in enumerate(streams)]

    def _run(self, index: int, stream_id: str) -> None:
        from helpers import random_video

        push = 0
        while not self.stop.is_set():
            frames = random_video(1000 * index + push, 2)
            self.sent[stream_id].extend(frames)
            try:
                r = _push(self.url, stream_id, self.streams[stream_id], frames, timeout=30)
            except Exception:  # the server was killed: the server may or may not have taken these
                return
            if r.status_code == 200:
                self.accepted[stream_id] += 2
            else:  # refused (backpressure): nothing was buffered
                assert r.status_code == 429, r.text
                del self.sent[stream_id][-2:]
            push += 1
            time.sleep(0.5)  # 4 frames/s per stream: few enough for the twins to encode again


def _checkpointed(state: Path, stream_id: str) -> int:
    """The frames a stream's checkpoint holds (received: encoded or pending)."""
    from vllm_livevlm.portable.format import read_header

    return read_header((state / f"{stream_id}.livevlm").read_bytes())["stream"]["counters"]["frames_received"]


@pytest.fixture(scope="module")
def restarted(tiny_model_dir, tmp_path_factory):
    """A server with a state dir, 4 streams under load, killed with SIGKILL (its process group), then a new
    server on the same dir; yields (url, state dir, log, the streams' owner headers, their frames sent, the
    frames the killed server confirmed)."""
    import requests
    from helpers import Server, random_video

    state = tmp_path_factory.mktemp("state")
    logs = tmp_path_factory.mktemp("logs")
    args = ("--livevlm-state-dir", str(state))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        first = Server(tiny_model_dir, logs / "first.log", CONFIG, LIMITS, *args).wait_ready()
        try:
            streams = {}
            for _ in range(STREAMS):
                body = requests.post(f"{first.url}/v1/video/streams", json={"config": {}}).json()
                streams[body["id"]] = {"X-Stream-Token": body["token"]}
            for i, (sid, owner) in enumerate(streams.items()):
                assert _push(first.url, sid, owner, random_video(99 + i, 8), wait=True).status_code == 200
            time.sleep(2.5)  # a checkpoint of each stream's 2 clips, whatever the schedule's phase
            load = Load(first.url, streams)
            for thread in load.threads:
                thread.start()
            # Killed once every stream was checkpointed during the load and took more frames after that.
            deadline = time.time() + 300
            while min(_checkpointed(state, sid) for sid in streams) <= 8 and time.time() < deadline:
                time.sleep(0.1)
            after = {sid: load.accepted[sid] + 4 for sid in streams}
            while any(load.accepted[sid] < after[sid] for sid in streams) and time.time() < deadline:
                time.sleep(0.1)
            assert time.time() < deadline, "no checkpoint during the load"
            os.killpg(first.process.pid, signal.SIGKILL)
            load.stop.set()
            for thread in load.threads:
                thread.join(timeout=60)
        finally:
            first.stop()
        sent = {sid: [*random_video(99 + i, 8), *load.sent[sid]] for i, sid in enumerate(streams)}
        accepted = {sid: 8 + load.accepted[sid] for sid in streams}
        (state / f"{CORRUPT}.livevlm").write_bytes(b"\x00" * 100)
        second = Server(tiny_model_dir, logs / "second.log", CONFIG, LIMITS, *args).wait_ready()
    try:
        yield second.url, state, second, streams, sent, accepted
    finally:
        second.stop()


def _restored(url: str, stream_id: str, owner: dict) -> dict:
    """The stream's description once the restore is over (503 + Retry-After until then)."""
    import requests

    deadline = time.time() + 120
    while True:
        r = requests.get(f"{url}/v1/video/streams/{stream_id}", headers=owner)
        if r.status_code != 503 or time.time() > deadline:
            assert r.status_code == 200, r.text
            return r.json()
        assert int(r.headers["Retry-After"]) >= 1
        time.sleep(0.5)


def _settled(url: str, stream_id: str, owner: dict) -> dict:
    """The restored stream once the clips of the frames it brought along are encoded (a question would not
    wait for a clip in flight): fewer pending frames than a clip."""
    deadline = time.time() + 120
    while (body := _restored(url, stream_id, owner))["stats"]["pending_frames"] >= CONFIG["clip_frames"]:
        assert time.time() < deadline, body
        time.sleep(0.5)
    return body


@pytest.mark.slow
def test_every_stream_is_back_with_its_id_token_and_the_frames_it_lost(restarted) -> None:
    import requests

    url, _, _, streams, sent, accepted = restarted
    for sid, owner in streams.items():
        body = _restored(url, sid, owner)
        restored = body["restored"]
        start, lost = restored["restored_from_frame"], restored["frames_lost_in_restart"]
        assert body["id"] == sid and body["stats"]["frames_received"] == start
        assert 8 <= start <= len(sent[sid])
        # Every frame the killed server confirmed is in the checkpoint or counted as lost; a push it took
        # without answering may be counted too. Nothing else is.
        assert accepted[sid] <= start + lost <= len(sent[sid])
        assert body["stats"]["frames_encoded"] + body["stats"]["pending_frames"] == start
        wrong = requests.get(f"{url}/v1/video/streams/{sid}", headers={"X-Stream-Token": "not-the-token"})
        assert wrong.status_code == 403


@pytest.mark.slow
def test_restored_streams_answer_like_an_uninterrupted_twin(restarted) -> None:
    """A twin on the new server fed the frames up to each checkpoint answers token for token the same."""
    import requests

    url, _, _, streams, sent, _ = restarted
    for sid, owner in streams.items():
        start = _settled(url, sid, owner)["restored"]["restored_from_frame"]
        body = requests.post(f"{url}/v1/video/streams", json={"config": {}}).json()
        twin, twin_owner = body["id"], {"X-Stream-Token": body["token"]}
        assert _push(url, twin, twin_owner, sent[sid][:start], wait=True).status_code == 200
        mine, theirs = _answer(url, sid, owner), _answer(url, twin, twin_owner)
        assert mine["livevlm"]["frames_covered"] == theirs["livevlm"]["frames_covered"] == start
        assert mine["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
        assert mine["usage"] == theirs["usage"]
        requests.delete(f"{url}/v1/video/streams/{twin}", headers=twin_owner)


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_moved_aside_with_its_reason(restarted) -> None:
    url, state, server, streams, _, _ = restarted
    for sid, owner in streams.items():
        _restored(url, sid, owner)
    assert not (state / f"{CORRUPT}.livevlm").exists()
    assert (state / "rejected" / f"{CORRUPT}.livevlm").read_bytes() == b"\x00" * 100
    assert f"checkpoint {CORRUPT}.livevlm not restored: " in server.log_text()
    assert not list(state.glob("*.tmp")) and not list(state.glob(".*.tmp"))


@pytest.mark.slow
def test_deleting_a_restored_stream_removes_its_checkpoint(restarted) -> None:
    import requests

    url, state, _, streams, _, _ = restarted
    sid, owner = next(iter(streams.items()))
    _restored(url, sid, owner)
    assert (state / f"{sid}.livevlm").exists() and (state / f"{sid}.received").exists()
    assert requests.delete(f"{url}/v1/video/streams/{sid}", headers=owner).status_code == 200
    assert not (state / f"{sid}.livevlm").exists() and not (state / f"{sid}.received").exists()
