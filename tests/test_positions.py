"""The multi-axis placement rule (`docs/positions.md`) against vLLM's own Qwen2.5-VL positions
(`get_mrope_input_positions`, called on vLLM's class, no engine), and the model-adapter registry."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vllm_livevlm.memory.positions import place, placement_extent
from vllm_livevlm.model.adapter import Qwen2_5_VLAdapter, Qwen3VLAdapter, UnsupportedModel, adapter_class

SINKS = 3
QUESTION = 5
VIDEO_PAD = 7  # any id: vLLM's positions depend on the features' offsets, not on the ids
VISION = SimpleNamespace(spatial_merge_size=2, tokens_per_second=2, temporal_patch_size=2, patch_size=14)
ADAPTER = Qwen2_5_VLAdapter.__new__(Qwen2_5_VLAdapter)
ADAPTER.hf_config, ADAPTER.temporal_patch, ADAPTER.tokens_per_second = SimpleNamespace(vision_config=VISION), 2, 2
ADAPTER.group_tokens = 768  # Qwen2.5-VL's default bound per temporal group (768 x 28 x 28 pixels)
# (frames, merged rows, merged columns) of each clip: a flushed 3-frame and a 1-frame clip, a wide grid.
CLIPS = [(4, 4, 4), (3, 4, 4), (1, 4, 4), (6, 2, 5)]


def vanilla_positions(clips: list[tuple[int, int, int]], fps: float, leading_text: int = SINKS) -> torch.Tensor:
    """vLLM's positions for `leading_text` text tokens + one video item per clip + the question turn."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Qwen

    tokens, features = [0] * leading_text, []
    seconds = torch.tensor(2 / fps, dtype=torch.float32)  # what the HF processor computes (temporal patch / fps)
    for frames, rows, cols in clips:
        groups = -(-frames // 2)
        grid = torch.tensor([groups, rows * 2, cols * 2])
        features.append(SimpleNamespace(modality="video", mm_position=SimpleNamespace(offset=len(tokens) + 1),
                                        data={"video_grid_thw": SimpleNamespace(data=grid),
                                              "second_per_grid_ts": SimpleNamespace(data=seconds)}))
        tokens += [1] + [VIDEO_PAD] * (groups * rows * cols) + [2]
    tokens += [0] * QUESTION
    model = SimpleNamespace(config=SimpleNamespace(vision_config=VISION))
    model.iter_mm_grid_thw = lambda f: Qwen.iter_mm_grid_thw(model, f)
    positions, delta = Qwen.get_mrope_input_positions(model, tokens, features)
    assert delta == positions.max() + 1 - len(tokens)
    return positions


def records(clips: list[tuple[int, int, int]], first_clip: int = 0) -> torch.Tensor:
    """Position records of the clips' tokens, as the connector stores them (`ModelAdapter.clip_layout`)."""
    parts = []
    for i, (frames, rows, cols) in enumerate(clips):
        groups = -(-frames // 2)
        _, rec = ADAPTER.clip_layout(groups * rows * cols + 2, frames, (groups, rows, cols), first_clip + i,
                                     torch.device("cpu"))
        parts.append(rec)
    return torch.cat(parts)


@pytest.mark.parametrize("fps", [2.0, 1.0, 3.0, 0.5])
def test_lossless_placement_is_vanillas(fps):
    """Nothing dropped: the rule gives every context token vanilla's position, and the extent is where
    vanilla starts the question."""
    stride = ADAPTER.temporal_stride(fps)
    vanilla = vanilla_positions(CLIPS, fps)
    rec = records(CLIPS)
    extent = placement_extent(rec, SINKS, stride)
    assert torch.equal(place(rec, SINKS, stride, extent), vanilla[:, :SINKS + rec.shape[0]])
    assert extent == int(vanilla[0, SINKS + rec.shape[0]])
    # The tiny model's example in docs/positions.md.
    assert placement_extent(records(CLIPS[:1]), SINKS, ADAPTER.temporal_stride(2.0)) == 9


def test_a_requests_own_tokens_follow_its_context_as_vanilla(monkeypatch):
    """`place_after_context` (the `_init_mrope_positions` patch): a clip request `[P placeholders] + clip`
    gets, after the shift by E - P, exactly the positions vanilla gives that clip after the earlier ones."""
    from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
    from vllm_livevlm.model.mrope import place_after_context

    monkeypatch.setenv("LIVEVLM_REQUEST_SECRET", "test-secret")
    context, clip = CLIPS[:3], CLIPS[3]
    rec = records(context)
    extent, slots = placement_extent(rec, SINKS, 2.0), SINKS + rec.shape[0]
    params = LiveVLMParams("s", RequestKind.CLIP, 2, slots, 8, clip[0], "r", context_extent=extent)
    own = vanilla_positions([clip], 2.0, leading_text=slots)  # what vLLM computes for the clip request
    signed = {"kv_transfer_params": params.to_kv_transfer_params()}
    state = SimpleNamespace(mrope_positions=own.clone(), mrope_position_delta=int(own.max()) + 1 - own.shape[1],
                            sampling_params=SimpleNamespace(extra_args=signed))
    place_after_context(state)
    full = vanilla_positions(CLIPS, 2.0)  # P = the context's token count: both prompts have equal lengths
    assert torch.equal(state.mrope_positions[:, slots:], full[:, slots:])
    assert state.mrope_position_delta == int(full.max()) + 1 - full.shape[1]  # decoding continues alike
    # A forged signature keeps vLLM's positions.
    forged = params.to_kv_transfer_params(b"another secret")
    state = SimpleNamespace(mrope_positions=own.clone(), mrope_position_delta=0,
                            sampling_params=SimpleNamespace(extra_args={"kv_transfer_params": forged}))
    place_after_context(state)
    assert torch.equal(state.mrope_positions, own) and state.mrope_position_delta == 0


def test_dropped_groups_take_no_room_and_rows_and_columns_are_kept():
    """Compaction: a clip whose group 0 was dropped places its group 1 where group 0 would be (t), at its own
    rows and columns (h, w); with one token per group, E exceeds the slot count P."""
    rec = records([(4, 4, 4)])
    kept = rec[17:]  # group 1 (16 tokens) and vision_end
    positions = place(kept, SINKS, 2.0, placement_extent(kept, SINKS, 2.0))
    assert positions[0, SINKS:SINKS + 16].tolist() == [3] * 16            # j = 0: the run's base
    assert positions[1, SINKS:SINKS + 16].tolist() == [3 + y for y in range(4) for _ in range(4)]
    assert positions[2, SINKS:SINKS + 16].tolist() == [3 + x for _ in range(4) for x in range(4)]
    assert positions[:, -1].tolist() == [7, 7, 7]                          # vision_end after the largest
    sparse = records([(8, 1, 1)])[1:-1]  # one token in each of 4 groups, at stride 4 (1 fps)
    assert placement_extent(sparse, SINKS, 4.0) == SINKS + 13 > SINKS + sparse.shape[0]


def test_right_aligned_when_the_request_spans_more():
    """A layer that needs X < E positions ends at E - 1: sinks stay at 0..S-1, the rest moves by E - X."""
    rec = records(CLIPS[:2])
    extent = placement_extent(rec, SINKS, 2.0)
    aligned = place(rec, SINKS, 2.0, extent + 7)
    exact = place(rec, SINKS, 2.0, extent)
    assert torch.equal(aligned[:, :SINKS], exact[:, :SINKS])
    assert torch.equal(aligned[:, SINKS:], exact[:, SINKS:] + 7)
    assert int(aligned.max()) == extent + 6


def test_a_subset_never_needs_more_room_than_the_whole():
    """Retrieval reads a subset of the whole context, placed within the whole's extent E."""
    rec = records(CLIPS * 3, 0)
    whole = placement_extent(rec, SINKS, 2.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        keep = torch.rand(rec.shape[0], generator=generator) < torch.rand(1, generator=generator)
        assert placement_extent(rec[keep], SINKS, 2.0) <= whole


def test_unsupported_architectures_are_refused_with_the_supported_list(tmp_path):
    from vllm_livevlm.config import LiveVLMConfig
    from vllm_livevlm.streams import engine_args_for

    with pytest.raises(UnsupportedModel) as refused:
        adapter_class(["GPT2LMHeadModel"])
    assert str(refused.value) == ("LiveVLM does not support the architecture ['GPT2LMHeadModel']; supported: "
                                  "LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
                                  "Qwen3VLForConditionalGeneration")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModel, match="supported: LlavaOnevisionForConditionalGeneration, Qwen2_5_VL"):
        engine_args_for(str(tmp_path), LiveVLMConfig(), 196)
    assert adapter_class(["LiveVLMQwen2_5_VLForConditionalGeneration"]) is Qwen2_5_VLAdapter
    assert adapter_class(["LiveVLMQwen3VLForConditionalGeneration"]) is Qwen3VLAdapter


def test_a_context_spanning_the_models_length_is_refused_and_decoding_fits_what_is_left():
    from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
    from vllm_livevlm.streams import StreamEngine

    engine = SimpleNamespace(engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=100)))
    question = LiveVLMParams("s", RequestKind.QUESTION, 2, 40, context_extent=90)
    assert StreamEngine.positions_left(engine, question, 9) == 1
    with pytest.raises(ValueError, match="spans 90 positions; with 10 more tokens it exceeds the model's length 100"):
        StreamEngine.positions_left(engine, question, 10)
    assert StreamEngine.positions_left(engine, LiveVLMParams("s", RequestKind.QUESTION, 2, 40), 99) is None  # 1-D


