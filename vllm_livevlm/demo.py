"""`vllm-livevlm demo` (`make demo`): a live stream end to end, in the browser console or the terminal.

Builds the tiny random model if needed and starts `vllm-livevlm serve` on a loopback port. By default it
prints the console's URL (`/livevlm/#demo`) and opens it when a graphical browser is available: the page
streams a test pattern of moving shapes, asks a question every 20 s and shows what each answer read, until
Ctrl-C. `--no-browser` is the terminal demo: a synthetic video (moving shapes) pushed frame batch by frame
batch, questions while it streams, latency and memory per question printed as a table, then shutdown. The
model has random weights, so the answers are gibberish: the demo shows the mechanics and the costs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import webbrowser

import cv2
import numpy as np

DEMO_CONFIG = {"clip_frames": 16, "long_term_budget_tokens": 2048, "page_tokens": 16, "retrieve_ratio": 0.4}
QUESTIONS = ["What is moving in the video?", "What color is the square?", "Where did the circle go?",
             "What happened a minute ago?", "How many objects are there?"]


def render_frames(count: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """Moving shapes: a red square bouncing horizontally, a blue circle orbiting, a green bar sweeping."""
    rng = np.random.default_rng(seed)
    background = rng.integers(20, 60, size=(size, size, 3), dtype=np.uint8)
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    for t in range(count):
        frame = background.copy()
        x = int(abs((t * 3) % (2 * (size - 20)) - (size - 20)))
        cv2.rectangle(frame, (x, 10), (x + 18, 28), (220, 30, 30), -1)
        angle = t / 15.0
        cx, cy = int(size / 2 + size / 4 * np.cos(angle)), int(size / 2 + size / 4 * np.sin(angle))
        cv2.circle(frame, (cx, cy), 9, (30, 60, 230), -1)
        bar = (t * 2) % size
        cv2.line(frame, (0, bar), (size - 1, bar), (40, 200, 60), 2)
        frames[t] = frame
    return frames


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg(frame: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()


def main(argv: list[str] | None = None) -> None:
    from vllm_livevlm.testing.tiny_model import ensure_tiny_model

    parser = argparse.ArgumentParser(prog="vllm-livevlm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the tiny random model, built if needed)")
    parser.add_argument("--no-browser", action="store_true",
                        help="the terminal demo: stream from here and print a table instead of the console")
    parser.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8, help="frames per HTTP request")
    parser.add_argument("--ask-every", type=int, default=64, help="ask a question every N frames")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    model = args.model or ensure_tiny_model(os.path.join(tempfile.gettempdir(), "vllm-livevlm-demo-tiny"))
    server, url = _start_server(model, args.port or _free_port())
    try:
        if args.no_browser:
            _print_table(_stream_and_ask(url, model, args))
        else:
            _console(server, url)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def _start_server(model: str, port: int) -> tuple[subprocess.Popen, str]:
    """`vllm-livevlm serve` on a loopback port, once it answers /health."""
    import requests

    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-livevlm-demo-", suffix=".log", delete=False)
    print(f"starting vllm-livevlm serve {model} on {url} (log: {log.name}) ...", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "vllm_livevlm.cli", "serve", model, "--host", "127.0.0.1",
                               "--port", str(port), "--livevlm-config", json.dumps(DEMO_CONFIG)],
                              stdout=log, stderr=subprocess.STDOUT)
    start = time.time()
    while True:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited:\n{log.read()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        if time.time() - start > 300:
            server.kill()
            raise SystemExit("the server did not start within 300 s")
        time.sleep(1)
    print(f"server ready in {time.time() - start:.0f}s", flush=True)
    return server, url


def _console(server: subprocess.Popen, url: str) -> None:
    """Open the console in its demo mode (`#demo`: the page streams a test pattern of moving shapes and asks
    a question every 20 s) and serve until Ctrl-C."""
    from vllm_livevlm.serving.console import PREFIX

    page = f"{url}{PREFIX}/#demo"
    print(f"LiveVLM console: {page}", flush=True)
    if _has_browser() and webbrowser.open(page):
        print("opened in your browser; Ctrl-C stops the server", flush=True)
    else:
        print("no browser here: open that URL in one (e.g. through `ssh -L PORT:127.0.0.1:PORT`); "
              "Ctrl-C stops the server", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: the server is shut down
    try:
        server.wait()
    except KeyboardInterrupt:
        print("stopping the server", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _has_browser() -> bool:
    """A graphical browser can be opened (not a text one taking over this terminal on a headless box)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _stream_and_ask(url: str, model: str, args: argparse.Namespace) -> list[dict]:
    """The terminal demo: a synthetic video pushed batch by batch, a question every `ask_every` frames."""
    import requests
    from openai import OpenAI
    from tqdm import tqdm

    rows = []
    client = OpenAI(base_url=f"{url}/v1", api_key="demo")
    created = requests.post(f"{url}/v1/video/streams", json={"config": DEMO_CONFIG}).json()
    stream_id, owner = created["id"], {"X-Stream-Token": created["token"]}
    frames = render_frames(args.frames)
    with tqdm(total=args.frames, unit="frame", desc="streaming") as bar:
        for sent in range(0, args.frames, args.batch):
            batch = frames[sent:sent + args.batch]
            files = [("frames", (f"{sent + i}.jpg", _jpeg(f), "image/jpeg")) for i, f in enumerate(batch)]
            last = sent + args.batch >= args.frames  # the last push waits for the backlog to be encoded
            requests.post(f"{url}/v1/video/streams/{stream_id}/frames", files=files, headers=owner,
                          params={"wait": "true"} if last else None).raise_for_status()
            bar.update(len(batch))
            done = sent + len(batch)
            if done % args.ask_every == 0 or done >= args.frames:
                rows.append(_ask(client, url, model, stream_id, owner, QUESTIONS[len(rows) % len(QUESTIONS)],
                                 done, args.max_tokens))
                bar.set_postfix(ttft_ms=f"{rows[-1]['ttft_ms']:.0f}")
    requests.delete(f"{url}/v1/video/streams/{stream_id}", headers=owner).raise_for_status()
    return rows


