"""Vision-to-vision scores from a real clip prefill (in-process vLLM engine) match a direct softmax over the
queries and keys the attention layer captured, and are what the stream memory stores. On the same engine:
the bytes a stream reports are the storages the worker's store holds, and a question's hooks read the
device once, not per page."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector import step as step_module
from vllm_livevlm.connector.params import LiveVLMParams, RequestKind

pytestmark = pytest.mark.slow


def _direct_scores(clip_q, clip_k, context_k, num_queries, scale):
    """Per KV head, mean over the last vision queries and the query heads of softmax(q·k) over context keys
    and the clip's keys up to the query (causal), written as plain loops."""
    tokens, q_heads, _ = clip_q.shape
    kv_heads = clip_k.shape[1]
    group = q_heads // kv_heads
    last = tokens - 1
    first = max(last - num_queries, 0)
    n_ctx = context_k.shape[0]
    out = torch.zeros(n_ctx + tokens, kv_heads, dtype=torch.float64)
    for h in range(q_heads):
        kv = h // group
        for i in range(first, last):
            keys = torch.cat([context_k[:, kv], clip_k[: i + 1, kv]]).double()
            probs = torch.softmax(keys @ clip_q[i, h].double() * scale, dim=0)
            out[: n_ctx + i + 1, kv] += probs / ((last - first) * group)
    return out


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    from vllm_livevlm.streams import engine_args_for

    return LLM(**engine_args_for(tiny_model_dir, LiveVLMConfig(clip_frames=2), 196, dtype="float32",
                                 max_model_len=8192, seed=0))


def _request(llm, prompt: dict, params: LiveVLMParams, max_tokens: int = 1) -> dict:
    """Run one LiveVLM request to completion in this process (the engine core is in-process here, so the
    test can reach the worker's store and hooks); returns its `livevlm_release` report."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    sp.extra_args = {"kv_transfer_params": params.to_kv_transfer_params()}
    llm.llm_engine.add_request(params.request_id, prompt, sp)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    if params.kind == RequestKind.SINKS:
        return {}
    return llm.collective_rpc("livevlm_release", args=([params.request_id],))[0].get(params.request_id, {})


def _open(llm, config: LiveVLMConfig) -> str:
    stream_id = uuid.uuid4().hex
    llm.collective_rpc("livevlm_open_stream", args=(stream_id, config.to_dict()))
    prefix = llm.get_tokenizer().encode("<|im_start|>user\n", add_special_tokens=False)
    _request(llm, {"prompt_token_ids": prefix},
             LiveVLMParams(stream_id, RequestKind.SINKS, request_id=f"sinks-{stream_id}"))
    return stream_id


def _clip(llm, stream_id: str, frames: np.ndarray, frame_start: int) -> None:
    tok = llm.get_tokenizer()
    req_id = f"clip-{stream_id}-{frame_start}"
    snap = llm.collective_rpc("livevlm_prepare", args=(stream_id, "clip", req_id))[0]
    params = LiveVLMParams(stream_id, RequestKind.CLIP, snap["version"], snap["context_tokens"], frame_start,
                           len(frames), request_id=req_id)
    video = tok.convert_tokens_to_ids("<video>")
    _request(llm, {"prompt_token_ids": [tok.pad_token_id] * params.context_tokens + [video],
                   "multi_modal_data": {"video": frames}}, params)


def _ask(llm, stream_id: str, question: str, max_tokens: int) -> dict:
    tok = llm.get_tokenizer()
    req_id = f"question-{uuid.uuid4().hex}"
    snap = llm.collective_rpc("livevlm_prepare", args=(stream_id, "question", req_id))[0]
    params = LiveVLMParams(stream_id, RequestKind.QUESTION, snap["version"], snap["context_tokens"], request_id=req_id)
    turn = tok.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return _request(llm, {"prompt_token_ids": [tok.pad_token_id] * params.context_tokens + turn}, params, max_tokens)


def test_clip_scores_match_direct_softmax(llm, monkeypatch):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    calls = []
    real = step_module.vision_scores

    def spy(clip_q, clip_k, context_k, num_queries, scale):
        out = real(clip_q, clip_k, context_k, num_queries, scale)
        calls.append((clip_q.clone(), clip_k.clone(), context_k.clone(), num_queries, scale, out))
        return out

    monkeypatch.setattr(step_module, "vision_scores", spy)
    config = LiveVLMConfig(clip_frames=2, score_queries=150, long_term_budget_tokens=None, short_term_frames=1)
    stream_id = _open(llm, config)
    video = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    for clip in range(2):
        _clip(llm, stream_id, video[2 * clip: 2 * clip + 2], 2 * clip)

    layers = llm.llm_engine.model_config.hf_config.text_config.num_hidden_layers
    assert len(calls) == 2 * layers
    first_clip, second_clip = calls[:layers], calls[layers:]
    assert all(c[2].shape[0] == 0 for c in first_clip)        # nothing cached before the first clip
    assert all(c[2].shape[0] == 2 * 196 + 1 for c in second_clip)  # first clip's tokens (LTM + STM)
    for clip_q, clip_k, context_k, num_queries, scale, out in calls:
        assert num_queries == 150
        expected = _direct_scores(clip_q, clip_k, context_k, num_queries, scale)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-7)
        assert torch.allclose(out.sum(dim=0).double(), torch.ones(out.shape[1], dtype=torch.float64), atol=1e-4)

    memory = get_kv_transfer_group().store.snapshot(stream_id, 3)
    stored = torch.cat([memory.ltm_score, memory.stm_score], dim=1)  # [L, n, H], temporal order
    for layer, (*_, out) in enumerate(second_clip):
        torch.testing.assert_close(stored[layer], out)           # the latest scores replace older ones
    assert memory.num_stm == 196 + 1 and memory.num_ltm == 3 * 196 + 1  # short_term_frames=1
    llm.collective_rpc("livevlm_close_stream", args=(stream_id,))


# ---- honest memory and host reads on the same engine -----------------------------------------------------------
COMPRESSING = LiveVLMConfig(clip_frames=2, short_term_frames=2, long_term_budget_tokens=1024, page_tokens=16,
                            retrieve_ratio=0.4)


@pytest.fixture(scope="module")
def compressed_stream(llm):
    """A stream of 16 frames (8 clips): long-term memory compressed to 1,024 tokens = 64 pages."""
    stream_id = _open(llm, COMPRESSING)
    video = np.random.default_rng(4).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    for clip in range(8):
        _clip(llm, stream_id, video[2 * clip: 2 * clip + 2], 2 * clip)
    yield stream_id
    llm.collective_rpc("livevlm_close_stream", args=(stream_id,))


def test_reported_bytes_are_the_storages_the_store_holds(llm, compressed_stream):
    """Every tensor storage reachable from the worker's session store, counted independently, equals the
    stream's reported bytes (and the engine's store bytes), within the stream's bound."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from vllm_livevlm.measure import reachable_storage_bytes
    from vllm_livevlm.memory.budget import ModelShape, memory_bound_bytes

    store = get_kv_transfer_group().store
    stats = llm.collective_rpc("livevlm_stats", args=(compressed_stream,))[0]
    assert (stats["long_term_tokens"], stats["short_term_tokens"]) == (1024, 2 * 196 + 1)
    held = reachable_storage_bytes(store)
    assert held == stats["bytes"] == stats["bytes_all_versions"] == store.total_bytes()
    shape = ModelShape.of(llm.llm_engine.model_config, 196)
    assert held <= memory_bound_bytes(COMPRESSING, shape, stats["sink_tokens"])


