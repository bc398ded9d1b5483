"""An independent plain-PyTorch LiveVLM on the Hugging Face transformers Qwen2.5-VL model.

The Qwen2.5-VL twin of `livevlm_reference.py` (whose algorithm it inherits): it shares no code with
`vllm_livevlm`, imports no vLLM, and writes its own multi-axis RoPE (temporal, height, width), placing
contexts by the rule of `docs/positions.md`.

Conventions it shares with the plugin (`vllm_livevlm.model.adapter`), besides those of the LLaVA reference:
a clip's tokens are `<|vision_start|>`, its video tokens (temporal group by group, row-major on the merged
grid), `<|vision_end|>`; a temporal group's tokens belong to its last frame, `<|vision_start|>` to the first
frame and `<|vision_end|>` to the last; the stream declares its `sample_fps` (1 by default, 2 when null) as
the videos' fps, so the temporal stride is `temporal_patch_size / fps * tokens_per_second` (the quotient a
float32, as in vLLM);
the clip's score queries exclude `<|vision_end|>` (its last token). Selection is per layer (one position
per slot in every head).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from reference.livevlm_reference import LayerMemory, ReferenceLiveVLM

TEXT = -1  # the temporal group of a clip's text tokens


def temporal_stride(vision_config, fps: float) -> float:
    """Temporal positions per temporal group of a video declared at `fps`."""
    seconds = torch.tensor(vision_config.temporal_patch_size / fps, dtype=torch.float32).item()
    return seconds * vision_config.tokens_per_second


def grid_positions(grid: tuple[int, int, int], stride: float) -> torch.Tensor:
    """Offsets [3, groups * rows * columns] of a video item's tokens from its base: (floor(g * stride), y, x)."""
    g, y, x = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([torch.floor(g.flatten().double() * stride).long(), y.flatten(), x.flatten()])


def vanilla_positions(input_ids: list[int], video_token_id: int, grids: list[tuple[int, int, int]],
                      stride: float) -> torch.Tensor:
    """Position triples [3, n] of a whole prompt as vanilla Qwen2.5-VL numbers them: text at (c, c, c); the
    video item whose first token follows position c-1 at c + `grid_positions` of its merged (groups, rows,
    columns) grid; the next text token at 1 + the largest coordinate used so far.

    transformers 5.19's `get_rope_index` continues text after a video at c + max(rows, columns) instead
    (it ignores the temporal extent), so the reference does not use it."""
    columns: list[torch.Tensor] = []
    grid_iter = iter(grids)
    cursor, i = 0, 0
    while i < len(input_ids):
        if input_ids[i] != video_token_id:
            columns.append(torch.full((3, 1), cursor))
            cursor, i = cursor + 1, i + 1
            continue
        item = grid_positions(next(grid_iter), stride) + cursor
        columns.append(item)
        cursor, i = int(item.max()) + 1, i + item.shape[1]
    return torch.cat(columns, dim=1)


@torch.no_grad()
def transformers_greedy(model, inputs: dict, fps: float, tokens: int) -> list[int]:
    """Vanilla greedy decoding of a processed prompt (`inputs`: its videos at `fps`) by the transformers model,
    with `vanilla_positions` given explicitly; decoding continues at 1 + the prompt's largest position."""
    merge = model.config.vision_config.spatial_merge_size
    grids = [(t, h // merge, w // merge) for t, h, w in inputs["video_grid_thw"].tolist()]
    positions = vanilla_positions(inputs["input_ids"][0].tolist(), model.config.video_token_id, grids,
                                  temporal_stride(model.config.vision_config, fps))
    out = model(**inputs, position_ids=positions[:, None, :], use_cache=True)
    answer, next_position = [], int(positions.max()) + 1
    for step in range(tokens):
        answer.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[answer[-1]]]), position_ids=torch.full((3, 1, 1), next_position + step),
                    past_key_values=out.past_key_values, use_cache=True)
    return answer