def _ask(client, url: str, model: str, stream_id: str, owner: dict[str, str], question: str, sent: int, max_tokens: int) -> dict:
    import requests

    start = time.perf_counter()
    first = None
    text = ""
    info = {}
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=max_tokens, temperature=0.0, stream=True,
                                                extra_body={"session_id": stream_id}, extra_headers=owner):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        info = (chunk.model_extra or {}).get("livevlm") or info
    end = time.perf_counter()
    stats = requests.get(f"{url}/v1/video/streams/{stream_id}", headers=owner).json()["stats"]
    return {"question": question, "frames_sent": sent, "frames_covered": info.get("frames_covered", 0),
            "ttft_ms": 1000 * ((first or end) - start), "total_ms": 1000 * (end - start),
            "context_tokens": info.get("context_tokens", 0), "ltm_tokens": stats["long_term_tokens"],
            "store_mib": stats["bytes"] / 2**20, "compression": stats["compression_ratio"]}


def _print_table(rows: list[dict]) -> None:
    header = (f"{'#':>2}  {'frames sent':>11}  {'covered':>7}  {'TTFT ms':>8}  {'total ms':>8}  "
              f"{'context tok':>11}  {'LTM tok':>7}  {'store MiB':>9}  {'compr.':>6}  question")
    print("\n" + header)
    print("-" * len(header))
    for i, r in enumerate(rows, 1):
        print(f"{i:>2}  {r['frames_sent']:>11}  {r['frames_covered']:>7}  {r['ttft_ms']:>8.0f}  {r['total_ms']:>8.0f}  "
              f"{r['context_tokens']:>11}  {r['ltm_tokens']:>7}  {r['store_mib']:>9.2f}  {r['compression']:>6.1f}  "
              f"{r['question']}")


if __name__ == "__main__":
    main()
