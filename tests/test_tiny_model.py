"""The local random-weight LLaVA-OneVision checkpoint: complete, deterministic, loadable by real vLLM."""

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from vllm_livevlm.testing.tiny_model import PRESETS, build_tiny_model

TOKENS_PER_FRAME = 196


def _digest(model_dir: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with open(os.path.join(model_dir, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_checkpoint_layout_and_determinism(tiny_model_dir, tmp_path):
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        config = json.load(f)
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64  # CPU attention needs head_dim >= 32
    assert text["num_hidden_layers"] == 2
    with safe_open(os.path.join(tiny_model_dir, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert not any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in keys)
    again = build_tiny_model(str(tmp_path / "again"), preset="tiny", seed=0)
    assert _digest(again) == _digest(tiny_model_dir)
    other = build_tiny_model(str(tmp_path / "other"), preset="tiny", seed=1)
    assert _digest(other) != _digest(tiny_model_dir)


def test_real_shapes_presets():
    assert (PRESETS["7b"].hidden_size, PRESETS["7b"].num_hidden_layers, PRESETS["7b"].num_key_value_heads) == (3584, 28, 4)
    assert (PRESETS["0.5b"].hidden_size, PRESETS["0.5b"].num_hidden_layers) == (896, 24)
    assert PRESETS["bench"].hidden_size == 512 and PRESETS["bench"].num_hidden_layers == 8
    gqa = PRESETS["tiny-gqa"]  # grouped-query attention, head_dim 64
    assert (gqa.num_attention_heads, gqa.num_key_value_heads, gqa.hidden_size // gqa.num_attention_heads) == (4, 2, 64)


@pytest.mark.slow
def test_vllm_loads_registered_architecture_and_decodes_video(tiny_model_dir):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    llm = LLM(model=tiny_model_dir, hf_overrides={"architectures": ["LiveVLMLlavaOnevisionForConditionalGeneration"]},
              max_model_len=4096, max_num_batched_tokens=4096, limit_mm_per_prompt={"video": 1},
              enforce_eager=True, enable_prefix_caching=False, seed=0)
    assert llm.apply_model(lambda model: type(model).__name__) == ["LiveVLMLlavaOnevisionForConditionalGeneration"]
    video = np.random.default_rng(0).integers(0, 256, size=(8, 384, 384, 3), dtype=np.uint8)
    prompt = "<|im_start|>user\n<video>what is happening in the video?<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(max_tokens=16, temperature=0.0)
    first = llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, params)[0]
    second = llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, params)[0]
    text_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir).encode(prompt)) - 1  # minus <video>
    assert len(first.prompt_token_ids) == 8 * TOKENS_PER_FRAME + 1 + text_tokens
    assert len(first.outputs[0].token_ids) > 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
