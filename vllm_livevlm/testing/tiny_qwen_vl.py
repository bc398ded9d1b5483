"""Build random-weight Qwen2.5-VL and Qwen3-VL checkpoints that vLLM 0.32 and transformers load, offline.

The Qwen-VL twin of `tiny_model.py`: config (multi-axis RoPE `mrope_section`, `tokens_per_second` as in the
released configs; Qwen3-VL: interleaved sections, deepstack), safetensors, the trained BPE tokenizer with the
Qwen-VL vision tokens and the HF processor with a Qwen-VL chat template. Same preset and seed => byte-identical
weights.

    python -m vllm_livevlm.testing.tiny_model OUT --preset qwen2.5-vl-tiny|qwen2.5-vl-bench|qwen2.5-vl-7b|qwen3-vl-tiny
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from vllm_livevlm.testing.tiny_model import train_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or c['type'] == 'video_url' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKER = "livevlm_tiny_model.json"  # the same marker as tiny_model.py: `ensure_tiny_model` reads both


@dataclass(frozen=True)
class QwenVLPreset:
    """Shapes of one checkpoint. head_dim = hidden_size / num_attention_heads; `mrope_section` (temporal,
    height, width) sums to head_dim / 2. `vision_layers`: Qwen2.5-VL's full-attention blocks (the others
    attend within windows), Qwen3-VL's deepstack layers. `vocab_size=None`: the trained tokenizer's size."""

    family: str  # "qwen2.5-vl" or "qwen3-vl"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, int, int]
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_depth: int
    vision_heads: int
    vision_layers: tuple[int, ...]
    # Qwen2.5-VL: every frame is resized to about this many pixels; Qwen3-VL (whose video processor bounds
    # a clip's pixel volume): the most pixels per frame, at 768 frames a clip.
    frame_pixels: int
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    tokenizer_vocab: int = 600
    initializer_range: float = 0.02  # wider in the small presets: answers must depend on the video
    max_position_embeddings: int = 128000
    rope_theta: float = 1000000.0
    tokens_per_second: int = 2  # Qwen2.5-VL-7B-Instruct's (Qwen3-VL places time as text timestamps)
    dtype: str = "float32"  # of the saved weights (engines and references run the tiny ones in float32)

    @property
    def qwen3(self) -> bool:
        return self.family == "qwen3-vl"


PRESETS: dict[str, QwenVLPreset] = {
    # Fast tests: 2 layers, head_dim 64 (CPU attention needs >= 32), 4 query heads over 2 KV heads,
    # 112 x 112 frames = 8 x 8 patches = 16 tokens per temporal patch (2 frames).
    "qwen2.5-vl-tiny": QwenVLPreset("qwen2.5-vl", 256, 256, 2, 4, 2, (8, 12, 12), 64, 128, 2, 2, (1,), 112 * 112,
                                    initializer_range=0.15),
    # CPU benchmarks, the size of the LLaVA `bench` preset: 8 layers, hidden 512, head_dim 64,
    # 392 x 392 frames = 196 tokens per temporal patch.
    "qwen2.5-vl-bench": QwenVLPreset("qwen2.5-vl", 512, 1408, 8, 8, 2, (8, 12, 12), 128, 512, 4, 2, (3,), 392 * 392,
                                     initializer_range=0.08, max_position_embeddings=262144),
    # Real shapes: Qwen2.5-VL-7B-Instruct.
    "qwen2.5-vl-7b": QwenVLPreset("qwen2.5-vl", 3584, 18944, 28, 28, 4, (16, 24, 24), 1280, 3420, 32, 16,
                                  (7, 15, 23, 31), 392 * 392, vocab_size=152064, dtype="bfloat16"),
    # Qwen3-VL, fast tests: as qwen2.5-vl-tiny, 16-pixel patches, one deepstack layer, interleaved M-RoPE;
    # up to 128 x 128 frames (4 x 4 merged tokens per temporal patch).
    "qwen3-vl-tiny": QwenVLPreset("qwen3-vl", 256, 256, 2, 4, 2, (12, 10, 10), 64, 128, 2, 2, (0,), 128 * 128,
                                  initializer_range=0.15, rope_theta=5000000.0),
    # Real shapes: Qwen3-VL-8B-Instruct.
    "qwen3-vl-8b": QwenVLPreset("qwen3-vl", 4096, 12288, 36, 32, 8, (24, 20, 20), 1152, 4304, 27, 16, (8, 16, 24),
                                768 * 32 * 32, vocab_size=151936, max_position_embeddings=262144,
                                rope_theta=5000000.0, dtype="bfloat16"),
}


def _config(shape: QwenVLPreset, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    head_dim = shape.hidden_size // shape.num_attention_heads
    if sum(shape.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {shape.mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta, "mrope_section": list(shape.mrope_section)}
    text = dict(
        vocab_size=shape.vocab_size or len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=1e-6,
        initializer_range=shape.initializer_range, tie_word_embeddings=shape.tie_word_embeddings,
        rope_parameters=rope, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    vision = dict(depth=shape.vision_depth, hidden_size=shape.vision_hidden_size,
                  intermediate_size=shape.vision_intermediate_size, num_heads=shape.vision_heads,
                  out_hidden_size=shape.hidden_size, initializer_range=shape.initializer_range)
    if shape.qwen3:
        rope["mrope_interleaved"] = True
        text["head_dim"] = head_dim
        vision.update(patch_size=16, deepstack_visual_indexes=list(shape.vision_layers), num_position_embeddings=2304)
    else:
        vision.update(fullatt_block_indexes=list(shape.vision_layers), tokens_per_second=shape.tokens_per_second,
                      window_size=112)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config_class = Qwen3VLConfig if shape.qwen3 else Qwen2_5_VLConfig
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie_word_embeddings, **ids)


def _processor(shape: QwenVLPreset, tokenizer):
    from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    common = {"do_sample_frames": False, "cap_pixels_per_frame": False}  # vLLM passes the frames to use
    if shape.qwen3:
        unit = 32  # 16-pixel patches merged 2 x 2
        size = {"shortest_edge": 2 * unit * unit, "longest_edge": 768 * shape.frame_pixels}
        # Qwen3-VL normalises images like its videos (mean = std = 0.5, as released): vLLM's fused input
        # norm applies the image processor's statistics to videos too.
        half = [0.5, 0.5, 0.5]
        return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, image_mean=half,
                                                                      image_std=half),
                                video_processor=Qwen3VLVideoProcessor(size=size, **common),
                                tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    # No total-pixel cap: a frame costs the same tokens whatever the clip length.
    size = {"shortest_edge": shape.frame_pixels, "longest_edge": shape.frame_pixels}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size),
                               video_processor=Qwen2VLVideoProcessor(size=size, **common),
                               tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_tiny_qwen_vl(out_dir: str, preset: str = "qwen2.5-vl-tiny", seed: int = 0, dtype: str | None = None) -> str:
    """Write the checkpoint to `out_dir` (created) and return it; `dtype` defaults to the preset's."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    dtype = dtype or shape.dtype
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(shape.tokenizer_vocab, SPECIAL_TOKENS, CHAT_TEMPLATE, "<|image_pad|>", "<|video_pad|>")
    torch.manual_seed(seed)
    model_class = Qwen3VLForConditionalGeneration if shape.qwen3 else Qwen2_5_VLForConditionalGeneration
    model = model_class(_config(shape, tokenizer)).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    _processor(shape, tokenizer).save_pretrained(out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"preset": preset, "seed": seed, "dtype": dtype}, f)
    return out_dir
