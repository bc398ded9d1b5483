"""Evaluation harness: every loader on fixture data in its benchmark's published format, the scoring rules
and the accuracy arithmetic (scripted answers vs. hand-computed tables), and one real end-to-end run of
every format through a tiny-model LiveVLM engine (each question asked at its timestamp)."""

from __future__ import annotations

import json
import os

import pytest

from vllm_livevlm.eval.answerers import OfflineAnswerer, Reply
from vllm_livevlm.eval.fixtures import write_fixtures
from vllm_livevlm.eval.harness import evaluate
from vllm_livevlm.eval.loaders import AnnotationError, get_benchmark, load_streamingbench
from vllm_livevlm.eval.scoring import extract_letter, extract_yes_no
from vllm_livevlm.eval.video import decode_video, frames_until

FPS = 0.5
BENCHES = ("ovo", "streamingbench", "rvs-ego", "rvs-movie", "mlvu", "videomme", "egoschema")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("eval-fixtures")))


def test_loaders_normalise_every_format(data_dirs):
    ovo = {q.id: q for q in get_benchmark("ovo").load(data_dirs["ovo"], None)}
    assert sorted(ovo) == ["0", "1", "2", "3_0", "3_1", "4_0", "4_1", "5_0", "5_1"]  # FAR probes expanded
    assert (ovo["0"].answer, ovo["0"].category, ovo["0"].query_time) == ("B", "BT", 3.0)
    assert ovo["2"].options == ["a red square", "a blue circle", "a green line"]  # `candidates` spelling
    assert (ovo["3_1"].answer, ovo["3_1"].query_time, ovo["4_0"].answer, ovo["5_1"].answer) == ("3", 7.0, "No", "Yes")
    sb = {q.id: q for q in get_benchmark("sb").load(data_dirs["streamingbench"], None)}
    assert len(sb) == 6 and not any(q.task == "Proactive Output" for q in sb.values())
    assert (sb["real-sample_1-1"].query_time, sb["real-sample_1-1"].answer) == (5.0, "C")
    assert sb["real-sample_1-1"].options == ["a square", "a circle", "a line", "nothing"]
    assert sb["omni-sample_2-0"].category == "Omni-Source"
    csv = load_streamingbench(data_dirs["streamingbench-csv"])
    assert [(q.answer, q.query_time, q.options[1]) for q in csv] == [("B", 3.0, "two"), ("A", 5.0, "blue")]
    rvs = get_benchmark("rvs-movie").load(data_dirs["rvs-movie"], None)
    assert [(q.query_time, q.answer) for q in rvs] == [(3.0, "A coloured square."), (7.5, "To the left.")]
    assert [q.answer for q in get_benchmark("mlvu").load(data_dirs["mlvu"], None)] == ["A", "D", "B"]
    assert [q.category for q in get_benchmark("videomme").load(data_dirs["videomme"], None)] == ["short", "short", "medium"]
    ego = get_benchmark("egoschema").load(data_dirs["egoschema"], None)
    assert [(q.id, q.answer) for q in ego] == [("q1", "D"), ("q2", "A")]  # q3 has no public answer
    with pytest.raises(AnnotationError, match="no MLVU annotations"):
        get_benchmark("mlvu").load(data_dirs["ovo"], None)


@pytest.mark.parametrize("response,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B. a circle", "B"), ("The answer is B", "B"), ("Answer: (C)", "C"),
    ("The best option is: A", "A"), ("I'd say D.", "D"), ("a person walks", None), ("E", None), ("", None)])
def test_letter_extraction(response, letter):
    assert extract_letter(response, 4) == letter


def test_yes_no_and_frames():
    assert [extract_yes_no(t) for t in ("Yes.", "y", "No, it is not", "N", "maybe")] == ["Yes", "Yes", "No", "No", None]
    assert [frames_until(t, 0.5) for t in (0.0, 1.9, 2.0, 7.0)] == [1, 1, 2, 4]


def test_decode_samples_at_fps(data_dirs):
    video = os.path.join(data_dirs["ovo"], "src_videos", "COIN", "cook.mp4")  # 8 s at 4 fps
    assert len(decode_video(video, 0.5)) == 4
    assert len(decode_video(video, 0.5, until=5.0)) == 3
    assert len(decode_video(video, 2.0, until=1.0)) == 3
    assert decode_video(video, 1.0, size=32).shape == (8, 32, 32, 3)


class Scripted:
    """An answerer that returns fixed responses, keyed by (prompt, frames pushed so far)."""

    def __init__(self, responses: dict[tuple[str, int], str]):
        self.responses = responses

    def open(self):
        return ScriptedSession(self.responses)

    def close(self):
        pass


class ScriptedSession:
    def __init__(self, responses):
        self.responses = responses
        self.frames = 0

    def push(self, frames):
        self.frames += len(frames)

    def ask(self, prompt, max_tokens):
        return Reply(self.responses[(prompt, self.frames)], self.frames)

    def close(self):
        pass


