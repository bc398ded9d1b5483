"""Evaluation harness on data laid out as each benchmark publishes it (`vllm_livevlm.eval.fixtures` copies the
real record structures and their oddities): default discovery, item counts, unique ids, official prompts, the
official scoring rule of each benchmark on a table of responses, the accuracy arithmetic (scripted answers vs.
hand-computed tables), and one real end-to-end run of every format through a tiny-model LiveVLM engine."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from vllm_livevlm.eval.answerers import OfflineAnswerer, Reply
from vllm_livevlm.eval.fixtures import write_fixtures
from vllm_livevlm.eval.harness import evaluate
from vllm_livevlm.eval.loaders import AnnotationError, get_benchmark
from vllm_livevlm.eval.records import EvalQuestion, Scoring
from vllm_livevlm.eval.scoring import extract_letter, is_correct
from vllm_livevlm.eval.video import decode_video, frames_until

FPS = 0.5
BENCHES = ("ovo", "streamingbench", "rvs-ego", "rvs-movie", "mlvu", "videomme", "egoschema")
DO_NOT = "Do not include any additional text or explanation in your response."


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("eval-fixtures")))


def load(bench: str, data_dir: str, annotations: str | None = None) -> dict[str, EvalQuestion]:
    questions = get_benchmark(bench.removesuffix("-csv")).load(data_dir, annotations)
    ids = [q.id for q in questions]
    assert len(set(ids)) == len(ids)
    assert len({(q.video, q.question, q.query_time) for q in questions}) == len(questions)  # no question twice
    return {q.id: q for q in questions}


# OVO: 18 BT/RT records + FAR probes (CRR 2 x 5, SSR 2 x 13, REC 2 + 3) of the 24-record real excerpt's structure.
COUNTS = {"ovo": 59, "streamingbench": 15, "streamingbench-csv": 4, "rvs-ego": 2, "rvs-movie": 2, "mlvu": 4,
          "videomme": 4, "egoschema": 2}


@pytest.mark.parametrize("bench", list(COUNTS))
def test_default_discovery_counts_every_question_once(bench, data_dirs):
    questions = load(bench, data_dirs[bench])
    assert len(questions) == COUNTS[bench]
    assert all(os.path.isfile(q.video) for q in questions.values())


def test_ovo_official_records_and_prompts(data_dirs):
    ovo = load("ovo", data_dirs["ovo"])
    tasks = {}
    for q in ovo.values():
        tasks[q.task] = tasks.get(q.task, 0) + 1
    assert tasks == {"EPM": 2, "HLD": 2, "ASI": 2, "STU": 2, "OJR": 2, "ATR": 2, "FPD": 2, "ACR": 2, "OCR": 2,
                     "CRR": 10, "SSR": 26, "REC": 5}
    epm = ovo["8"]
    assert (epm.answer, epm.category, epm.query_time, epm.scoring) == ("D", "BT", 7.0, Scoring.OVO_LETTER)
    assert epm.prompt == ("Question: EPM question 8?\nOptions:\n" + "; ".join(
        f"{'ABCDE'[i]}. EPM option {i} of record 8" for i in range(5)) + ";\nRespond only with the letter "
        "corresponding to your chosen option (e.g., A, B, C).\n" + DO_NOT)
    assert (ovo["1117"].query_time, ovo["766"].category) == (0.03, "RT")
    assert [(ovo[f"1631_{i}"].answer, ovo[f"1631_{i}"].query_time) for i in range(3)] == [("1", 4.0), ("1", 7.0), ("1", 15.0)]
    assert ovo["1631_0"].prompt.splitlines()[4] == "Now, answer the following question: How many times did they soccer penalty?"
    assert [ovo[f"1546_{i}"].answer for i in (0, 3)] == ["Yes", "No"] and ovo["1546_3"].query_time == 4.0
    assert ovo["1546_0"].prompt.splitlines()[:3] == [
        "You're watching a tutorial video which contain a sequential of steps.",
        "The following is one step from the whole procedures:", "add ingredients"]
    assert ovo["1492_2"].prompt.splitlines()[2] == "Where do they go (1492)?" and ovo["1492_2"].answer == "Yes"
    assert all(q.prompt.endswith(DO_NOT) for q in ovo.values())


SB_INTRO = ("You are an advanced video question-answering AI assistant. You have been provided with some frames from "
            "the video and a multiple-choice question related to the video. Your task is to carefully analyze the video "
            "and provide the best answer to question, choosing from the four options provided. Respond with only the "
            "letter (A, B, C, or D) of the correct option.\n\n")


def test_streamingbench_json_release(data_dirs):
    sb = load("streamingbench", data_dirs["streamingbench"])
    real = sb["real-sample_1_real-1"]
    assert (real.category, real.answer, real.query_time) == ("Real-Time Visual Understanding", "B", 5.0)
    assert real.prompt == (SB_INTRO + "Question: Object Recognition at 00:00:05?\n\nOptions:\nA. a square.\nB. a circle."
                           "\nC. a line.\nD. nothing.\n\nThe best option is:")
    assert sb["real-sample_1_real-2"].query_time == 7.0  # MM:SS
    split = sb["omni-sample_16_Source_Discrimination-1"]
    assert split.options == ["a leopard.", "a lion.", "A leopard lies in wait in a ravine as an antelope grazes above "
                             "it. The narrator says hello.", "a bird."]
    assert split.answer == "D" and "\nabove it. The narrator says hello.\n\nThe best option" in split.prompt  # as run
    repeated = sb["omni-sample_5_Emotion_Recognition-0"]
    assert (repeated.options, repeated.answer) == (["red.", "blue.", "green.", "white."], "D")
    assert sb["omni-sample_16_Source_Discrimination-0"].options[0] == "A man in black."
    assert "\nA. He is happy\nB. He is serious." in sb["omni-sample_5_Emotion_Recognition-1"].prompt
    assert {q.category for q in sb.values() if q.task == "Misleading Context Understanding"} == {"Contextual Understanding"}
    assert sb["omni-sample_5_Emotion_Recognition-1"].category == "Omni-Source"
    first, second = sb["sqa-sample_17_sqa-0"], sb["sqa-sample_17_sqa-1"]
    assert first.category == second.category == "Contextual Understanding"
    assert "\n\n\n\nHere is the question." in first.prompt  # no context before the first turn
    context = ("Here are the contextual information related to the video. Please answer the questions based on the "
               "contextual information: At timestamp 00:00:02, the following question and answer occurred: Question: "
               "Related Context Understanding at 00:00:02?; Options: A. 2., B. 6., C. 7., D. 4.; Answer: C; ")
    assert second.prompt == (
        "You are an advanced video question-answering AI assistant. You have been provided with a video and a "
        "multiple-choice question related to the video. Your task is to carefully analyze the video and the provided "
        "context to answer the question, choosing from the four options provided. Respond with only the letter (A, B, C, "
        "or D) of the correct option.\n\n" + context + "\n\nHere is the question. Answer it and don't confuse it with "
        "the previous conversation.\nQuestion: Related Context Understanding at 00:00:04?\n\nOptions:\nA. 8.\nB. 7.\n"
        "C. 5.\nD. 9.\n\nThe best option is:")
    assert "Answer: A; " in sb["sqa-sample_17_sqa-2"].prompt and "sample_17" not in sb["sqa-sample_32_sqa-0"].prompt


def test_streamingbench_csv_release(data_dirs):
    d = data_dirs["streamingbench-csv"]
    sb = load("streamingbench", d)
    first = sb["Real-Time Visual Understanding_sample_1_2"]
    assert (first.query_time, first.answer, first.options) == (5.0, "A", ["red", "blue", "green", "white"])
    assert "\nA. red\nB. blue\n" in first.prompt
    assert first.video.endswith(os.path.join("Real-Time Visual Understanding", "sample_1", "video.mp4"))
    sqa = sb["Sequential Question Answering_sample_1_2"]
    assert sqa.video.endswith(os.path.join("Sequential Question Answering", "sample_1", "video.mp4"))
    assert "Question: Who serves?; Options: A. Wang., B. Fan., C. Xu., D. Ma.; Answer: A; " in sqa.prompt
    proactive = os.path.join(d, "StreamingBench", "Proactive_Output.csv")
    with pytest.raises(AnnotationError, match="Proactive_Output.csv.*Proactive Output"):
        get_benchmark("sb").load(d, proactive)


def test_streamingbench_bad_record_names_file_and_record(data_dirs, tmp_path):
    d = str(tmp_path / "sb")
    shutil.copytree(data_dirs["streamingbench"], d)
    path = os.path.join(d, "src", "data", "questions_real.json")
    with open(path) as f:
        entries = json.load(f)
    entries[3]["questions"][0]["answer"] = "E"
    with open(path, "w") as f:
        json.dump(entries, f)
    with pytest.raises(AnnotationError, match=r"questions_real\.json: entry 3 question 0.*answer 'E'"):
        get_benchmark("streamingbench").load(d, None)


def test_rekv_layouts_and_npy_frames(data_dirs):
    movie = load("rvs-movie", data_dirs["rvs-movie"])
    assert [(q.query_time, q.video.endswith("movie1.npy")) for q in movie.values()] == [(3.0, True), (7.5, True)]
    video = movie["movie1-0"].video
    assert decode_video(video, 0.5).shape == (5, 64, 64, 3)  # 10 frames at 1 fps -> t = 0, 2, .., 8
    frames = decode_video(video, 2.0, until=1.0, size=32)
    assert frames.shape == (3, 32, 32, 3)
    source = np.load(video)
    assert np.array_equal(decode_video(video, 0.5, until=4.0), source[[0, 2, 4]])
    assert np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[2], frames[0])  # frame 0 until 1 s
    mlvu = load("mlvu", data_dirs["mlvu"])
    assert sorted(mlvu) == ["1_plotQA/m1-0", "1_plotQA/m1-1", "2_needle/m2-0", "4_count/m1-0"]
    assert mlvu["1_plotQA/m1-0"].video != mlvu["4_count/m1-0"].video
    assert [mlvu[i].answer for i in sorted(mlvu)] == ["A", "D", "C", "B"]
    assert mlvu["2_needle/m2-0"].prompt == ("Question: What appears?\nOptions:\n(A) square\n(B) circle\n(C) line\n"
                                            "(D) dot\nOnly give the best option.")
    assert sorted(load("mlvu", os.path.join(data_dirs["mlvu"], "data", "mlvu"))) == sorted(mlvu)


def test_npy_of_the_wrong_shape_is_refused(tmp_path):
    path = str(tmp_path / "bad.npy")
    np.save(path, np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="bad.npy"):
        decode_video(path, 1.0)


def test_videomme_parquet_and_video_extensions(data_dirs):
    vm = load("videomme", data_dirs["videomme"])
    assert [os.path.basename(q.video) for q in vm.values()] == ["vm1.mp4", "vm1.mp4", "vm2.MP4", "vm3.mkv"]
    assert [(q.category, q.answer) for q in vm.values()] == [("short", "A"), ("short", "B"), ("medium", "C"), ("long", "D")]
    assert vm["002-1"].prompt == ("Select the best answer to the following multiple-choice question based on the video. "
                                  "Respond with only the letter (A, B, C, or D) of the correct option.\n"
                                  "Object Recognition (002-1)?\nA. square\nB. circle\nC. line\nD. dot\nThe best answer is:")


def test_missing_annotations_and_videos_are_named(data_dirs, tmp_path):
    with pytest.raises(AnnotationError, match="no MLVU annotations"):
        get_benchmark("mlvu").load(data_dirs["ovo"], None)
    d = str(tmp_path / "ovo")
    shutil.copytree(data_dirs["ovo"], d)
    os.remove(os.path.join(d, "src_videos", "COIN", "fYTcH6fSHFM.mp4"))
    with pytest.raises(AnnotationError, match=r"ovo_bench_new\.json: record 1546: video 'COIN/fYTcH6fSHFM\.mp4' not found"):
        get_benchmark("ovo").load(d, None)


# ---- the official rules on a table of responses: (rule, gold, response, official verdict, lenient verdict) -------
TABLE = [
    (Scoring.OVO_YES_NO, "Yes", "The answer is Yes.", True, True), (Scoring.OVO_YES_NO, "Yes", "yes", False, True),
    (Scoring.OVO_YES_NO, "Yes", "Not yet", False, False), (Scoring.OVO_YES_NO, "Yes", "Y", True, True),
    (Scoring.OVO_YES_NO, "No", "Not yet", True, False), (Scoring.OVO_YES_NO, "No", "The answer is Yes.", False, False),
    (Scoring.OVO_YES_NO, "No", "N", True, True), (Scoring.OVO_YES_NO, "No", "no", False, True),
    (Scoring.OVO_YES_NO, "No", "", False, False),
    (Scoring.OVO_LETTER, "C", "Berries (C)", True, True), (Scoring.OVO_LETTER, "C", "Answer: C", True, True),
    (Scoring.OVO_LETTER, "A", "Answer: C", True, False), (Scoring.OVO_LETTER, "B", "Berries (C)", True, False),
    (Scoring.OVO_LETTER, "C", "The answer is Yes.", False, False),
    (Scoring.OVO_COUNT, "3", "3 times", True, True), (Scoring.OVO_COUNT, "3", "03", False, True),
    (Scoring.OVO_COUNT, "3", "three", False, False),
    (Scoring.FIRST_CHAR, "C", "Berries (C)", False, True), (Scoring.FIRST_CHAR, "B", "Berries (C)", True, False),
    (Scoring.FIRST_CHAR, "C", "Answer: C", False, True), (Scoring.FIRST_CHAR, "A", "Answer: C", True, False),
    (Scoring.FIRST_CHAR, "C", "C. a line", True, True), (Scoring.FIRST_CHAR, "C", "", False, False),
    (Scoring.LMMS_LETTER, "C", "Berries (C)", False, True), (Scoring.LMMS_LETTER, "C", "Answer: C", False, True),
    (Scoring.LMMS_LETTER, "A", "Answer: C", True, False), (Scoring.LMMS_LETTER, "C", "The answer is C", True, True),
    (Scoring.REKV_LETTER, "C", "Berries (C)", True, True), (Scoring.REKV_LETTER, "C", "Answer: C", False, True),
    (Scoring.REKV_LETTER, "A", "Answer: C", True, False), (Scoring.REKV_LETTER, "B", "(B) a circle", True, True),
    (Scoring.REKV_LETTER, "C", "", False, False)]


@pytest.mark.parametrize("rule,gold,response,official,lenient", TABLE)
def test_official_and_lenient_rules(rule, gold, response, official, lenient):
    question = EvalQuestion(bench="t", id="q", task="t", category="t", video="v", question="q", answer=gold,
                            scoring=rule, options=None if rule in (Scoring.OVO_YES_NO, Scoring.OVO_COUNT) else list("abcd"))
    assert (is_correct(question, response), is_correct(question, response, lenient=True)) == (official, lenient)


@pytest.mark.parametrize("response,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B. a circle", "B"), ("The answer is B", "B"), ("Answer: (C)", "C"),
    ("The best option is: A", "A"), ("I'd say D.", "D"), ("a person walks", None), ("E", None), ("", None)])
def test_lenient_letter_extraction(response, letter):
    assert extract_letter(response, 4) == letter


def test_frames_until():
    assert [frames_until(t, 0.5) for t in (0.0, 1.9, 2.0, 7.0)] == [1, 1, 2, 4]


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


def ovo_script(q: EvalQuestion) -> str:
    """BT/RT: right on the first record of each task, a wrong letter on the second; REC "1" (record 1560) or
    "01" (1631); SSR "Yes"; CRR "Not yet"."""
    if q.category != "FAR":
        first = int(q.id) in {rid for rid, *_ in OVO_FIRST}
        return q.answer if first else "ABCDE"[("ABCDE".index(q.answer) + 1) % len(q.options)]
    return {"REC": "1" if q.id.startswith("1560") else "01", "SSR": "Yes", "CRR": "Not yet"}[q.task]


OVO_FIRST = [(8,), (421,), (530,), (766,), (841,), (1054,), (1117,), (1245,), (1454,)]
SCRIPTS = {
    "ovo": ovo_script,
    "streamingbench": {"real-sample_1_real-0": "C", "real-sample_1_real-1": "Answer: B", "real-sample_1_real-2": "A. a square.",
                       "real-sample_2_real-0": "D", "real-sample_2_real-1": "B",
                       "omni-sample_2_Misleading_Context_Understanding-0": "B", "omni-sample_16_Source_Discrimination-0": "C",
                       "omni-sample_16_Source_Discrimination-1": "The answer is D", "omni-sample_5_Emotion_Recognition-0": "D",
                       "omni-sample_5_Emotion_Recognition-1": "A", "sqa-sample_17_sqa-0": "C", "sqa-sample_17_sqa-1": "A",
                       "sqa-sample_17_sqa-2": "C", "sqa-sample_32_sqa-0": "C", "sqa-sample_32_sqa-1": "Berries (C)"},
    "mlvu": {"1_plotQA/m1-0": "(A) square", "1_plotQA/m1-1": "D", "4_count/m1-0": "Answer: B", "2_needle/m2-0": "C) line"},
    "videomme": {"001-1": "A", "001-2": "(B)", "002-1": "The best answer is C", "003-1": "Answer: D"},
    "egoschema": {"q1": "D", "q2": "E"},
    "rvs-ego": {"ego1-0": "a square", "ego1-1": "left"},
}
SSR_YES = 1800 / 26  # 18 of the 26 SSR probes are type 1
EXPECTED = {  # (lenient, task accuracies, category accuracies, overall, extra, mean over questions)
    "ovo": (False, {**dict.fromkeys(("EPM", "HLD", "ASI", "STU", "OJR", "ATR", "FPD", "ACR", "OCR"), 50),
                    "REC": 40, "SSR": SSR_YES, "CRR": 40},  # REC "01" != "1"; CRR "Not yet" contains "No"
            {"BT": 50, "RT": 50, "FAR": (80 + SSR_YES) / 3}, (100 + (80 + SSR_YES) / 3) / 3, {"BT+RT": 50}, None),
    "ovo-lenient": (True, {**dict.fromkeys(("EPM", "HLD", "ASI", "STU", "OJR", "ATR", "FPD", "ACR", "OCR"), 50),
                           "REC": 100, "SSR": SSR_YES, "CRR": 0},
                    {"BT": 50, "RT": 50, "FAR": (100 + SSR_YES) / 3}, (100 + (100 + SSR_YES) / 3) / 3, {"BT+RT": 50}, None),
    # first character: "Answer: B" reads A, "The answer is D" reads T, "Berries (C)" reads B
    "streamingbench": (False, {"Clips Summarize": 100, "Object Recognition": 0, "Counting": 100, "Attribute Recognition": 100,
                               "Misleading Context Understanding": 100, "Source Discrimination": 50,
                               "Emotion Recognition": 100, "Related Context Understanding": 60},
                       {"Real-Time Visual Understanding": 60, "Omni-Source": 75, "Contextual Understanding": 400 / 6},
                       (60 + 75 + 400 / 6) / 3, {"Real-Time subset": 60}, 1000 / 15),
    # ReKV's letter: the character before the first ")"; "Answer: B" reads A. Overall = M-Avg (mean over tasks).
    "mlvu": (False, {"plotQA": 100, "count": 0, "needle": 100}, {"MLVU": 75}, 200 / 3, {}, 75),
    # lmms-eval: the first of A-D after removing answer prefixes; "Answer: D" reads A
    "videomme": (False, {"Object Recognition": 100, "Counting Problem": 100, "OCR Problems": 0},
                 {"short": 100, "medium": 100, "long": 0}, 75, {}, 75),
    "egoschema": (False, {"egoschema": 50}, {"egoschema": 50}, 50, {}, 50),
}


def scripted(bench: str, questions: list[EvalQuestion]) -> dict[tuple[str, int], str]:
    script = SCRIPTS[bench]
    responses: dict[tuple[str, int], str] = {}
    for q in questions:
        frames = len(decode_video(q.video, FPS, until=q.query_time))
        assert q.query_time is None or frames == frames_until(q.query_time, FPS)
        response = script(q) if callable(script) else script[q.id]
        assert responses.setdefault((q.prompt, frames), response) == response
    return responses


@pytest.mark.parametrize("case", list(EXPECTED) + ["rvs-ego"])
def test_accuracy_tables(case, data_dirs, tmp_path):
    bench = case.removesuffix("-lenient")
    benchmark = get_benchmark(bench)
    questions = benchmark.load(data_dirs[bench], None)
    lenient = EXPECTED.get(case, (False,))[0]
    table = evaluate(benchmark, questions, Scripted(scripted(bench, questions)), FPS, str(tmp_path), lenient=lenient)
    written = json.loads((tmp_path / "accuracy.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [q.id for q in questions]
    assert written["scoring"] == ("lenient" if lenient else "official")
    assert set(written["rules"]) == {q.scoring.value for q in questions}
    if bench == "rvs-ego":
        assert table["overall"] is None and table["open_ended"] == 2 and written["open_ended"] == 2
        judge = [json.loads(line) for line in (tmp_path / "open_ended.jsonl").read_text().splitlines()]
        assert [(j["answer"], j["pred"]) for j in judge] == [("A coloured square.", "a square"), ("To the left.", "left")]
        return
    _, tasks, categories, overall, extra, question_mean = EXPECTED[case]
    assert {t: v["accuracy"] for t, v in written["tasks"].items()} == pytest.approx(tasks)
    assert {c: v["accuracy"] for c, v in written["categories"].items()} == pytest.approx(categories)
    assert written["overall"] == pytest.approx(overall)
    assert written["extra"] == pytest.approx(extra)
    if question_mean is not None:
        assert written["question_mean"] == pytest.approx(question_mean)
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
