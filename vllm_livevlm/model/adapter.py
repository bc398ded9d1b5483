"""The model-adapter layer: what LiveVLM's memory, connector and front end need from a model family.

One `ModelAdapter` per family, chosen from the checkpoint's `architectures` (config.json): the LiveVLM
architecture vLLM runs it as, the video prompt and item of one clip, how a clip's tokens map to frames and
(multi-axis models) to position records (`docs/positions.md`), the temporal stride of the multi-axis rule,
and size bounds. Everything else (attention layers, raw-key capture, rotation) is shared: every family runs
a Qwen2 or Qwen3 language model whose attention calls the `livevlm::rotary_with_hooks` op with the layer's
own rotary embedding (`vllm_livevlm.model.qwen2`, `.qwen3`). Importing this module needs no vLLM.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

# A position record per stored token (multi-axis models): clip number, temporal group (-1: a text token of
# the clip), row and column on the merged grid.
RECORD_AXES = 4
TEXT_GROUP = -1


class UnsupportedModel(ValueError):
    """The checkpoint's architecture has no LiveVLM adapter."""


class ModelAdapter(ABC):
    """What LiveVLM needs from one model family. Subclasses set the class attributes and, in `__init__`
    (from the HF config and the checkpoint directory), `tokens_per_frame` (video tokens per frame, at
    most: the size checks and memory bounds count `tokens_per_frame + 1` per frame) and `frame_side` (the
    side uploads are shrunk to as they are decoded)."""

    family: str
    hf_architectures: tuple[str, ...]   # the checkpoint architectures (config.json) it serves
    livevlm_architecture: str           # what vLLM runs them as (`--hf-overrides`)
    position_axes: int                  # width of a stored token's position record (0: placed by slot)
    tokens_per_frame: int
    frame_side: int

    @abstractmethod
    def __init__(self, hf_config: Any, model_dir: str | None = None): ...

    @property
    def multi_axis(self) -> bool:
        return self.position_axes > 0

    @abstractmethod
    def max_clip_tokens(self, num_frames: int) -> int:
        """Tokens one clip of `num_frames` frames prefills, at most."""

    # ---- front end ------------------------------------------------------------------------------------------
    @abstractmethod
    def video_prompt(self, tokenizer: Any) -> list[int]:
        """Token ids standing for one clip in a prompt (vLLM expands the video token)."""

    @abstractmethod
    def video_item(self, frames: np.ndarray, fps: float | None, first_frame: int = 0) -> Any:
        """The `multi_modal_data["video"]` item of one clip (`fps`: the stream's `sample_fps`; `first_frame`:
        the stream index of the clip's first frame, for models that show the time)."""

    # ---- engine ---------------------------------------------------------------------------------------------
    def video_grid(self, mm_features: list[Any]) -> tuple[int, ...] | None:
        """(temporal groups, rows, columns[, family-specific layout]) of a clip request's merged video grid
        (scheduler side: vLLM's multimodal features of the request); None when the layout needs no grid."""
        return None

    @abstractmethod
    def clip_layout(self, num_tokens: int, num_frames: int, grid: tuple[int, ...] | None,
                    clip: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame offset in the clip [T] and position record [T, position_axes] of each of a clip's T tokens
        (`clip`: its number in the stream); raises ValueError when the tokens do not fit the layout."""

    def temporal_stride(self, fps: float | None) -> float:
        """Temporal positions per temporal group (the multi-axis rule); unused by 1-D models."""
        return 1.0

    def profiled_item_tokens(self) -> int:
        """Tokens of the largest video item vLLM sizes its encoder budget by at start (0: no more than a
        clip): with chunked multimodal input off, the engine must batch that many tokens in one step."""
        return 0

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an uploaded frame is shrunk to before it is kept: what the processor sees
        without losing anything, within the tokens per frame the memory bounds count. Default: the shorter
        side at `frame_side` (a processor that resizes every frame to a square of that side)."""
        return shorter_side_at(self.frame_side, height, width)


class LlavaOnevisionAdapter(ModelAdapter):
    """LLaVA-OneVision: 1-D RoPE, `tokens_per_frame` tokens per frame (SigLIP patches pooled 2x2, 196 at
    384 px) and one newline token closing each video."""

    family = "llava-onevision"
    hf_architectures = ("LlavaOnevisionForConditionalGeneration",)
    livevlm_architecture = "LiveVLMLlavaOnevisionForConditionalGeneration"
    position_axes = 0

    def __init__(self, hf_config: Any, model_dir: str | None = None):
        self.hf_config = hf_config
        vision = hf_config.vision_config
        grid = vision.image_size // vision.patch_size
        self.tokens_per_frame = math.ceil(grid / 2) ** 2
        self.frame_side = vision.image_size

    def max_clip_tokens(self, num_frames: int) -> int:
        return num_frames * self.tokens_per_frame + 1

    def video_prompt(self, tokenizer: Any) -> list[int]:
        return [tokenizer.convert_tokens_to_ids("<video>")]

    def video_item(self, frames: np.ndarray, fps: float | None, first_frame: int = 0) -> Any:
        return frames

    def clip_layout(self, num_tokens: int, num_frames: int, grid: tuple[int, int, int] | None,
                    clip: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        per_frame = (num_tokens - 1) // num_frames  # one newline token closes a video
        if per_frame < 1:
            raise ValueError(f"{num_tokens} clip tokens for {num_frames} frames")
        offsets = torch.clamp(torch.arange(num_tokens, device=device) // per_frame, max=num_frames - 1)
        return offsets, torch.zeros((num_tokens, 0), dtype=torch.long, device=device)


class Qwen2_5_VLAdapter(ModelAdapter):
    """Qwen2.5-VL: multi-axis RoPE (t, h, w); `temporal_patch_size` (2) frames per temporal group of
    (H/28)(W/28) tokens, between `<|vision_start|>` and `<|vision_end|>`; the temporal stride is
    `temporal_patch_size / fps * tokens_per_second` (vLLM's `second_per_grid_ts * tokens_per_second`)."""

    family = "qwen2.5-vl"
    hf_architectures = ("Qwen2_5_VLForConditionalGeneration",)
    livevlm_architecture = "LiveVLMQwen2_5_VLForConditionalGeneration"
    position_axes = RECORD_AXES
    DEFAULT_FPS = 2.0  # the fps declared when a stream keeps every frame (`sample_fps` null): Qwen's default

    def __init__(self, hf_config: Any, model_dir: str | None = None):
        self.hf_config = hf_config
        vision = hf_config.vision_config
        self.temporal_patch = vision.temporal_patch_size
        self.tokens_per_second = getattr(vision, "tokens_per_second", 1.0)
        unit = self.unit = vision.patch_size * vision.spatial_merge_size
        max_pixels = _video_max_pixels(model_dir) or unit * unit * 768
        self.group_tokens = max_pixels // (unit * unit)  # at most, per temporal group
        # An upper bound per frame (memory bounds count `tokens_per_frame + 1` per short-term frame): a
        # temporal group's tokens (its frames share them) + the second text token of a clip.
        self.tokens_per_frame = self.group_tokens + 1
        self.frame_side = math.isqrt(max_pixels)

    def max_clip_tokens(self, num_frames: int) -> int:
        return math.ceil(num_frames / self.temporal_patch) * self.group_tokens + 2

    MAX_ASPECT = 200  # the Qwen processors refuse a frame whose sides differ more (`smart_resize`)

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The Qwen processors keep a frame's aspect and round each side to the merged patch (`unit`): the
        size is shrunk, aspect kept, until that rounded grid holds at most `group_tokens` tokens, whatever
        the frame's shape (a bound on the shorter side alone lets a wide frame cost many times more)."""
        if max(height, width) > self.MAX_ASPECT * min(height, width):
            raise ValueError(f"a {width}x{height} frame: its sides differ more than {self.MAX_ASPECT}x, which "
                             f"the {self.family} processor refuses")
        scale = min(1.0, math.sqrt(self.group_tokens * self.unit ** 2 / (height * width)))
        while True:
            size = (height, width) if scale >= 1.0 else (max(1, round(height * scale)), max(1, round(width * scale)))
            if self._grid_tokens(*size) <= self.group_tokens:
                return size
            if min(size) <= self.unit:  # the processor scales a shorter side back up to one unit
                raise ValueError(f"a {width}x{height} frame costs more than {self.group_tokens} tokens at any size "
                                 f"on {self.family}: its sides differ too much")
            scale *= 0.98

    def _grid_tokens(self, height: int, width: int) -> int:
        """Tokens of a frame's merged grid as the processors round it; a side under one unit is scaled up
        first, aspect kept (Qwen3-VL; Qwen2.5-VL costs no more there)."""
        if min(height, width) < self.unit:
            scale = self.unit / min(height, width)
            height, width = int(height * scale), int(width * scale)
        return max(1, round(height / self.unit)) * max(1, round(width / self.unit))

    def _check_clip_tokens(self, num_tokens: int, num_frames: int) -> None:
        """What the memory bounds counted: a clip whose frames cost more tokens (frames the front end did
        not shrink, a processor configured otherwise) is refused before it is kept."""
        bound = self.max_clip_tokens(num_frames)
        if num_tokens > bound:
            raise ValueError(f"{num_tokens} clip tokens for {num_frames} frames: over the {bound} the "
                             "stream's memory bound counts")

    def video_prompt(self, tokenizer: Any) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>")]

    def video_item(self, frames: np.ndarray, fps: float | None, first_frame: int = 0) -> Any:
        return frames, self._metadata(len(frames), fps or self.DEFAULT_FPS, 0)  # time is not shown: clip-local

    @staticmethod
    def _metadata(n: int, fps: float, first_frame: int) -> dict[str, Any]:
        return {"fps": fps, "duration": n / fps, "total_num_frames": n,
                "frames_indices": list(range(first_frame, first_frame + n)), "video_backend": "opencv",
                "do_sample_frames": False}

    def video_grid(self, mm_features: list[Any]) -> tuple[int, ...] | None:
        feature = _video_feature(mm_features)
        if feature is None:
            return None
        merge = self.hf_config.vision_config.spatial_merge_size
        t, h, w = (int(n) for n in feature.data["video_grid_thw"].data.tolist())
        return t, h // merge, w // merge

    def clip_layout(self, num_tokens: int, num_frames: int, grid: tuple[int, ...] | None,
                    clip: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if grid is None:
            raise ValueError("a Qwen2.5-VL clip needs its video grid")
        self._check_clip_tokens(num_tokens, num_frames)
        groups, rows, cols = grid
        if num_tokens != groups * rows * cols + 2 or groups != math.ceil(num_frames / self.temporal_patch):
            raise ValueError(f"{num_tokens} clip tokens for {num_frames} frames on a {groups}x{rows}x{cols} grid")
        g, y, x = (a.reshape(-1) for a in torch.meshgrid(
            torch.arange(groups, device=device), torch.arange(rows, device=device), torch.arange(cols, device=device),
            indexing="ij"))
        # A group's tokens belong to its last frame (a short-term window of F frames keeps whole groups).
        frames = torch.clamp((g + 1) * self.temporal_patch - 1, max=num_frames - 1)
        start, end = torch.zeros(1, dtype=torch.long, device=device), torch.full((1,), num_frames - 1, device=device)
        offsets = torch.cat([start, frames, end])
        text = torch.tensor([[clip, TEXT_GROUP, 0, 0]], device=device)
        video = torch.stack([torch.full_like(g, clip), g, y, x], dim=1)
        return offsets, torch.cat([text, video, text])

    def temporal_stride(self, fps: float | None) -> float:
        # vLLM multiplies the float32 `second_per_grid_ts` item by `tokens_per_second`: the same rounding here.
        seconds = torch.tensor(self.temporal_patch / (fps or self.DEFAULT_FPS), dtype=torch.float32).item()
        return seconds * self.tokens_per_second


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL: interleaved multi-axis RoPE, q/k norm, deepstack; its video prompt shows the time: each
    temporal group is `<t seconds>` (text, t from the declared fps and frame indices: the stream's
    `sample_fps` and clock), `<|vision_start|>`, (H/32)(W/32) video tokens, `<|vision_end|>`, inside the clip's
    own `<|vision_start|>`/`<|vision_end|>`. vLLM numbers every group from its own base, so in the rule each
    group is a run of its own (no temporal stride)."""

    family = "qwen3-vl"
    hf_architectures = ("Qwen3VLForConditionalGeneration",)
    livevlm_architecture = "LiveVLMQwen3VLForConditionalGeneration"
    VOLUME_FRAMES = 768    # Qwen3-VL's video processor bounds a clip's pixels: its `size` holds 768 frames' worth
    TIMESTAMP_TOKENS = 24  # at most per `<t seconds>` (byte-level BPE: one token per byte at worst, t < 1e15 s)

    def __init__(self, hf_config: Any, model_dir: str | None = None):
        self.hf_config = hf_config
        vision = hf_config.vision_config
        self.temporal_patch = vision.temporal_patch_size
        unit = self.unit = vision.patch_size * vision.spatial_merge_size
        volume = _video_max_pixels(model_dir) or unit * unit * 768 * self.VOLUME_FRAMES
        self.frame_side = math.isqrt(volume // self.VOLUME_FRAMES)
        self.group_tokens = math.ceil(self.frame_side / unit) ** 2  # the processor rounds sides to `unit`
        # vLLM 0.32's `get_max_video_tokens` for this volume: volume / unit^2 tokens (12,288 on `qwen3-vl-tiny`,
        # the figure its start-up check names; tests/test_qwen3vl.py starts the engine on it).
        self._profiled_item_tokens = volume // (unit * unit)
        # Per frame, at most: a temporal group with its timestamp and markers + the clip's outer markers.
        self.tokens_per_frame = self.group_tokens + self.TIMESTAMP_TOKENS + 3

    def max_clip_tokens(self, num_frames: int) -> int:
        groups = math.ceil(num_frames / self.temporal_patch)
        return groups * (self.group_tokens + self.TIMESTAMP_TOKENS + 2) + 2

    def profiled_item_tokens(self) -> int:
        return self._profiled_item_tokens

    def video_item(self, frames: np.ndarray, fps: float | None, first_frame: int = 0) -> Any:
        return frames, self._metadata(len(frames), fps or self.DEFAULT_FPS, first_frame)

    def video_grid(self, mm_features: list[Any]) -> tuple[int, ...] | None:
        """The grid and, after it, the lengths of the text runs of the video item's placeholder: before each
        temporal group's video tokens (a timestamp and markers) and after the last (read off vLLM's mask of
        the placeholder's embedding positions)."""
        grid = super().video_grid(mm_features)
        is_embed = _video_feature(mm_features).mm_position.is_embed if grid is not None else None
        if is_embed is None:
            return grid
        edges = torch.diff(is_embed.to(torch.int8), prepend=is_embed.new_zeros(1, dtype=torch.int8),
                           append=is_embed.new_zeros(1, dtype=torch.int8))
        starts, ends = torch.nonzero(edges > 0).flatten(), torch.nonzero(edges < 0).flatten()
        before = starts - torch.cat([starts.new_zeros(1), ends[:-1]])
        return (*grid, *before.tolist(), int(is_embed.numel() - (ends[-1] if len(ends) else 0)))

    def clip_layout(self, num_tokens: int, num_frames: int, grid: tuple[int, ...] | None,
                    clip: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_clip_tokens(num_tokens, num_frames)
        groups, rows, cols, *runs = grid if grid is not None and len(grid) > 3 else (0, 0, 0)
        outer = num_tokens - groups * rows * cols - sum(runs)  # the clip's own vision_start/vision_end
        if (not groups or len(runs) != groups + 1 or outer not in (0, 2)
                or groups != math.ceil(num_frames / self.temporal_patch)):
            raise ValueError(f"{num_tokens} clip tokens for {num_frames} frames on the Qwen3-VL layout {grid}")
        runs[0], runs[-1] = runs[0] + outer // 2, runs[-1] + outer // 2
        y, x = (a.reshape(-1) for a in torch.meshgrid(torch.arange(rows, device=device),
                                                      torch.arange(cols, device=device), indexing="ij"))
        text = torch.tensor([clip, TEXT_GROUP, 0, 0], device=device)
        offsets, records = [], []
        for g in range(groups):  # a group's tokens, its timestamp included, belong to its last frame
            frame = min((g + 1) * self.temporal_patch - 1, num_frames - 1)
            offsets.append(torch.full((runs[g] + rows * cols,), frame, device=device))
            records += [text.expand(runs[g], 4), torch.stack([torch.full_like(y, clip), torch.full_like(y, g), y, x], 1)]
        offsets.append(torch.full((runs[-1],), num_frames - 1, device=device))
        records.append(text.expand(runs[-1], 4))
        return torch.cat(offsets), torch.cat(records)

    def temporal_stride(self, fps: float | None) -> float:
        return 1.0  # each group is a run of its own: the stride never applies


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)


def supported_architectures() -> list[str]:
    return [arch for adapter in ADAPTERS for arch in adapter.hf_architectures]


def adapter_class(architectures: list[str] | None) -> type[ModelAdapter]:
    """The adapter of a checkpoint's (or a LiveVLM engine's) architectures; refuses any other model."""
    for adapter in ADAPTERS:
        if set(architectures or ()) & {*adapter.hf_architectures, adapter.livevlm_architecture}:
            return adapter
    raise UnsupportedModel(f"LiveVLM does not support the architecture {list(architectures or [])}; supported: "
                           f"{', '.join(supported_architectures())}")


def adapter_for(hf_config: Any, model_dir: str | None = None, architectures: list[str] | None = None) -> ModelAdapter:
    """The adapter instance of a loaded HF config (`architectures` overrides the config's own)."""
    return adapter_class(architectures or getattr(hf_config, "architectures", None))(hf_config, model_dir)


def adapter_for_model(model: str) -> ModelAdapter:
    """The adapter of a checkpoint (directory or hub name), from its config.json."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model)
    return adapter_for(hf_config, model if os.path.isdir(model) else None)


def shorter_side_at(side: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, so the shorter side is at most `side`."""
    scale = min(1.0, side / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _video_feature(mm_features: list[Any]) -> Any:
    """A request's video item feature (one per clip request), or None."""
    return next((f for f in mm_features if f.modality == "video" and f.data is not None), None)


def _video_max_pixels(model: str | None) -> int | None:
    """The most pixels the checkpoint's video processor resizes to (per frame, or per clip on Qwen3-VL), if
    its config says: the files transformers reads, in its order (a video processor config, the processor
    config's, else the image processor config it falls back to), `max_pixels` before `size.longest_edge`
    (as its processors apply them); a hub id reads them from the hub cache."""
    for name, key in (("video_preprocessor_config.json", None), ("processor_config.json", "video_processor"),
                      ("preprocessor_config.json", None)):
        path = _config_file(model, name)
        if path is None:
            continue
        with open(path) as f:
            data = json.load(f)
        data = data.get(key) or {} if key else data
        pixels = data.get("max_pixels") or (data.get("size") or {}).get("longest_edge")
        if pixels:
            return int(pixels)
    return None


def _config_file(model: str | None, name: str) -> str | None:
    if not model:
        return None
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.exists(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, name)
    except Exception:  # not a repo id
        return None
    return path if isinstance(path, str) else None
