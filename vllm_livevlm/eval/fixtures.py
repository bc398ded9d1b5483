"""Tiny data sets laid out as each benchmark publishes its release (for tests and for trying the harness).

`write_fixtures(root)` writes small synthetic videos (a coloured square over a dark background, 64x64) and a
few records per benchmark. The records copy the structure of the real release files, oddities included:
OVO-Bench's integer and float `realtime`s, FAR probes out of time order and record-level CRR fields;
StreamingBench's one-question entries, `*_stream.json` duplicates, list-of-lists SQA sessions, options split
across list entries or repeated, `A.text` prefixes, MM:SS time stamps and CSV category folders; ReKV's
`data/...` video paths, MLVU task folders holding different videos under one id, RVS-Movie `.npy` frame
arrays; Video-MME's parquet with `.MP4`/`.mkv` videos. Nothing binary is committed.

    python scripts/make_eval_fixtures.py OUT
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

SOURCE_FPS = 4
SIZE = 64


def synthetic_frames(seed: int, seconds: float, fps: float = SOURCE_FPS, size: int = SIZE) -> np.ndarray:
    """RGB frames of a square of a seed-dependent colour bouncing across the frame."""
    rng = np.random.default_rng(seed)
    color = rng.integers(80, 256, 3)
    velocity = rng.uniform(-6, 6, 2)
    position = rng.uniform(8, size - 24, 2)
    frames = np.full((int(round(seconds * fps)), size, size, 3), 20, dtype=np.uint8)
    for t in range(len(frames)):
        y, x = (position + velocity * t) % (size - 16)
        frames[t, int(y):int(y) + 16, int(x):int(x) + 16] = color
        frames[t, :, :, 2] += np.uint8(t % 16)  # a slow tint change, so consecutive frames differ everywhere
    return frames


def write_video(path: str, seed: int, seconds: float, fps: float = SOURCE_FPS) -> str:
    """An mp4v-coded file at `path` (any container OpenCV writes: .mp4, .MP4, .mkv), or a `.npy` array at 1 fps."""
    import cv2

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".npy"):
        np.save(path, synthetic_frames(seed, seconds, fps=1.0))
        return path
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (SIZE, SIZE))
    try:
        for frame in synthetic_frames(seed, seconds, fps):
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def _dump(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# ---- OVO-Bench: the structure of the 24 records of a real excerpt of data/ovo_bench_new.json ---------------
OVO_VIDEOS = {"Ego4D/clips/534d9bf8-bdc5-4236-8dba-dd7b894218d2.mp4": 8, "OpenEQA/032-hm3d-6s7QHgap2fW.mp4": 8,
              "hirest/5JpT5RcuFUk_115_251.mp4": 6, "AutoEvalMetaData/107.mp4": 7,
              "YouTube_Games/m-7k8KfT9s8&list=PL3bIgEVl_gDzIfuotDjHjcXzUkB6ZvMXk&index=8.mp4": 7,
              "AutoEvalMetaData/195.mp4": 12, "MovieNet/tt0070511.mp4": 15, "COIN/fYTcH6fSHFM.mp4": 15,
              "perception_test/video_9373.mp4": 16}
OVO_MC = [  # (id, task, video, realtime, number of options, gt)
    (8, "EPM", 0, 7, 5, 3), (34, "EPM", 0, 2, 4, 0), (421, "HLD", 1, 6, 4, 0), (433, "HLD", 1, 5, 4, 3),
    (530, "ASI", 2, 2, 4, 0), (532, "ASI", 2, 4, 4, 0), (766, "STU", 3, 5.02, 4, 1), (774, "STU", 3, 4.04, 4, 0),
    (841, "OJR", 4, 6, 4, 0), (966, "OJR", 4, 4.13, 4, 2), (1054, "ATR", 3, 2.04, 4, 2), (1058, "ATR", 3, 2.04, 4, 1),
    (1117, "FPD", 0, 0.03, 4, 0), (1128, "FPD", 0, 6.23, 4, 1), (1245, "ACR", 3, 3.21, 4, 1),
    (1313, "ACR", 3, 4.02, 4, 1), (1454, "OCR", 5, 11.05, 4, 0), (1456, "OCR", 5, 11.05, 4, 3)]
SSR_TYPES = [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]  # per probe, as in the real SSR records
SSR_TIMES = [2, 3, 5, 4, 4.5, 6, 7, 10, 9.5, 10, 11, 12, 14]  # not in time order, as in the real file
CRR_TYPES = [0, 0, 1, 1, 1]


def _ovo_records() -> list[dict]:
    videos = list(OVO_VIDEOS)
    records = []
    for rid, task, video, realtime, n, gt in OVO_MC:
        options = [f"{task} option {i} of record {rid}" for i in range(n)]
        record = {"id": rid, "task": task, "video": videos[video], "question": f"{task} question {rid}?",
                  "answer": options[gt], "options": options, "gt": gt}
        record["realtime"] = realtime  # HLD records of the real file put it last: key order never matters
        records.append(record)
    for rid, ask in ((1492, 2), (1507, 4)):
        records.append({"id": rid, "task": "CRR", "video": videos[6], "question": f"Where do they go ({rid})?",
                        "answer": "A gate.", "ask_time": ask, "clue_time": ask + 5,
                        "test_info": [{"realtime": ask + d, "type": t} for d, t in zip((0, 2, 6, 8, 10), CRR_TYPES)]})
    for rid, steps in ((1546, ["add ingredients", "mix", "rub"]), (1550, ["tear the foil", "turn", "open"])):
        records.append({"id": rid, "task": "SSR", "video": videos[7], "tutorial": f"Tutorial{rid}", "all_steps": steps,
                        "start_time": [1, 4, 9], "end_time": [5, 10, 14],
                        "test_info": [{"realtime": t, "step": steps[min(i // 4, 2)], "type": k}
                                      for i, (t, k) in enumerate(zip(SSR_TIMES, SSR_TYPES))]})
    records.append({"id": 1560, "task": "REC", "video": videos[8], "activity": "opening something", "start_times": [1],
                    "end_times": [4], "test_info": [{"realtime": 6, "count": 1}, {"realtime": 12.0, "count": 1}]})
    records.append({"id": 1631, "task": "REC", "video": videos[8], "activity": "soccer penalty", "start_times": [3],
                    "end_times": [4], "test_info": [{"realtime": 4, "count": 1}, {"realtime": 7, "count": 1},
                                                    {"realtime": 15.0, "count": 1}]})
    return records


def write_ovo(root: str) -> str:
    d = os.path.join(root, "ovo")
    for i, (video, seconds) in enumerate(OVO_VIDEOS.items()):
        write_video(os.path.join(d, "src_videos", video), i + 1, seconds)
    _dump(os.path.join(d, "data", "ovo_bench_new.json"), _ovo_records())
    return d


# ---- StreamingBench: the GitHub src/data/*.json layout and the Hugging Face CSV layout ------------------------
def _sb_q(task: str, stamp: str, answer: str, options: list[str], ability: str = "working memory") -> dict:
    return {"task_type": task, "question": f"{task} at {stamp}?", "time_stamp": stamp, "answer": answer,
            "options": options, "required_ability": ability}


ABCD = ["A. a square.", "B. a circle.", "C. a line.", "D. nothing."]
SPLIT = ["A. a leopard.", "B. a lion.", "C. A leopard lies in wait in a ravine as an antelope grazes",
         "above it. The narrator says hello.", "D. a bird."]  # one option split by a newline in the source
REPEATED = ["A. red.", "B. blue.", "C. green.", "D. white.", "B. blue.", "C. green.", "D. white."]
NO_SPACE = ["A.A man in black.", "B.A man in white.", "C.A woman in red.", "D.A child."]
BARE = ["He is happy", "He is serious.", "He is sad.", "He is angry."]


def _sb_entry(video: str, question: dict, window: str) -> dict:
    return {"time": window, "questions": [question], "video_categories": "synthetic", "video_path": f"./videos/{video}"}


def _sb_real() -> list[dict]:
    return [_sb_entry("sample_1_real.mp4", _sb_q("Clips Summarize", "00:00:02", "C", ABCD, "episodic memory"),
                      "[0:00:00 - 0:00:10]"),
            _sb_entry("sample_1_real.mp4", _sb_q("Object Recognition", "00:00:05", "B", ABCD), "[0:00:03 - 0:00:13]"),
            {**_sb_entry("sample_1_real.mp4", _sb_q("Counting", "00:07", "A", ABCD), "[0:00:08 - 0:00:18]"),
             "captions": "[0:00:00 - 0:00:09]: a square moves."},  # MM:SS stamp outside its own window
            _sb_entry("sample_2_real.mp4", _sb_q("Attribute Recognition", "00:00:01", "D", ABCD), "[0:00:00 - 0:00:20]"),
            _sb_entry("sample_2_real.mp4", _sb_q("Object Recognition", "00:00:04", "A", ABCD), "[0:00:02 - 0:00:22]")]


def _sb_omni() -> list[dict]:
    return [_sb_entry("sample_2_Misleading_Context_Understanding.mp4",
                      _sb_q("Misleading Context Understanding", "00:00:03", "B", ABCD), "[0:00:00 - 0:01:00]"),
            _sb_entry("sample_16_Source_Discrimination.mp4", _sb_q("Source Discrimination", "00:00:02", "C", NO_SPACE,
                                                                   "episodic memory"), "[0:00:00 - 0:01:00]"),
            _sb_entry("sample_16_Source_Discrimination.mp4", _sb_q("Source Discrimination", "00:00:05", "D", SPLIT),
                      "[0:00:00 - 0:01:00]"),
            _sb_entry("sample_5_Emotion_Recognition.mp4", _sb_q("Emotion Recognition", "00:00:02", "D", REPEATED),
                      "[0:00:00 - 0:01:00]"),
            _sb_entry("sample_5_Emotion_Recognition.mp4", _sb_q("Emotion Recognition", "00:00:04", "A", BARE),
                      "[0:00:00 - 0:01:00]")]


def _sb_sqa() -> list[list[dict]]:
    scores = [["2.", "6.", "7.", "4."], ["8.", "7.", "5.", "9."], ["4.", "3.", "8.", "2."]]
    teams = [["A. DEN.", "B. MIA.", "C. BOS.", "D. GS."], ["A. 15.", "B. 34.", "C. 22.", "D. 30."]]
    first = [_sb_entry("sample_17_sqa.mp4", _sb_q("Related Context Understanding", stamp, answer, options,
                                                  "episodic memory"), f"[0:0{i}:00 - 0:0{i + 1}:00]")
             for i, (stamp, answer, options) in enumerate(zip(("00:00:02", "00:00:04", "00:00:07"), "CAB", scores))]
    second = [_sb_entry("sample_32_sqa.mp4", _sb_q("Related Context Understanding", stamp, "C", options),
                        "[0:01:00 - 0:02:00]") for stamp, options in zip(("00:00:01", "00:00:05"), teams)]
    return [first, second]


def _sb_stream(entries: list[dict]) -> list[dict]:
    """The `*_stream.json` variant: the same questions, grouped by video, with audio paths."""
    by_video: dict[str, list] = {}
    for entry in entries:
        for q in entry["questions"]:
            by_video.setdefault(entry["video_path"], []).append({**q, "audio_path": "./audio/x.wav", "time": entry["time"]})
    return [{"questions": qs, "video_path": video} for video, qs in by_video.items()]


def write_streamingbench(root: str) -> str:
    """The GitHub repository's layout: `src/data/questions_*.json`, videos in `src/videos/` (`./videos/...`)."""
    d = os.path.join(root, "streamingbench")
    real, omni, sqa = _sb_real(), _sb_omni(), _sb_sqa()
    videos = {e["video_path"] for e in real + omni + [e for s in sqa for e in s]}
    for i, video in enumerate(sorted(videos)):
        write_video(os.path.join(d, "src", video), 20 + i, 8)
    for name, data in (("real", real), ("omni", omni), ("sqa", sqa), ("real_stream", _sb_stream(real)),
                       ("omni_stream", _sb_stream(omni))):
        _dump(os.path.join(d, "src", "data", f"questions_{name}.json"), data)
    _dump(os.path.join(d, "src", "data", "questions_proactive.json"), [
        {"time": "[0:00:00 - 0:01:00]", "video_path": "./videos/sample_1_proactive.mp4", "questions": [
            {"task_type": "Proactive Output", "question": "Tell me when the square stops.", "time_stamp": "00:00:01",
             "ground_truth_time_stamp": "00:00:04", "ground_truth_output": "It stopped."}]}])
    return d