# Scripted responses per question id, and the tables computed by hand from them.
SCRIPTS = {
    "ovo": {"0": "(B)", "1": "The answer is A", "2": "A.", "3_0": "2 times", "3_1": "four", "4_0": "No.", "4_1": "N",
            "5_0": "Yes", "5_1": "Y"},
    "streamingbench": {"real-sample_1-0": "A", "real-sample_1-1": "The best option is: (C)", "real-sample_1-2": "C. a line",
                       "real-sample_2-0": "I'd say D.", "real-sample_2-1": "B", "omni-sample_2-0": "Answer: B"},
    "mlvu": {"m1-0": "(A) square", "m1-1": "D", "m2-0": "A"},
    "videomme": {"001-1": "A", "001-2": "C", "002-1": "C"},
    "egoschema": {"q1": "D", "q2": "E"},
    "rvs-ego": {"ego1-0": "a square", "ego1-1": "left"},
}
EXPECTED = {
    # task accuracies; categories are task means (OVO); overall = mean of BT 100, RT (0+100)/2, FAR (50+50+50)/3
    "ovo": ({"EPM": 100, "OCR": 0, "ACR": 100, "REC": 50, "SSR": 50, "CRR": 50}, {"BT": 100, "RT": 50, "FAR": 50},
            200 / 3, {"BT+RT": 75}),
    # categories over questions: Real-Time 3/5, Omni 1/1; overall = mean of the groups
    "streamingbench": ({"Object Recognition": 50, "Counting": 100, "Spatial Understanding": 0, "Source Discrimination": 100},
                       {"Real-Time Visual Understanding": 60, "Omni-Source": 100}, 80, {"Real-Time subset": 60}),
    "mlvu": ({"plotQA": 50, "order": 100}, {"MLVU": 200 / 3}, 75, {}),  # M-Avg = mean over tasks
    "videomme": ({"Object Recognition": 100, "Counting Problem": 0}, {"short": 50, "medium": 100}, 200 / 3, {}),
    "egoschema": ({"egoschema": 50}, {"egoschema": 50}, 50, {}),
}


@pytest.mark.parametrize("bench", list(SCRIPTS))
def test_accuracy_table_arithmetic(bench, data_dirs, tmp_path):
    benchmark = get_benchmark(bench)
    questions = benchmark.load(data_dirs[bench], None)
    responses = {}
    for q in questions:
        frames = len(decode_video(q.video, FPS, until=q.query_time))
        assert q.query_time is None or frames == frames_until(q.query_time, FPS)
        responses[(q.prompt, frames)] = SCRIPTS[bench][q.id]
    table = evaluate(benchmark, questions, Scripted(responses), FPS, str(tmp_path))
    written = json.loads((tmp_path / "accuracy.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [q.id for q in questions]
    assert [p["response"] for p in predictions] == [SCRIPTS[bench][q.id] for q in questions]
    if bench == "rvs-ego":
        assert table["overall"] is None and table["open_ended"] == 2 and written["open_ended"] == 2
        judge = [json.loads(line) for line in (tmp_path / "open_ended.jsonl").read_text().splitlines()]
        assert [(j["answer"], j["pred"]) for j in judge] == [("A coloured square.", "a square"), ("To the left.", "left")]
        return
    tasks, categories, overall, extra = EXPECTED[bench]
    assert {t: v["accuracy"] for t, v in written["tasks"].items()} == pytest.approx(tasks)
    assert {c: v["accuracy"] for c, v in written["categories"].items()} == pytest.approx(categories)
    assert written["overall"] == pytest.approx(overall)
    assert written["extra"] == pytest.approx(extra)
    assert written["judged"] == len(questions)


# ---- end to end on a real engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from helpers import live_engine

    yield from live_engine(tiny_model_dir, {"clip_frames": 2})


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES)
def test_end_to_end_on_tiny_model(bench, engine, data_dirs, tmp_path):
    benchmark = get_benchmark(bench)
    questions = benchmark.load(data_dirs[bench], None)
    table = evaluate(benchmark, questions, OfflineAnswerer(engine), 1.0, str(tmp_path), max_tokens=4)
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(questions)
    for q, p in zip(questions, predictions):
        full = len(decode_video(q.video, 1.0))
        expected = full if q.query_time is None else min(frames_until(q.query_time, 1.0), full)
        assert p["frames_covered"] == p["frames_expected"] == expected, q.id  # asked at its timestamp
        assert p["correct"] in ((None,) if q.scoring.value == "open" else (True, False))
    written = json.loads((tmp_path / "accuracy.json").read_text())
    assert written["judged"] + written["open_ended"] == len(questions) == table["judged"] + table["open_ended"]
    assert written["fps"] == 1.0
