"""The live console (`/livevlm/`) in a real headless Chromium against a real server (tiny model), without and
with `--api-key`: a fake camera streams, a question is answered token by token, the status numbers are the
server's, the timeline marks the pages the answer read, and the browser logs no error."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import requests

from helpers import Server
from vllm_livevlm.serving.console import PAGE_PATHS

CHROMIUM = shutil.which("chromium")  # Debian's package (`make install` installs it when missing)
# Two frames a clip and a small budget: long-term pages exist after a few clips.
CONFIG = {"clip_frames": 2, "long_term_budget_tokens": 256, "page_tokens": 16}
API_KEY = "console-test-key"
CLIPS = 6  # encoded before the question


@pytest.fixture(scope="module", params=[None, API_KEY], ids=["no-key", "api-key"])
def server(request, tiny_model_dir, tmp_path_factory):
    extra = ("--api-key", request.param) if request.param else ()
    server = Server(tiny_model_dir, tmp_path_factory.mktemp("console") / "server.log", CONFIG, None, *extra)
    server.key = request.param
    yield server.wait_ready()
    server.stop()


def write_y4m(path, frames: int = 40, width: int = 160, height: int = 120) -> None:
    """A clip Chromium's fake camera plays in a loop: a bright square crossing a dark gradient."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        gradient = np.tile(np.linspace(16, 96, width, dtype=np.uint8), (height, 1))
        chroma = np.full((height // 2) * (width // 2), 128, np.uint8).tobytes()
        for t in range(frames):
            luma = gradient.copy()
            x = (t * 4) % (width - 30)
            luma[40:70, x:x + 30] = 235
            f.write(b"FRAME\n" + luma.tobytes() + chroma + chroma)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make install` installs it with apt-get)")
    from playwright.sync_api import sync_playwright

    clip = tmp_path_factory.mktemp("camera") / "camera.y4m"
    write_y4m(clip)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}"])
        yield browser
        browser.close()


def value(page, stat: str) -> float:
    """A status number as the page holds it (`data-value`; the page's CSP forbids evaluating test scripts)."""
    return float(page.get_attribute(f"#{stat}", "data-value"))


def wait_until(condition, seconds: float, state=lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {seconds} s: {state()}"
        time.sleep(0.2)


def expected_runs(done: dict) -> list[tuple[int, int, int]]:
    """(first, last, layers) runs of frames read by the same number of layers, as the timeline draws them."""
    covered = done["frames_covered"]
    counts = np.zeros(covered, int)
    for pages in done["retrieval"]["pages"].values():
        read = np.zeros(covered, bool)
        for page in pages:
            first, last = page["frames"]
            read[max(0, first):min(covered, last + 1)] = True
        counts += read
    runs = []
    for f, count in enumerate(counts.tolist()):
        if runs and runs[-1][2] == count and runs[-1][1] == f - 1:
            runs[-1][1] = f
        else:
            runs.append([f, f, count])
    return [tuple(run) for run in runs if run[2] > 0]


@pytest.mark.slow
def test_console_streams_a_camera_and_shows_what_the_answer_read(server, browser, tmp_path):
    key = server.key
    assert requests.get(f"{server.url}/livevlm/", timeout=10).status_code == 200  # the page needs no key
    if key:
        assert requests.get(f"{server.url}/v1/video/engine", timeout=10).status_code == 401
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors, urls, received = [], [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: received.append(json.loads(payload))))

    page.goto(f"{server.url}/livevlm/")
    if key:
        assert page.is_visible("#key-form")
        page.fill("#key", key)
        page.click("#connect")
    page.wait_for_selector("#create:enabled")
    assert "384×384" in page.inner_text("#server")  # the model's input size, from GET /v1/video/engine
    page.fill("#clip-frames", "2")
    page.fill("#budget", "256")
    with page.expect_response(lambda r: r.url.endswith("/v1/video/streams") and r.request.method == "POST") as made:
        page.click("#create")
    created = made.value.json()
    owner = {"X-Stream-Token": created["token"], **({"Authorization": f"Bearer {key}"} if key else {})}
    page.select_option("#source", "camera")
    page.fill("#fps", "4")
    page.click("#start:enabled")
    wait_until(lambda: value(page, "stat-clips") >= CLIPS, 120)

    page.click("#stop")
    # Complete clips are encoded as they come; the rest of the frames (less than a clip) by the question.
    wait_until(lambda: value(page, "stat-pending") < CONFIG["clip_frames"], 60,
               lambda: (page.inner_text("#status"), page.inner_text("#notice")))
    page.fill("#question", "what is moving?")
    page.click("#ask")
    page.wait_for_selector("#answers li .meta:has-text('frames_covered')", timeout=120_000)
    done = next(m for m in received if m["type"] == "answer.done")
    deltas = [m["delta"] for m in received if m["type"] == "answer.delta"]
    assert len(deltas) > 1 and "".join(deltas) == done["text"]  # streamed token by token
    answer = page.locator("#answers li").first
    assert answer.locator(".text").inner_text() == done["text"]
    meta = answer.locator(".meta").inner_text()
    assert meta.startswith("TTFT ") and f"frames_covered {done['frames_covered']}" in meta

    # The timeline: one mark per run of frames read by the same number of layers, as the report says.
    runs = expected_runs(done)
    assert runs, "the answer read no long-term page"
    marks = page.locator("#timeline .read")
    assert marks.count() == len(runs)
    assert [int(marks.nth(i).get_attribute("data-layers")) for i in range(len(runs))] == [r[2] for r in runs]
    timeline = page.locator("#timeline")
    assert int(timeline.get_attribute("data-read-frames")) == sum(last - first + 1 for first, last, _ in runs)
    assert int(timeline.get_attribute("data-pages")) == sum(len(p) for p in done["retrieval"]["pages"].values())
    assert page.locator("#moments img").count() >= 1  # thumbnails kept by the page

    # The status numbers are the server's, once everything sent is encoded (the question flushed the rest).
    stats = requests.get(f"{server.url}/v1/video/streams/{created['id']}", headers=owner, timeout=10).json()["stats"]
    assert stats["pending_frames"] == 0 and stats["ingest_lag_seconds"] == 0.0
    assert 0 < stats["bytes"] <= stats["memory_bound_bytes"]
    assert done["frames_covered"] == stats["frames_encoded"]  # the camera stopped before the question
    shown = {"stat-encoded": stats["frames_encoded"], "stat-clips": stats["clips"], "stat-bytes": stats["bytes"],
             "stat-compression": stats["compression_ratio"], "stat-pages": stats["pages"], "stat-lag": 0,
             "stat-bound": stats["memory_bound_bytes"], "stat-pending": 0}
    wait_until(lambda: {name: value(page, name) for name in shown} == shown, 10,
               lambda: ({name: value(page, name) for name in shown}, shown))
    # The page samples its source itself (`sample_fps: null`): the server keeps every frame it accepted.
    sent, refused = value(page, "stat-sent"), value(page, "stat-refused")
    assert stats["frames_sampled_out"] == 0 and stats["frames_received"] == stats["frames_encoded"] == sent - refused

    page.screenshot(path=str(tmp_path / "console.png"))
    assert not any(created["token"] in url or (key and key in url) for url in urls)  # credentials stay out of URLs
    assert errors == []
    context.close()


def test_the_page_loads_without_the_key_and_nothing_else_does():
    """The key gate (`APIKeyGate`, also in every Ray Serve replica) lets the console's files through without
    the key, and nothing beside them: another file under `/livevlm/` or an API route still needs it."""
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from vllm_livevlm.serving.access import APIKeyGate

    app = PlainTextResponse("reached")
    client = TestClient(APIKeyGate(app, keys=[API_KEY]))
    assert sorted(PAGE_PATHS) == ["/livevlm", "/livevlm/", "/livevlm/console.css", "/livevlm/console.js",
                                  "/livevlm/index.html"]
    for path in PAGE_PATHS:
        assert client.get(path).text == "reached", path
    assert client.get("/livevlm/secrets.txt").status_code == 401
    assert client.get("/v1/video/engine").status_code == 401
    assert client.get("/v1/video/engine", headers={"Authorization": f"Bearer {API_KEY}"}).text == "reached"
