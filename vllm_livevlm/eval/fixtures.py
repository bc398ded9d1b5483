"""Tiny synthetic data in every supported annotation format (for tests and for trying the harness).

`write_fixtures(root)` writes small synthetic mp4s (a coloured square moving over a dark background,
64x64, 4 fps) and a handful of questions per benchmark, laid out as each benchmark ships its data.
Nothing binary is committed: tests generate this into a temporary directory.

    python scripts/make_eval_fixtures.py OUT
"""

from __future__ import annotations

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
    import cv2

    os.makedirs(os.path.dirname(path), exist_ok=True)
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


def write_ovo(root: str) -> str:
    d = os.path.join(root, "ovo")
    write_video(os.path.join(d, "src_videos", "COIN", "cook.mp4"), 1, 8)
    write_video(os.path.join(d, "src_videos", "Ego4D", "walk.mp4"), 2, 8)
    opts = ["a red square", "a blue circle", "a green line", "nothing"]
    _dump(os.path.join(d, "data", "ovo_bench_new.json"), [
        {"id": 0, "task": "EPM", "video": "COIN/cook.mp4", "realtime": 3.0, "question": "What moved first?",
         "options": opts, "answer": opts[1], "gt": 1},
        {"id": 1, "task": "OCR", "video": "COIN/cook.mp4", "realtime": 5.0, "question": "What text is shown?",
         "options": opts, "answer": opts[2], "gt": 2},
        {"id": 2, "task": "ACR", "video": "Ego4D/walk.mp4", "realtime": 2.0, "question": "What is the person doing?",
         "candidates": opts[:3], "answer": opts[0], "gt": 0},
        {"id": 3, "task": "REC", "video": "Ego4D/walk.mp4", "activity": "jump",
         "test_info": [{"realtime": 4.0, "count": 2}, {"realtime": 7.0, "count": 3}]},
        {"id": 4, "task": "SSR", "video": "COIN/cook.mp4",
         "test_info": [{"realtime": 1.0, "step": "stir the soup", "type": 0},
                       {"realtime": 6.0, "step": "stir the soup", "type": 1}]},
        {"id": 5, "task": "CRR", "video": "Ego4D/walk.mp4", "question": "What color is the ball?",
         "test_info": [{"realtime": 2.0, "type": 0, "ask_time": 1.0, "clue_time": 5.0},
                       {"realtime": 6.0, "type": 1, "ask_time": 1.0, "clue_time": 5.0}]},
    ])
    return d


def _sb_question(task: str, stamp: str, answer: str) -> dict:
    return {"task_type": task, "question": f"{task}: what is on screen?", "time_stamp": stamp,
            "options": ["A. a square", "B. a circle", "C. a line", "D. nothing"], "answer": answer,
            "required_ability": "perception"}


def write_streamingbench(root: str) -> str:
    d = os.path.join(root, "streamingbench")
    write_video(os.path.join(d, "videos", "sample_1.mp4"), 3, 8)
    write_video(os.path.join(d, "videos", "sample_2.mp4"), 4, 6)
    _dump(os.path.join(d, "questions_real.json"), [
        {"video_path": "videos/sample_1.mp4", "video_categories": "synthetic", "questions": [
            _sb_question("Object Recognition", "00:00:02", "A"), _sb_question("Counting", "00:00:05", "C"),
            _sb_question("Object Recognition", "00:00:07", "B")]},
        {"video_path": "videos/sample_2.mp4", "video_categories": "synthetic", "questions": [
            _sb_question("Counting", "00:00:01", "D"), _sb_question("Spatial Understanding", "00:00:04", "A")]},
    ])
    _dump(os.path.join(d, "questions_omni.json"), [
        {"video_path": "videos/sample_2.mp4", "video_categories": "synthetic", "questions": [
            _sb_question("Source Discrimination", "00:00:03", "B")]},
    ])
    # Proactive output is scored on when the model speaks: the harness does not load it.
    _dump(os.path.join(d, "questions_proactive.json"), [
        {"video_path": "videos/sample_1.mp4", "questions": [
            {**_sb_question("Proactive Output", "00:00:01", "A"), "ground_truth_time_stamp": "00:00:04",
             "ground_truth_output": "square"}]}])
    return d