class ReferenceQwen25VL(ReferenceLiveVLM):
    """LiveVLM on Qwen2.5-VL: every stored token keeps (clip, group, row, column), contexts are placed by the
    multi-axis rule and right-aligned to the request's extent E."""

    model_class = Qwen2_5_VLForConditionalGeneration

    def __init__(self, model_dir: str, config: dict):
        if config.get("per_head_selection"):
            raise NotImplementedError("multi-axis positions are per slot: selection per layer only")
        super().__init__(model_dir, config)
        text, vision = self.model.config.text_config, self.model.config.vision_config
        section = text.rope_parameters["mrope_section"]  # frequencies per axis (t, h, w), low to high
        self.axis_of = torch.cat([torch.full((n,), axis) for axis, n in enumerate(section)])
        self.merge = vision.spatial_merge_size
        self.group_frames = vision.temporal_patch_size
        fps = config.get("sample_fps", 1.0)
        self.stride = temporal_stride(vision, fps if fps is not None else 2.0)
        self.records: dict[int, tuple[int, int, int, int]] = {}  # stream token id -> (clip, group, row, col)
        self.grid = (0, 0, 0)
        self.clips = 0

    # ---- multi-axis RoPE ----------------------------------------------------------------------------------
    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Frequency i of a token rotates by its coordinate on axis `axis_of[i]` (positions [3, n])."""
        return positions.float()[self.axis_of].T * self.inv_freq[None, :]

    def text_positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n).expand(3, n)

    def clip_positions(self, start: int, n: int) -> torch.Tensor:
        """Vanilla's positions of `<|vision_start|>` video `<|vision_end|>` after position start - 1."""
        video = grid_positions(self.grid, self.stride) + start + 1
        end = self.text_positions(int(video.max()) + 1, 1)
        return torch.cat([self.text_positions(start, 1), video, end], dim=1)

    def _walk(self, context: LayerMemory) -> tuple[torch.Tensor, int]:
        """Positions [3, len] of a context placed from 0 and its extent X: sinks and text tokens take one
        position each; a run (consecutive video tokens of one clip) starts at the cursor, its groups
        renumbered 0, 1, ... in order, rows and columns kept; the cursor stays past every coordinate used."""
        sinks = len(self.sinks[0])
        columns = [self.text_positions(0, sinks)]
        cursor, run_clip, base, groups = sinks, None, 0, []
        for slot in range(sinks, len(context)):
            clip, group, y, x = self.records[context.ids[slot][0]]
            if group == TEXT:
                columns.append(self.text_positions(cursor, 1))
                cursor, run_clip = cursor + 1, None
                continue
            if clip != run_clip:
                run_clip, base, groups = clip, cursor, []
            if group not in groups:
                groups.append(group)
            t = base + math.floor(groups.index(group) * self.stride)
            columns.append(torch.tensor([[t], [base + y], [base + x]]))
            cursor = max(cursor, t + 1, base + y + 1, base + x + 1)
        return torch.cat(columns, dim=1), cursor

    def extent(self, contexts: list[LayerMemory]) -> int:
        return max(self._walk(context)[1] for context in contexts)

    def place(self, context: LayerMemory, extent: int) -> tuple[torch.Tensor, int]:
        positions, end = self._walk(context)
        positions[:, len(self.sinks[0]):] += extent - end  # right-aligned: the context ends at E - 1
        return positions, extent

    # ---- clips ----------------------------------------------------------------------------------------------
    def encode_clip(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        out = self.processor.video_processor(videos=[frames], return_tensors="pt")
        groups, rows, cols = out["video_grid_thw"][0].tolist()
        self.grid = (groups, rows // self.merge, cols // self.merge)
        video = self.model.model.get_video_features(out["pixel_values_videos"].float(),
                                                    out["video_grid_thw"]).pooler_output[0]
        start, end = self.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
        hidden = torch.cat([self.embed_tokens([start]), video, self.embed_tokens([end])])
        records = [(self.clips, TEXT, 0, 0)]
        offsets = [0]
        for g in range(self.grid[0]):
            for y in range(self.grid[1]):
                for x in range(self.grid[2]):
                    records.append((self.clips, g, y, x))
                    offsets.append(min((g + 1) * self.group_frames - 1, len(frames) - 1))
        records.append((self.clips, TEXT, 0, 0))
        offsets.append(len(frames) - 1)
        self.records.update({self.tokens_seen + i: record for i, record in enumerate(records)})
        self.clips += 1
        return hidden, offsets