CSV_COLUMNS = ["question_id", "task_type", "question", "time_stamp", "answer", "options", "frames_required",
               "temporal_clue_type"]


def _write_csv(path: str, columns: list[str], rows: list[list]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def write_streamingbench_csv(root: str) -> str:
    """The Hugging Face release: `StreamingBench/*.csv`, videos in `<category>/sample_<N>/video.mp4`."""
    d = os.path.join(root, "streamingbench_csv")
    write_video(os.path.join(d, "Real-Time Visual Understanding", "sample_1", "video.mp4"), 30, 8)
    write_video(os.path.join(d, "Sequential Question Answering", "sample_1", "video.mp4"), 31, 8)
    rtvu = "Real-Time Visual Understanding_sample_1_"
    _write_csv(os.path.join(d, "StreamingBench", "Real_Time_Visual_Understanding.csv"), CSV_COLUMNS, [
        [rtvu + "1", "Counting", "How many squares?", "00:00:03", "B", str(["A. one", "B. two", "C. three", "D. four"]),
         "single", "Current"],
        [rtvu + "2", "Attribute Recognition", "What colour?", "00:05", "A", str(["red", "blue", "green", "white"]),
         "single", "Prior"]])  # MM:SS stamp, options without letters
    sqa = "Sequential Question Answering_sample_1_"
    _write_csv(os.path.join(d, "StreamingBench", "Sequential_Question_Answering.csv"), CSV_COLUMNS, [
        [sqa + "1", "Related Context Understanding", "Who serves?", "00:00:02", "A", str(["Wang.", "Fan.", "Xu.", "Ma."]),
         "single", "Prior"],
        [sqa + "2", "Related Context Understanding", "What is their score now?", "00:00:06", "C",
         str(["2.", "6.", "7.", "4."]), "single", "Prior"]])
    _write_csv(os.path.join(d, "StreamingBench", "Proactive_Output.csv"),
               ["question_id", "task_type", "question", "time_stamp", "ground_truth_time_stamp", "ground_truth_output"],
               [["Proactive Output_sample_1_1", "Proactive Output", "Tell me when it stops.", "00:00:01", "00:00:04",
                 "stopped"]])
    return d


# ---- ReKV data folders: RVS (Hugging Face Becomebright/RVS), MLVU dev MC ------------------------------------
def write_rvs(root: str) -> str:
    """`ego/ego4d_oe.json` + mp4s and `movie/movienet_oe.json` + `.npy` frame arrays (1 fps), paths as ReKV writes them."""
    d = os.path.join(root, "rvs")
    for subset, name, ext, seed in (("ego", "ego4d_oe.json", "mp4", 40), ("movie", "movienet_oe.json", "npy", 41)):
        video_id = f"{subset}1"
        write_video(os.path.join(d, subset, "videos", f"{video_id}.{ext}"), seed, 10)
        _dump(os.path.join(d, subset, name), [{
            "video_id": video_id, "video_path": f"data/rvs/{subset}/videos/{video_id}.{ext}", "duration": 10.0,
            "conversations": [
                {"question": "What is moving?", "answer": "A coloured square.", "start_time": 0.0, "end_time": 3.0},
                {"question": "Where did it go?", "answer": "To the left.", "start_time": 3.0, "end_time": 7.5}]}])
    return d


def write_mlvu(root: str) -> str:
    """ReKV's root: `data/mlvu/dev_debug_mc.json`, videos `data/mlvu/videos/<k_task>/<id>.mp4`; the same id `m1`
    names different files in two task folders, as 120 real ids do."""
    d = os.path.join(root, "mlvu")
    choices = ["square", "circle", "line", "dot"]
    entries = []
    for seed, (task, video_id, convs) in enumerate((
            ("1_plotQA", "m1", [("What shape moves?", "square"), ("What shape is last?", "dot")]),
            ("4_count", "m1", [("How many shapes?", "circle")]),
            ("2_needle", "m2", [("What appears?", "line")]))):
        path = f"data/mlvu/videos/{task}/{video_id}.mp4"
        write_video(os.path.join(d, path), 50 + seed, 6)
        entries.append({"video_id": video_id, "video_path": path, "duration": 6.0, "conversations": [
            {"question": q, "choices": choices, "answer": a, "question_type": task.split("_", 1)[1]} for q, a in convs]})
    _dump(os.path.join(d, "data", "mlvu", "dev_debug_mc.json"), entries)
    return d


# ---- Video-MME (lmms-lab/Video-MME parquet) and EgoSchema (egoschema/EgoSchema) -----------------------------
def write_videomme(root: str) -> str:
    """`videomme/test-00000-of-00001.parquet`, videos `data/<videoID>.mp4|.MP4|.mkv` as the release unpacks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = os.path.join(root, "videomme")
    for seed, name in enumerate(("vm1.mp4", "vm2.MP4", "vm3.mkv")):
        write_video(os.path.join(d, "data", name), 60 + seed, 5)
    rows = [("001", "short", "vm1", "001-1", "Object Recognition", "A"),
            ("001", "short", "vm1", "001-2", "Counting Problem", "B"),
            ("002", "medium", "vm2", "002-1", "Object Recognition", "C"),
            ("003", "long", "vm3", "003-1", "OCR Problems", "D")]
    table = {"video_id": [], "duration": [], "domain": [], "sub_category": [], "url": [], "videoID": [],
             "question_id": [], "task_type": [], "question": [], "options": [], "answer": []}
    for video_id, duration, video, qid, task, answer in rows:
        for key, value in (("video_id", video_id), ("duration", duration), ("domain", "Knowledge"),
                           ("sub_category", "Technology"), ("url", f"https://www.youtube.com/watch?v={video}"),
                           ("videoID", video), ("question_id", qid), ("task_type", task),
                           ("question", f"{task} ({qid})?"), ("options", ["A. square", "B. circle", "C. line", "D. dot"]),
                           ("answer", answer)):
            table[key].append(value)
    os.makedirs(os.path.join(d, "videomme"), exist_ok=True)
    pq.write_table(pa.table(table), os.path.join(d, "videomme", "test-00000-of-00001.parquet"))
    return d


def write_egoschema(root: str) -> str:
    d = os.path.join(root, "egoschema")
    for i, uid in enumerate(("q1", "q2", "q3")):
        write_video(os.path.join(d, "videos", f"{uid}.mp4"), 70 + i, 4)
    _dump(os.path.join(d, "questions.json"), [
        {"q_uid": uid, "google_drive_id": "", "question": f"What is the overall activity ({uid})?",
         **{f"option {i}": text for i, text in enumerate(["cooking", "walking", "reading", "painting", "sleeping"])}}
        for uid in ("q1", "q2", "q3")])
    _dump(os.path.join(d, "subset_answers.json"), {"q1": 3, "q2": 0})  # q3 has no public answer
    return d


def write_fixtures(root: str) -> dict[str, str]:
    """Write every benchmark's fixture under `root`; returns {benchmark: data directory}."""
    rvs = write_rvs(root)
    return {"ovo": write_ovo(root), "streamingbench": write_streamingbench(root), "rvs-ego": rvs, "rvs-movie": rvs,
            "mlvu": write_mlvu(root), "videomme": write_videomme(root), "egoschema": write_egoschema(root),
            "streamingbench-csv": write_streamingbench_csv(root)}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write tiny data sets in every benchmark's release layout.")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    for bench, path in write_fixtures(args.out).items():
        print(f"{bench:<20} {path}")


if __name__ == "__main__":
    main()