def write_streamingbench_csv(root: str) -> str:
    d = os.path.join(root, "streamingbench_csv")
    write_video(os.path.join(d, "sample_7", "video.mp4"), 5, 6)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "Real_Time_Visual_Understanding.csv"), "w") as f:
        f.write("question_id,task_type,question,time_stamp,answer,options,frames_required,temporal_clue_type\n")
        f.write('sample_7_real_0,Counting,How many squares?,00:00:03,B,"[\'A. one\', \'B. two\', \'C. three\', '
                '\'D. four\']",1,Current\n')
        f.write('sample_7_real_1,Attribute Recognition,What colour?,00:00:05,A,"[\'A. red\', \'B. blue\', '
                '\'C. green\', \'D. white\']",1,Current\n')
    return d


def write_rvs(root: str) -> str:
    d = os.path.join(root, "rvs")
    for subset, name, seed in (("ego", "ego4d_oe.json", 6), ("movie", "movienet_oe.json", 7)):
        write_video(os.path.join(d, subset, "videos", f"{subset}1.mp4"), seed, 8)
        _dump(os.path.join(d, subset, name), [{
            "video_id": f"{subset}1", "video_path": f"{subset}/videos/{subset}1.mp4", "duration": 8.0,
            "conversations": [
                {"question": "What is moving?", "answer": "A coloured square.", "start_time": 0.0, "end_time": 3.0},
                {"question": "Where did it go?", "answer": "To the left.", "start_time": 3.0, "end_time": 7.5}]}])
    return d


def write_mlvu(root: str) -> str:
    d = os.path.join(root, "mlvu")
    write_video(os.path.join(d, "videos", "m1.mp4"), 8, 6)
    write_video(os.path.join(d, "videos", "m2.mp4"), 9, 4)
    choices = ["square", "circle", "line", "dot"]
    _dump(os.path.join(d, "dev_debug_mc.json"), [
        {"video_id": "m1", "video_path": "videos/m1.mp4", "duration": 6.0, "conversations": [
            {"question": "What shape moves?", "choices": choices, "answer": "square", "question_type": "plotQA"},
            {"question": "What shape is last?", "choices": choices, "answer": "dot", "question_type": "order"}]},
        {"video_id": "m2", "video_path": "videos/m2.mp4", "duration": 4.0, "conversations": [
            {"question": "What appears?", "choices": choices, "answer": "circle", "question_type": "plotQA"}]},
    ])
    return d


def write_videomme(root: str) -> str:
    d = os.path.join(root, "videomme")
    write_video(os.path.join(d, "videos", "vm1.mp4"), 10, 5)
    write_video(os.path.join(d, "videos", "vm2.mp4"), 11, 7)
    options = ["A. square", "B. circle", "C. line", "D. dot"]
    _dump(os.path.join(d, "videomme.json"), [
        {"video_id": "001", "videoID": "vm1", "question_id": "001-1", "duration": "short", "domain": "synthetic",
         "sub_category": "shapes", "task_type": "Object Recognition", "question": "What moves?", "options": options,
         "answer": "A"},
        {"video_id": "001", "videoID": "vm1", "question_id": "001-2", "duration": "short", "domain": "synthetic",
         "sub_category": "shapes", "task_type": "Counting Problem", "question": "How many?", "options": options,
         "answer": "B"},
        {"video_id": "002", "videoID": "vm2", "question_id": "002-1", "duration": "medium", "domain": "synthetic",
         "sub_category": "shapes", "task_type": "Object Recognition", "question": "What is it?", "options": options,
         "answer": "C"},
    ])
    return d


def write_egoschema(root: str) -> str:
    d = os.path.join(root, "egoschema")
    for i, uid in enumerate(("q1", "q2", "q3")):
        write_video(os.path.join(d, "videos", f"{uid}.mp4"), 12 + i, 4)
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

    parser = argparse.ArgumentParser(description="Write tiny synthetic data in every supported benchmark format.")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    for bench, path in write_fixtures(args.out).items():
        print(f"{bench:<20} {path}")


if __name__ == "__main__":
    main()
