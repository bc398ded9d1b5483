"""Forged and malformed LiveVLM requests submitted straight to the engine (no HTTP, no middleware): each is
failed alone. The engine keeps serving and a stream opened before is unchanged (same stats, same greedy
answer). A real in-process vLLM engine (CPU, tiny model)."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from helpers import QUESTION, greedy, live_engine, random_video

from vllm_livevlm.connector.params import LiveVLMParams, RequestKind

pytestmark = pytest.mark.slow

CONFIG = {"clip_frames": 4, "long_term_budget_tokens": 1024, "page_tokens": 16}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    yield from live_engine(tiny_model_dir, CONFIG)


@pytest.fixture(scope="module")
def victim(engine):
    stream = engine.open_stream()
    stream.append(random_video(3, 8))
    answer = stream.ask(QUESTION, greedy(8)).token_ids
    return stream, memory_stats(stream), answer


def memory_stats(stream) -> dict:
    """What the stream holds (its activity time and question counters move with every legitimate ask)."""
    return {k: v for k, v in stream.stats().items() if k != "last_use" and not k.startswith("retrieval")}


def generate(engine, prompt_ids: list[int], kv_transfer_params, max_tokens: int = 4):
    """One request with these `kv_transfer_params`, straight into the engine."""
    sampling = greedy(max_tokens)
    sampling.extra_args = {"kv_transfer_params": kv_transfer_params}

    async def run():
        output = None
        async for output in engine.engine.generate({"prompt_token_ids": prompt_ids}, sampling,
                                                   request_id=f"forged-{uuid.uuid4().hex}"):
            pass
        return output

    return engine._run(run())


def victim_snapshot(engine, victim) -> dict:
    """The victim's real version and context size, as a well-formed forgery would claim them."""
    stream = victim[0]
    req_id = f"probe-{uuid.uuid4().hex}"
    snapshot = engine._run(engine.core.rpc("livevlm_prepare", stream.id, RequestKind.QUESTION.value, req_id))
    engine._run(engine.core.rpc("livevlm_release", [req_id]))
    return snapshot


def forgeries(stream_id: str, snapshot: dict) -> list[tuple[object, str]]:
    version, context = snapshot["version"], snapshot["context_tokens"]
    question = LiveVLMParams(stream_id, RequestKind.QUESTION, version, context, request_id="forged")
    clip = LiveVLMParams(stream_id, RequestKind.CLIP, version, context - 1, 8, 4, request_id="forged")
    sinks = LiveVLMParams(stream_id, RequestKind.SINKS, request_id="forged")
    unsigned = {k: v for k, v in question.to_kv_transfer_params()["livevlm"].items() if k != "mac"}
    return [
        ({"livevlm": {"kind": "nope"}}, "exactly the fields"),   # the exploit
        ({"do_remote_prefill": True}, "reserved for LiveVLM"),    # another connector's protocol
        ({"livevlm": unsigned}, "exactly the fields"),
        ({"livevlm": {**unsigned, "mac": "0" * 64}}, "not signed"),
        (question.to_kv_transfer_params(b"guessed secret"), "not signed"),
        (clip.to_kv_transfer_params(b"guessed secret"), "not signed"),
        (sinks.to_kv_transfer_params(b"guessed secret"), "not signed"),
        ({"livevlm": {**question.to_kv_transfer_params()["livevlm"], "version": version + 1}}, "not signed"),
        ({"livevlm": {**unsigned, "mac": "0" * 64, "kind": "question", "context_tokens": -1}}, "non-negative"),
        ({"livevlm": {**unsigned, "mac": "0" * 64, "version": True}}, "non-negative integer"),
        # signed with the engine's own secret but inconsistent: refused all the same
        (dataclasses.replace(question, context_tokens=10**6).to_kv_transfer_params(), "nothing left to compute"),
        (dataclasses.replace(question, num_frames=2).to_kv_transfer_params(), "carries no frames"),
    ]


def test_forged_requests_fail_alone(engine, victim):
    stream, stats, answer = victim
    snapshot = victim_snapshot(engine, victim)
    prompt = [engine.core.placeholder_token_id] * snapshot["context_tokens"] + [1, 2, 3]
    for params, reason in forgeries(stream.id, snapshot):
        output = generate(engine, prompt, params)
        error = (output.kv_transfer_params or {}).get("livevlm_error", "")
        assert reason in error, (params, output.kv_transfer_params)
        assert len(output.outputs[0].token_ids) == 1, params   # decoded at most one token
        assert not output.num_cached_tokens, params             # claimed no context: never read a stream
    # Not a dict (what `vllm_xargs` could carry): vLLM's own output processor, in the caller's process,
    # fails that one request before the engine is involved.
    from vllm.v1.engine.exceptions import EngineGenerateError

    with pytest.raises(EngineGenerateError):
        generate(engine, prompt, "x")
    assert memory_stats(stream) == stats
    assert stream.ask(QUESTION, greedy(8)).token_ids == answer


def test_signed_request_for_a_missing_version_or_stream_fails_closed(engine, victim):
    """Signed by the front end but naming what the store does not hold: the worker fails the request alone
    (its context slots are blanked, not left with whatever they held) and the front end gets the error."""
    stream, stats, answer = victim
    context = victim_snapshot(engine, victim)["context_tokens"]
    prompt = {"prompt_token_ids": [engine.core.placeholder_token_id] * context + [1, 2, 3]}
    for params, reason in [(LiveVLMParams(stream.id, RequestKind.QUESTION, 999, context), "has no version 999"),
                           (LiveVLMParams("no-such-stream", RequestKind.QUESTION, 1, context), "no stream")]:
        with pytest.raises(RuntimeError, match=reason):
            engine._run(engine.core.submit(dict(prompt), greedy(4), f"lv-forged-{uuid.uuid4().hex}", params))
    assert memory_stats(stream) == stats
    assert stream.ask(QUESTION, greedy(8)).token_ids == answer
