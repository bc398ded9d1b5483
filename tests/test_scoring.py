"""Vision-to-vision scores from a real clip prefill (in-process vLLM engine) match a direct softmax over the
queries and keys the attention layer captured, and are what the stream memory stores."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import torch

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


def test_clip_scores_match_direct_softmax(llm, monkeypatch):
    from vllm import SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    calls = []
    real = step_module.vision_scores

    def spy(clip_q, clip_k, context_k, num_queries, scale):
        out = real(clip_q, clip_k, context_k, num_queries, scale)
        calls.append((clip_q.clone(), clip_k.clone(), context_k.clone(), num_queries, scale, out))
        return out

    monkeypatch.setattr(step_module, "vision_scores", spy)
    tok = llm.get_tokenizer()
    stream_id = uuid.uuid4().hex
    config = LiveVLMConfig(clip_frames=2, score_queries=150, long_term_budget_tokens=None, short_term_frames=1)
    llm.collective_rpc("livevlm_open_stream", args=(stream_id, config.to_dict()))
    one = SamplingParams(max_tokens=1, temperature=0.0)

    def run(prompt, params, req_id):
        sp = one.clone()
        params = dataclasses.replace(params, request_id=req_id)
        sp.extra_args = {"kv_transfer_params": params.to_kv_transfer_params()}
        llm.llm_engine.add_request(req_id, prompt, sp)
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
        if params.kind != RequestKind.SINKS:
            llm.collective_rpc("livevlm_release", args=([req_id],))

    run({"prompt_token_ids": tok.encode("<|im_start|>user\n", add_special_tokens=False)},
        LiveVLMParams(stream_id, RequestKind.SINKS), "sinks")
    video = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    ph, vid = tok.pad_token_id, tok.convert_tokens_to_ids("<video>")
    for clip in range(2):
        req_id = f"clip{clip}"
        snap = llm.collective_rpc("livevlm_prepare", args=(stream_id, "clip", req_id))[0]
        params = LiveVLMParams(stream_id, RequestKind.CLIP, snap["version"], snap["context_tokens"], 2 * clip, 2)
        run({"prompt_token_ids": [ph] * params.context_tokens + [vid],
             "multi_modal_data": {"video": video[2 * clip: 2 * clip + 2]}}, params, req_id)

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