def test_serve_refuses_an_unsupported_checkpoint_before_starting_vllm(tmp_path, capsys):
    from vllm_livevlm.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(SystemExit) as exited:
        main(["serve", str(tmp_path)])
    assert exited.value.code == 2
    assert ("error: LiveVLM does not support the architecture ['GPT2LMHeadModel']; supported: "
            "LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
            "Qwen3VLForConditionalGeneration") in capsys.readouterr().err


QWEN3 = Qwen3VLAdapter.__new__(Qwen3VLAdapter)
QWEN3.hf_config, QWEN3.temporal_patch = SimpleNamespace(vision_config=VISION), 2
QWEN3.group_tokens = 768


def qwen3_clip(frames: int, rows: int, cols: int, stamps: list[int], offset: int) -> tuple[list[int], object]:
    """A Qwen3-VL clip's tokens as vLLM expands them (outer vision_start; per temporal group `stamps[g]`
    timestamp tokens, vision_start, video tokens, vision_end; outer vision_end) and its video feature
    (placeholder at `offset` + 1, with vLLM's mask of embedding positions)."""
    inner = []
    for n in stamps:
        inner += [3] * n + [1] + [VIDEO_PAD] * (rows * cols) + [2]
    grid = torch.tensor([-(-frames // 2), rows * 2, cols * 2])
    feature = SimpleNamespace(modality="video", data={"video_grid_thw": SimpleNamespace(data=grid)},
                              mm_position=SimpleNamespace(offset=offset + 1,
                                                          is_embed=torch.tensor(inner) == VIDEO_PAD))
    return [1] + inner + [2], feature


def test_qwen3_vl_lossless_placement_is_vanillas():
    """Timestamps of different lengths before each group: the clips' layouts (read off vLLM's mask) placed
    by the rule give vanilla's Qwen3-VL positions, and the extent is where vanilla starts the question."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration as Qwen3

    tokens, features, parts = [0] * SINKS, [], []
    for i, (frames, rows, cols, stamps) in enumerate([(4, 4, 4, [7, 8]), (3, 2, 5, [8, 9]), (1, 4, 4, [9])]):
        clip, feature = qwen3_clip(frames, rows, cols, stamps, len(tokens))
        parts.append(QWEN3.clip_layout(len(clip), frames, QWEN3.video_grid([feature]), i, torch.device("cpu"))[1])
        tokens, features = tokens + clip, features + [feature]
    config = SimpleNamespace(video_token_id=VIDEO_PAD, vision_start_token_id=1, vision_end_token_id=2,
                             vision_config=VISION)
    vanilla, _ = Qwen3._get_mrope_input_positions(tokens + [0] * QUESTION, features, config)
    rec = torch.cat(parts)
    assert rec.shape[0] == len(tokens) - SINKS
    assert (rec[:, 1] >= 0).sum() == 16 * 2 + 10 * 2 + 16  # video tokens; timestamps and markers are text
    extent = placement_extent(rec, SINKS, QWEN3.temporal_stride(1.0))
    assert torch.equal(place(rec, SINKS, QWEN3.temporal_stride(1.0), extent), vanilla[:, :len(tokens)])
    assert extent == int(vanilla[0, len(tokens)])


def test_a_qwen3_vl_clip_that_does_not_fit_its_layout_is_refused():
    clip, feature = qwen3_clip(4, 4, 4, [7, 8], SINKS)
    grid = QWEN3.video_grid([feature])
    assert grid == (2, 4, 4, 8, 10, 1)  # text runs: 7 + vs; ve + 8 + vs; ve (the outer markers are not in it)
    for num_tokens, frames, bad_grid in ((len(clip) + 1, 4, grid), (len(clip), 6, grid), (len(clip), 4, grid[:3]),
                                         (len(clip), 4, None)):
        with pytest.raises(ValueError, match="on the Qwen3-VL layout"):
            QWEN3.clip_layout(num_tokens, frames, bad_grid, 0, torch.device("cpu"))


# ---- what a frame costs on Qwen: the front end shrinks it to the tokens the memory counts --------------
WIDE_AND_ODD = [(181, 4096), (4096, 181), (42, 298), (1080, 1920), (720, 1280), (10, 10), (113, 4000), (3000, 2999)]


def _qwen25_tokens(adapter, height: int, width: int) -> int:
    """Tokens per temporal group by transformers' own Qwen2.5-VL resize (independent of the adapter)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=adapter.unit, min_pixels=adapter.unit ** 2,
                        max_pixels=2 ** 40)  # the frame as it comes: no cap, what its shape alone costs
    return (h // adapter.unit) * (w // adapter.unit)


def _qwen3_tokens(model_dir: str, frames: int, height: int, width: int) -> int:
    """Tokens per temporal group by transformers' Qwen3-VL video resize with the checkpoint's own limits."""
    from transformers import AutoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    video = AutoProcessor.from_pretrained(model_dir).video_processor
    unit = video.patch_size * video.merge_size
    h, w = smart_resize(frames, height, width, temporal_factor=video.temporal_patch_size, factor=unit,
                        min_pixels=video.size["shortest_edge"], max_pixels=video.size["longest_edge"])
    return (h // unit) * (w // unit)


def test_qwen25_vl_frames_are_shrunk_to_the_tokens_the_memory_counts(tiny_qwen25vl_dir):
    """A bound on the shorter side alone let a 181 x 4096 frame cost many times the tokens per frame the
    memory bounds count; every shape now fits `group_tokens` (the processor's own rounding)."""
    from vllm_livevlm.model.adapter import adapter_for_model

    adapter = adapter_for_model(tiny_qwen25vl_dir)
    assert _qwen25_tokens(adapter, 181, 4096) > 4 * adapter.group_tokens  # what the old rule let through
    for height, width in WIDE_AND_ODD:
        short = min(height, width)
        if _qwen25_tokens(adapter, height * adapter.unit // short, width * adapter.unit // short) > adapter.group_tokens:
            with pytest.raises(ValueError, match="at any size"):  # too wide for 16 tokens even one unit high
                adapter.frame_size(height, width)
            continue
        h, w = adapter.frame_size(height, width)
        assert h <= height and w <= width and abs(h / w - height / width) <= 0.05 * height / width
        assert _qwen25_tokens(adapter, h, w) <= adapter.group_tokens, (height, width, h, w)
    assert adapter.frame_size(56, 56) == (56, 56)  # within the bound: kept as it is
    with pytest.raises(ValueError, match="differ more than 200x"):
        adapter.frame_size(10, 2010)


def test_qwen3_vl_frames_are_shrunk_to_the_tokens_the_memory_counts(tiny_qwen3vl_dir):
    from vllm_livevlm.model.adapter import adapter_for_model

    adapter = adapter_for_model(tiny_qwen3vl_dir)
    assert _qwen3_tokens(tiny_qwen3vl_dir, 4, 181, 4096) > 4 * adapter.group_tokens
    for height, width in WIDE_AND_ODD:
        short = min(height, width)
        if _qwen3_tokens(tiny_qwen3vl_dir, 4, height * adapter.unit // short, width * adapter.unit // short) \
                > adapter.group_tokens:
            with pytest.raises(ValueError, match="at any size"):
                adapter.frame_size(height, width)
            continue
        h, w = adapter.frame_size(height, width)
        assert _qwen3_tokens(tiny_qwen3vl_dir, 4, h, w) <= adapter.group_tokens, (height, width, h, w)


def test_a_qwen_clip_costing_more_tokens_than_counted_is_refused(tiny_qwen25vl_dir):
    """Frames that reach the engine unshrunk (or a processor configured otherwise) fail their clip before
    it is kept, instead of growing the memory past what admission reserved."""
    from vllm_livevlm.model.adapter import adapter_for_model

    adapter = adapter_for_model(tiny_qwen25vl_dir)
    rows = adapter.group_tokens // 2 + 1  # a 2-row grid, one token over the bound per group
    grid = (2, 2, rows)
    with pytest.raises(ValueError, match="over the .* the stream's memory bound counts"):
        adapter.clip_layout(2 * 2 * rows + 2, 4, grid, 0, torch.device("cpu"))
    ok = (2, 2, adapter.group_tokens // 2)
    assert adapter.clip_layout(2 * ok[1] * ok[2] + 2, 4, ok, 0, torch.device("cpu"))[0].numel() == 2 * ok[1] * ok[2] + 2


def test_uploads_to_a_qwen_server_are_kept_at_the_adapters_size(tiny_qwen25vl_dir):
    """The HTTP decoder shrinks with the adapter's rule (not the shorter side), and a frame the processor
    refuses is a 400 naming it, before anything reaches the engine."""
    import cv2
    import numpy as np

    from vllm_livevlm.model.adapter import adapter_for_model
    from vllm_livevlm.serving.errors import APIError
    from vllm_livevlm.serving.media import FrameDecoder, Upload
    from vllm_livevlm.serving.service import ServerLimits

    adapter = adapter_for_model(tiny_qwen25vl_dir)
    decoder = FrameDecoder(ServerLimits(), adapter.frame_side, adapter.frame_size)

    def png(height: int, width: int) -> bytes:
        return cv2.imencode(".png", np.full((height, width, 3), 90, np.uint8))[1].tobytes()

    frames = decoder.decode_now([Upload(png(720, 1280), "f", False)]).frames
    assert frames.shape[1:3] == adapter.frame_size(720, 1280) and frames.shape[1] < adapter.frame_side
    with pytest.raises(APIError) as refused:
        decoder.decode_now([Upload(png(10, 2010), "g", False)])
    assert refused.value.status == 400 and "differ more than 200x" in str(refused.value)
