"""Measure what restoring checkpointed streams adds to a server's start (issue 16 target: 16 streams,
<= 30 s on CPU): the start of a server on an empty state dir (until `/health` answers) against the start of
one on a dir holding N checkpoints (until every stream answers instead of 503).

    .venv/bin/python scripts/measure_restore.py [--streams 16] [--frames 16] [--out DIR]

Uses the tiny random-weight model and the test suite's `Server` (a real `vllm-livevlm serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16}


def _started(server, streams: dict[str, dict]) -> float:
    """Seconds from the server's launch until /health answers and every one of `streams` is served."""
    import requests

    server.wait_ready()
    for stream_id, owner in streams.items():
        while requests.get(f"{server.url}/v1/video/streams/{stream_id}", headers=owner).status_code == 503:
            time.sleep(0.1)
    return time.monotonic() - server.launched


def main() -> None:
    import requests
    from helpers import Server, random_video
    from test_checkpoints import _push

    from vllm_livevlm.testing.tiny_model import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16, help="frames pushed to each stream before the restart")
    parser.add_argument("--out", default=None, help="working dir (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    work = Path(args.out or tempfile.mkdtemp(prefix="measure-restore-"))
    model = build_tiny_model(str(work / "model"), preset="tiny", seed=0)
    state = work / "state"

    def launch(name: str):
        server = Server(model, work / f"{name}.log", CONFIG, None, "--livevlm-state-dir", str(state))
        server.launched = time.monotonic()
        return server

    empty = launch("empty")
    runs = {"empty_start_seconds": _started(empty, {})}
    empty.stop()
    populate, streams = launch("populate").wait_ready(), {}
    for i in range(args.streams):
        body = requests.post(f"{populate.url}/v1/video/streams", json={"config": {}}).json()
        streams[body["id"]] = {"X-Stream-Token": body["token"]}
        assert _push(populate.url, body["id"], streams[body["id"]], random_video(i, args.frames),
                     wait=True).status_code == 200
    populate.stop()  # SIGTERM: the drain writes every stream's last checkpoint
    runs["checkpoint_bytes"] = sum(p.stat().st_size for p in state.glob("*.livevlm"))
    restore = launch("restore")
    runs["restore_start_seconds"] = _started(restore, streams)
    runs["restore_log"] = [line for line in restore.log_text().splitlines() if "streams from" in line][-1:]
    restore.stop()
    runs["added_seconds"] = runs["restore_start_seconds"] - runs["empty_start_seconds"]
    print(json.dumps(runs, indent=1))

if __name__ == "__main__":
    main()
