"""The local random-weight Qwen2.5-VL checkpoint: complete, deterministic, and read the same way by vanilla
vLLM and by Hugging Face transformers (greedy tokens equal on a video)."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from reference.qwen25vl_reference import transformers_greedy, vanilla_positions
from vllm_livevlm.testing.tiny_qwen_vl import PRESETS, build_tiny_qwen_vl

PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what is happening in the video?<|im_end|>\n"
          "<|im_start|>assistant\n")
FPS = 2.0  # 2 frames per temporal group => 1 s per group, x tokens_per_second 2 => temporal stride 2
TOKENS_PER_GROUP = 16  # 112 x 112 frames: 8 x 8 patches, merged 2 x 2


def _digest(model_dir: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def test_checkpoint_layout_and_determinism(tiny_qwen25vl_dir, tmp_path):
    with open(os.path.join(tiny_qwen25vl_dir, "config.json")) as f:
        config = json.load(f)
    text, vision = config["text_config"], config["vision_config"]
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64  # CPU attention needs head_dim >= 32
    assert (text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"]) == (2, 4, 2)
    assert text["rope_parameters"]["mrope_section"] == [8, 12, 12]  # sums to head_dim / 2
    assert (vision["tokens_per_second"], vision["temporal_patch_size"], vision["out_hidden_size"]) == (2, 2, 256)
    again = build_tiny_qwen_vl(str(tmp_path / "again"), seed=0)
    assert _digest(again) == _digest(tiny_qwen25vl_dir)
    assert _digest(build_tiny_qwen_vl(str(tmp_path / "other"), seed=1)) != _digest(tiny_qwen25vl_dir)


def test_presets_have_the_released_shapes():
    big = PRESETS["qwen2.5-vl-7b"]  # Qwen2.5-VL-7B-Instruct
    assert (big.num_hidden_layers, big.hidden_size, big.num_attention_heads, big.num_key_value_heads) == (28, 3584, 28, 4)
    assert big.hidden_size // big.num_attention_heads == 128 and big.mrope_section == (16, 24, 24)
    assert (big.vision_depth, big.vision_hidden_size, big.vocab_size) == (32, 1280, 152064)
    bench = PRESETS["qwen2.5-vl-bench"]
    assert sum(bench.mrope_section) * 2 == bench.hidden_size // bench.num_attention_heads == 64


def test_every_preset_builds_through_the_shared_entry_point(tmp_path):
    """bench, fidelity and build-model take any preset: Qwen-VL ones go to this builder, once."""
    from vllm_livevlm.testing.tiny_model import ensure_tiny_model, preset_names

    assert {"tiny", "bench", "7b", "qwen2.5-vl-tiny", "qwen2.5-vl-bench", "qwen2.5-vl-7b"} <= set(preset_names())
    out = ensure_tiny_model(str(tmp_path / "q"), preset="qwen2.5-vl-tiny")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    built = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    assert ensure_tiny_model(out, preset="qwen2.5-vl-tiny") == out
    assert os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == built  # not rebuilt


def test_vanilla_positions_continue_text_after_the_largest_coordinate():
    video = 9
    ids = [1, 2] + [video] * 8 + [3, 4]  # a 2 x 2 x 2 grid (groups, rows, columns)
    positions = vanilla_positions(ids, video, [(2, 2, 2)], stride=2.0)
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 4, 4, 4, 5, 6],
        [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 5, 6],
        [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 5, 6]]


@pytest.mark.slow
def test_vanilla_vllm_and_transformers_give_the_same_greedy_answer(tiny_qwen25vl_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from transformers.video_utils import VideoMetadata
    from vllm import LLM, SamplingParams

    videos = [np.random.default_rng(seed).integers(0, 256, size=(8, 48, 48, 3), dtype=np.uint8) for seed in (0, 1)]
    meta = {"total_num_frames": 8, "fps": FPS, "duration": 8 / FPS, "frames_indices": list(range(8))}
    llm = LLM(model=tiny_qwen25vl_dir, max_model_len=4096, max_num_batched_tokens=4096, dtype="float32",
              limit_mm_per_prompt={"video": 1, "image": 0}, enforce_eager=True, enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    try:
        outs = [llm.generate({"prompt": PROMPT, "multi_modal_data": {
            "video": (v, {**meta, "video_backend": "opencv", "do_sample_frames": False})}}, params)[0] for v in videos]
    finally:
        llm.llm_engine.engine_core.shutdown()
    processor = AutoProcessor.from_pretrained(tiny_qwen25vl_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen25vl_dir, dtype=torch.float32).eval()
    answers = []
    for video, out in zip(videos, outs):
        inputs = processor(text=[PROMPT], videos=[video], video_metadata=[VideoMetadata(**meta)], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        assert list(out.prompt_token_ids) == ids
        assert ids.count(model.config.video_token_id) == 4 * TOKENS_PER_GROUP  # 8 frames = 4 temporal groups
        answer = transformers_greedy(model, inputs, FPS, 12)
        assert list(out.outputs[0].token_ids) == answer
        answers.append(answer)
    assert answers[0] != answers[1]  # the answer depends on the video


@pytest.mark.slow
def test_qwen3_vl_checkpoint_serves_in_vanilla_vllm_as_in_transformers(tmp_path):
    """The tiny Qwen3-VL (interleaved M-RoPE, deepstack, a timestamp before each temporal group): vanilla
    vLLM and transformers give the same greedy answer on a video (transformers' own positions are right
    here: every temporal group is its own video piece)."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    from transformers.video_utils import VideoMetadata
    from vllm import LLM, SamplingParams

    model_dir = build_tiny_qwen_vl(str(tmp_path / "qwen3"), preset="qwen3-vl-tiny")
    with open(os.path.join(model_dir, "config.json")) as f:
        text = json.load(f)["text_config"]
    assert text["rope_parameters"]["mrope_interleaved"] and text["rope_parameters"]["mrope_section"] == [12, 10, 10]
    video = np.random.default_rng(0).integers(0, 256, size=(8, 128, 128, 3), dtype=np.uint8)
    meta = {"total_num_frames": 8, "fps": FPS, "duration": 8 / FPS, "frames_indices": list(range(8))}
    llm = LLM(model=model_dir, max_model_len=4096, max_num_batched_tokens=4096, dtype="float32",
              limit_mm_per_prompt={"video": 1, "image": 0}, enforce_eager=True, enable_prefix_caching=False, seed=0)
    try:
        out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": (video, {
            **meta, "video_backend": "opencv", "do_sample_frames": False})}},
            SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = processor(text=[PROMPT], videos=[video], video_metadata=[VideoMetadata(**meta)], return_tensors="pt")
    assert list(out.prompt_token_ids) == inputs["input_ids"][0].tolist()
    assert "<0.2 seconds>" in processor.tokenizer.decode(out.prompt_token_ids)  # timestamps in the prompt
    model.generation_config.eos_token_id = None  # decode 12 tokens whatever they are, as ignore_eos does
    hf = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert list(out.outputs[0].token_ids) == hf
