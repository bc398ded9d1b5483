"""Tensor-parallel consistency: with 2 TP ranks (vLLM's own TP group, gloo on CPU), each holding the scores
and keys of its own KV heads, Vision Sink Bucketing keeps the same long-term tokens on both ranks and a
question retrieves the same pages, equal to one process that sees every head.

Values are small dyadic numbers, so sums are exact whatever the summation order: a difference can only
come from a missing or wrong all-reduce, never from rounding.
"""

from __future__ import annotations

import socket
import types

import pytest
import torch
import torch.multiprocessing as mp

from vllm_livevlm.config import LiveVLMConfig

WORLD = 2
LAYERS, KV_HEADS, Q_PER_KV, DIM = 2, 4, 2, 8
TOKENS_PER_FRAME, CLIP_FRAMES, CLIPS = 8, 4, 6
QUESTION_TOKENS = 4
CONFIG = {"clip_frames": CLIP_FRAMES, "short_term_frames": 1, "long_term_budget_tokens": 32, "page_tokens": 8,
          "retrieve_ratio": 0.5, "score_fraction": 0.5}


def _dyadic(generator: torch.Generator, shape: tuple[int, ...], low: int, high: int, scale: float) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator).float() * scale


def _inputs():
    """Sinks, clips (keys, values, frames, scores over all KV heads) and the question's raw queries."""
    g = torch.Generator().manual_seed(0)
    sinks = _dyadic(g, (LAYERS, 3, KV_HEADS, DIM), -4, 5, 1.0)
    clips = []
    tokens = CLIP_FRAMES * TOKENS_PER_FRAME + 1  # a clip's frames, then the newline token
    for _ in range(CLIPS):
        k = _dyadic(g, (LAYERS, tokens, KV_HEADS, DIM), -4, 5, 1.0)
        v = _dyadic(g, (LAYERS, tokens, KV_HEADS, DIM), -4, 5, 1.0)
        clips.append((k, v))
    query = _dyadic(g, (QUESTION_TOKENS, KV_HEADS * Q_PER_KV * DIM), -4, 5, 1.0)
    return sinks, clips, query


def _ingest(heads: slice, reduce, scores_seed: int = 1):
    """The stream's memory after all clips, from the keys and scores of KV heads `heads` only."""
    from vllm_livevlm.memory.stream import ClipKV, StreamMemory

    sinks, clips, _ = _inputs()
    g = torch.Generator().manual_seed(scores_seed)
    memory = StreamMemory.from_sinks(LiveVLMConfig.from_dict(CONFIG), sinks[:, :, heads], sinks[:, :, heads])
    for index, (k, v) in enumerate(clips):
        tokens = k.shape[1]
        frames = CLIP_FRAMES * index + torch.clamp(torch.arange(tokens) // TOKENS_PER_FRAME, max=CLIP_FRAMES - 1)
        scored = memory.num_ltm + memory.num_stm + tokens  # encode_context "all": LTM, STM, then the clip
        # Drawn for every head (the same stream of numbers on every rank), then the rank's heads kept.
        scores = _dyadic(g, (LAYERS, scored, KV_HEADS), 0, 64, 1 / 64)[:, :, heads]
        memory = memory.commit_clip(ClipKV(k[:, :, heads], v[:, :, heads], frames, scores), reduce)
    return memory


def _retrieve(memory, heads: slice) -> dict[int, list[int]]:
    """Pages read per layer by the real `StepRequests._retrieve`, given the query heads of KV heads `heads`."""
    from vllm_livevlm.connector.step import StepRequests, _Active

    _, _, query = _inputs()
    q_heads = slice(heads.start * Q_PER_KV * DIM, heads.stop * Q_PER_KV * DIM)
    local_kv = heads.stop - heads.start
    attn = types.SimpleNamespace(num_heads=local_kv * Q_PER_KV, num_kv_heads=local_kv, head_size=DIM)
    slots = types.SimpleNamespace(num_computed=0, num_scheduled=QUESTION_TOKENS, num_prompt=QUESTION_TOKENS)
    active = _Active(slots=slots, rows=slice(0, QUESTION_TOKENS), memory=memory, fill_context=True)
    step = StepRequests.__new__(StepRequests)
    assert not memory.page_layout.reads_everything  # a real choice among pages
    for layer in range(LAYERS):
        step._retrieve(active, memory, layer, attn, query[:, q_heads])
    return {layer: pages.tolist() for layer, pages in active.retrieved.items()}


def _rank(rank: int, port: int, out_dir: str) -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (get_tensor_model_parallel_world_size, init_distributed_environment,
                                  initialize_model_parallel)

    from vllm_livevlm.connector.step import _sum_over_ranks
    from vllm_livevlm.memory import retrieval

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=WORLD, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=WORLD)
        assert get_tensor_model_parallel_world_size() == WORLD
        per_rank = KV_HEADS // WORLD
        heads = slice(rank * per_rank, (rank + 1) * per_rank)
        memory = _ingest(heads, _sum_over_ranks)  # the path a clip commit takes in step.py
        _, _, query = _inputs()
        local_query = retrieval.average_query(query.view(QUESTION_TOKENS, KV_HEADS, Q_PER_KV, DIM)[:, heads]
                                              .reshape(QUESTION_TOKENS, -1, DIM), per_rank)
        local_only_pages = {layer: retrieval.top_pages(retrieval.page_scores(local_query, memory.ltm_summary[layer]),
                                                       memory.page_layout.full_pages_read).tolist()
                            for layer in range(LAYERS)}
        torch.save({"ltm_ids": memory.ltm_ids, "ltm_frames": memory.ltm_frames,
                    "retrieved": _retrieve(memory, heads), "local_only_pages": local_only_pages,
                    "local_only_ltm_ids": _ingest(heads, lambda x: x).ltm_ids},
                   f"{out_dir}/rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_ranks_keep_identical_tokens_equal_to_one_process(ranks):
    from vllm_livevlm.memory import retrieval

    reference = _ingest(slice(0, KV_HEADS), lambda x: x)
    assert reference.num_ltm == CONFIG["long_term_budget_tokens"]  # VSB did compress
    for result in ranks:
        # Per-layer selection: every KV head of a rank holds the same tokens, equal to the one-process set.
        assert torch.equal(result["ltm_ids"], reference.ltm_ids[:, :result["ltm_ids"].shape[1]])
        assert torch.equal(result["ltm_frames"], reference.ltm_frames[:, :result["ltm_frames"].shape[1]])
    # Without the all-reduce a rank would keep other tokens: the test can tell.
    assert any(not torch.equal(r["local_only_ltm_ids"], r["ltm_ids"]) for r in ranks)

    _, _, query = _inputs()
    expected = {}
    for layer in range(LAYERS):
        full_query = retrieval.average_query(query.view(QUESTION_TOKENS, KV_HEADS * Q_PER_KV, DIM), KV_HEADS)
        scores = retrieval.page_scores(full_query, reference.ltm_summary[layer])
        expected[layer] = retrieval.top_pages(scores, reference.page_layout.full_pages_read).tolist()
    assert ranks[0]["retrieved"] == ranks[1]["retrieved"] == expected
    assert any(r["local_only_pages"] != expected for r in ranks)
