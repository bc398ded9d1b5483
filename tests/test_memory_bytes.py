"""A stream's reported bytes are the bytes it holds: every storage reachable from a snapshot (or from the
store) is counted once, and the bound `memory_bound_bytes` is never exceeded. Pure tensors, no engine."""

from __future__ import annotations

import pytest
import torch

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.params import RequestKind
from vllm_livevlm.connector.store import SessionStore
from vllm_livevlm.measure import reachable_storage_bytes  # walks the object graph: not the code under test
from vllm_livevlm.memory.budget import ModelShape, memory_bound_bytes
from vllm_livevlm.memory.stream import ClipKV, StreamMemory

SINKS = 3
# 2 layers, 2 KV heads (4 query heads), head_dim 8, 10 tokens per frame, float32 K/V.
SMALL = ModelShape(2, 2, 8, 4, 10, query_heads=4)


def _ingest(config: LiveVLMConfig, clips: int, shape: ModelShape = SMALL) -> list[StreamMemory]:
    """Every snapshot of a stream fed `clips` random clips of `config.clip_frames` frames (+ one newline)."""
    gen = torch.Generator().manual_seed(0)
    dtype = {4: torch.float32, 2: torch.bfloat16}[shape.kv_bytes]
    per_frame = shape.tokens_per_frame

    def kv(tokens: int) -> torch.Tensor:
        return torch.randn(shape.layers, tokens, shape.kv_heads, shape.head_dim, generator=gen).to(dtype)

    memory = StreamMemory.from_sinks(config, kv(SINKS), kv(SINKS))
    versions = [memory]
    for clip in range(clips):
        frames = config.clip_frames
        tokens = frames * per_frame + 1
        offsets = torch.clamp(torch.arange(tokens) // per_frame, max=frames - 1)
        scored = memory.clip_context_tokens - memory.num_sinks + tokens
        scores = torch.rand(shape.layers, scored, shape.kv_heads, generator=gen)
        memory = memory.commit_clip(ClipKV(kv(tokens), kv(tokens), clip * frames + offsets, scores))
        versions.append(memory)
    return versions


@pytest.mark.parametrize("clip_frames,per_head,encode_context", [(4, False, "all"), (1, True, "window"),
                                                                 (3, False, "window")])
def test_a_snapshot_holds_exactly_what_it_reports(clip_frames, per_head, encode_context):
    config = LiveVLMConfig(clip_frames=clip_frames, short_term_frames=2, long_term_budget_tokens=64,
                           page_tokens=16, per_head_selection=per_head, encode_context=encode_context)
    for memory in _ingest(config, 12)[1:]:
        assert reachable_storage_bytes(memory) == memory.nbytes == memory.stats()["bytes"]
        assert memory.nbytes <= memory_bound_bytes(config, SMALL, SINKS)


def test_the_bound_is_reached_exactly_when_every_short_term_frame_closes_a_clip():
    """One-frame clips: each short-term frame carries its clip's newline token, so short-term memory holds
    2 * (10 + 1) tokens here: the bound counts one newline per short-term frame, and is tight."""
    config = LiveVLMConfig(clip_frames=1, short_term_frames=2, long_term_budget_tokens=64, page_tokens=16)
    memory = _ingest(config, 12)[-1]
    assert (memory.num_ltm, memory.num_stm) == (64, 2 * (10 + 1))
    per_token_layer = 2 * 2 * 8 * 4 + 2 * 4                            # K, V (float32), one score per KV head
    expected = (2 * (SINKS * 2 * 2 * 8 * 4 + (64 + 22) * per_token_layer)
                + 2 * 2 * 64 * 16 + 22 * 16                            # token ids + frames, int64
                + 2 * (64 // 16) * 2 * 8 * 4)                          # page summaries, float32
    assert memory.nbytes == expected == memory_bound_bytes(config, SMALL, SINKS)


def test_bench_preset_shape_in_bfloat16():
    """The bench preset's KV shape (8 layers, 2 KV heads, head_dim 64, 196 tokens per frame), bf16."""
    bench = ModelShape(8, 2, 64, 2, 196, query_heads=8)
    config = LiveVLMConfig(clip_frames=16, short_term_frames=2, long_term_budget_tokens=1024, page_tokens=16)
    memory = _ingest(config, 4, bench)[-1]
    assert reachable_storage_bytes(memory) == memory.nbytes
    assert memory.nbytes <= memory_bound_bytes(config, bench, SINKS)


def test_store_counts_storages_shared_by_versions_once():
    """A question pins an old version while clips commit: versions share the sinks, so the store reports the
    distinct storages it holds, equal to what is reachable from it."""
    config = LiveVLMConfig(clip_frames=4, short_term_frames=2, long_term_budget_tokens=64, page_tokens=16)
    versions = _ingest(config, 3)
    store = SessionStore()
    store.open("s", config)
    store.commit("s", versions[0])
    store.commit("s", versions[1])
    assert store.prepare("s", RequestKind.QUESTION, "q1")["version"] == 2
    store.question_snapshot("s", 2, "q1", versions[1].question_context_tokens)  # its first step: pinned while clips commit
    store.commit("s", versions[2])
    store.commit("s", versions[3])
    held = reachable_storage_bytes(store)
    stats = store.stats("s")
    assert held == stats["bytes_all_versions"] == store.total_bytes()
    sinks = 2 * versions[1].sinks_k.untyped_storage().nbytes()
    assert stats["bytes_all_versions"] == versions[1].nbytes + versions[3].nbytes - sinks
    assert store.close("s") == stats["bytes_all_versions"]