class _HostReads(TorchFunctionMode):
    """Counts torch calls that read device values on the host (each a device-to-host sync on a GPU; on CPU
    there is no sync to see, so calls are counted) and the min/max reductions the page report used."""

    READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu", "numpy"}
    REDUCTIONS = {"min", "max", "amin", "amax"}

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.reductions = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.reads += name in self.READS
        self.reductions += name in self.REDUCTIONS
        return func(*args, **(kwargs or {}))


def test_a_question_reads_the_device_once_not_per_page(llm, compressed_stream, monkeypatch):
    """26 of 64 pages per layer: the hooks of the question's step (retrieval on every layer, the page report
    after the last one) read device values on the host once in all, and reduce a fixed number of times,
    whatever the page count (the per-page report read 2 values per page and layer)."""
    counter = _HostReads()
    layers = set()

    def counted(method):
        def hook(self, *args, **kwargs):
            if method.__name__ == "before_attention":
                layers.add(args[0])
            with counter:
                return method(self, *args, **kwargs)
        return hook

    for name in ("before_attention", "after_rotary", "commit"):
        monkeypatch.setattr(step_module.StepRequests, name, counted(getattr(step_module.StepRequests, name)))
    report = _ask(llm, compressed_stream, "what is happening in the video?", max_tokens=2)
    monkeypatch.undo()
    assert sorted(report["page_indices"]) == sorted(layers) == [0, 1]
    assert all(len(pages) == 26 for pages in report["page_indices"].values())  # ceil(0.4 * 64)
    for layer, ranges in report["pages"].items():
        assert len(ranges) == 26 and all(first <= last for first, last in ranges)
    print(f"question hooks: {counter.reads} host reads, {counter.reductions} min/max over {len(layers)} layers")
    assert counter.reads == 1
    assert counter.reductions == 2
