"""Build a random-weight LLaVA-OneVision checkpoint that vLLM 0.32 loads, with no network access.

Tests, demos and benchmarks cannot download weights. This writes a complete checkpoint directory: config,
safetensors (vision tower keys renamed to the `vision_tower.vision_model.*` names vLLM expects), a BPE
tokenizer trained on the fly with the Qwen2 chat special tokens plus `<image>` / `<video>`, and the HF
processor with the chat template. Same preset and seed ⇒ byte-identical weights.

    python -m vllm_livevlm.testing.tiny_model OUT [--preset tiny|tiny-gqa|bench|0.5b|7b|qwen2.5-vl-tiny|...] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>"
    "{% elif c['type'] == 'video' or c['type'] == 'video_url' %}<video>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Text the tokenizer is trained on: enough English for questions and answers to tokenize into words.
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. what is happening in the video? a person is cooking in a "
    "kitchen. what color is the ball? the red square moves left, the blue circle moves right. how many "
    "objects are there? describe the scene. when did the car stop? who opened the door? where is the cat? "
    "yes no one two three four five six seven eight nine ten. user assistant system video frame camera "
    "stream answer question minute second hour ago now before after first last green yellow white black."
)


@dataclass(frozen=True)
class Preset:
    """Shapes of one checkpoint. `vocab_size=None` means: the trained tokenizer's size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    tokenizer_vocab: int = 600
    # Random weights at the usual 0.02 give near-constant greedy output; tests need answers that depend
    # on the video, so the small presets use a wider init.
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768


PRESETS: dict[str, Preset] = {
    # Fast tests: head_dim 64 (CPU attention needs >= 32), 2 layers.
    "tiny": Preset(128, 256, 2, 2, 1, 32, 64, 2, 2, initializer_range=0.15),
    # The same, with grouped-query attention as real checkpoints have it: 4 query heads over 2 KV heads.
    "tiny-gqa": Preset(256, 256, 2, 4, 2, 32, 64, 2, 2, initializer_range=0.15),
    # CPU benchmarks: 8 layers, hidden 512, head_dim 64.
    # Long context so the vanilla baselines can hold long streams in benchmarks.
    "bench": Preset(512, 1408, 8, 8, 2, 128, 512, 4, 2, initializer_range=0.08, max_position_embeddings=262144),
    # Real shapes: Qwen2-0.5B / Qwen2-7B + SigLIP-so400m (26 layers as used by LLaVA-OneVision).
    "0.5b": Preset(896, 4864, 24, 14, 2, 1152, 4304, 26, 16, vocab_size=151936, tie_word_embeddings=True),
    "7b": Preset(3584, 18944, 28, 28, 4, 1152, 4304, 26, 16, vocab_size=152064),
}


def train_tokenizer(vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS, chat_template: str = CHAT_TEMPLATE,
                    image_token: str = "<image>", video_token: str = "<video>"):
    """A byte-level BPE tokenizer trained on `_CORPUS` (no download); `special_tokens` must hold the Qwen2
    chat tokens `<|endoftext|>` (pad), `<|im_start|>` and `<|im_end|>` (end of turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 20, trainer)
    extra = [t for t in special_tokens if t not in ("<|endoftext|>", "<|im_end|>")]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=extra, chat_template=chat_template)
    fast.image_token = image_token
    fast.video_token = video_token
    return fast


def _rename_vision_keys(model_dir: str) -> None:
    """transformers 5 saves SigLIP as `vision_tower.*`; vLLM loads `vision_tower.vision_model.*`."""
    from safetensors.torch import load_file, save_file

    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, name)
        tensors = load_file(path)
        renamed = {}
        for key, value in tensors.items():
            if key.startswith("vision_tower.head"):
                continue  # the pooling head is unused by LLaVA-OneVision and unknown to vLLM
            if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
                key = "vision_tower.vision_model." + key[len("vision_tower."):]
            renamed[key] = value.contiguous()
        save_file(renamed, path, metadata={"format": "pt"})
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            data = json.load(f)
        data["weight_map"] = {
            ("vision_tower.vision_model." + k[len("vision_tower."):]
             if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
            for k, v in data["weight_map"].items() if not k.startswith("vision_tower.head")}
        with open(index, "w") as f:
            json.dump(data, f, indent=2)


def build_tiny_model(out_dir: str, preset: str = "tiny", seed: int = 0, dtype: str = "bfloat16") -> str:
    """Write the checkpoint to `out_dir` (created) and return it."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(shape.tokenizer_vocab)
    vocab = shape.vocab_size or len(tokenizer)
    text_config = Qwen2Config(
        vocab_size=vocab, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        rope_theta=1000000.0, tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=shape.initializer_range)
    vision_config = SiglipVisionConfig(
        hidden_size=shape.vision_hidden_size, intermediate_size=shape.vision_intermediate_size,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=384, patch_size=14, initializer_range=shape.initializer_range)
    config = LlavaOnevisionConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=[[384, 384]], tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=shape.initializer_range)
    config.text_config.rope_theta = 1000000.0
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    _rename_vision_keys(out_dir)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=[[384, 384]],
                                                     size={"height": 384, "width": 384}),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
        tokenizer=tokenizer, num_image_tokens=729, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "livevlm_tiny_model.json"), "w") as f:
        json.dump({"preset": preset, "seed": seed, "dtype": dtype}, f)
    return out_dir


def preset_names() -> list[str]:
    """Every random-checkpoint preset: LLaVA-OneVision's (here) and the Qwen-VL ones (`tiny_qwen_vl`)."""
    from vllm_livevlm.testing.tiny_qwen_vl import PRESETS as QWEN_PRESETS

    return sorted({*PRESETS, *QWEN_PRESETS})


def build_preset(out_dir: str, preset: str, seed: int = 0, dtype: str | None = None) -> str:
    """Build the checkpoint of any preset (`preset_names`); `dtype` defaults to the builder's."""
    from vllm_livevlm.testing.tiny_qwen_vl import PRESETS as QWEN_PRESETS, build_tiny_qwen_vl

    build = build_tiny_qwen_vl if preset in QWEN_PRESETS else build_tiny_model
    return build(out_dir, preset=preset, seed=seed, **({"dtype": dtype} if dtype else {}))


def ensure_tiny_model(out_dir: str, preset: str = "tiny", seed: int = 0) -> str:
    """Build the checkpoint of any preset unless `out_dir` already holds the same preset and seed."""
    marker = os.path.join(out_dir, "livevlm_tiny_model.json")
    if os.path.exists(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("preset") == preset and info.get("seed") == seed:
            return out_dir
    return build_preset(out_dir, preset, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--preset", default="tiny", choices=preset_names())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 (LLaVA-OneVision), the preset's (Qwen-VL)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    print(f"building the {args.preset} preset (random weights, seed {args.seed}) in {args.out} ...", flush=True)
    build_preset(args.out, args.preset, seed=args.seed, dtype=args.dtype)
    print(f"done in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
