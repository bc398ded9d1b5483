"""Hypothesis strategies for the fuzz test of every POST route that builds an engine request: a valid base
body per route, mixed with the fields vLLM maps into the engine request (`kv_transfer_params`,
`vllm_xargs`, `priority`, `mm_processor_kwargs`, ...), the headers it reads (`X-Request-Id`,
`X-Session-ID`, `X-data-parallel-rank`) and junk, so that the trust boundary, vLLM's own validation and our
stream routes are all tried with what an attacker can send.

Every token budget a request can be accepted with is a few tokens: a fuzz case costs milliseconds of
engine time, never the server's default `max_model_len - prompt` tokens.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import strategies as st

# What vLLM copies into the engine request's transfer params (`vllm/v1/request.py`, the OpenAI protocols),
# the connector's input: stated here, not imported from the boundary, so that the test checks the boundary.
RESERVED_KEYS = frozenset({"kv_transfer_params", "ec_transfer_params", "kv_cache_report_mode"})
MODEL = "tiny"
USER = [{"role": "user", "content": "x"}]
FRAMES_ROUTE = "/v1/video/streams/{stream_id}/frames"  # ours: reads frames only, never forwards a field
# Every POST route this server mounts (vLLM 0.32 and ours: GET /openapi.json, plus the scale-out and render
# routes it leaves out of the schema) that reads a body, and a body each accepts.
ROUTE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": MODEL, "prompt": "x", "max_tokens": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 2},
    "/v1/chat/completions/batch": {"model": MODEL, "messages": [USER, USER], "max_tokens": 2},
    "/v1/responses": {"model": MODEL, "input": "x", "max_output_tokens": 2},
    "/v1/messages": {"model": MODEL, "messages": USER, "max_tokens": 2},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": USER},
    "/invocations": {"model": MODEL, "messages": USER, "max_tokens": 2},  # SageMaker: no --api-key check
    "/tokenize": {"model": MODEL, "prompt": "x"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2]},
    "/generative_scoring": {"model": MODEL, "query": "a", "items": ["b"], "label_token_ids": [1, 2]},
    "/v1/systemone": {"model": MODEL, "state": "s", "questions": {"q": {"type": "yes_no"}}},
    "/v1/chat/completions/render": {"model": MODEL, "messages": USER},
    "/v1/messages/render": {"model": MODEL, "messages": USER, "max_tokens": 2},
    "/v1/completions/render": {"model": MODEL, "prompt": "x"},
    "/v1/responses/render": {"model": MODEL, "input": "x"},
    "/v1/chat/completions/derender": {"model": MODEL, "token_ids": [1, 2]},
    "/v1/completions/derender": {"model": MODEL, "token_ids": [1, 2]},
    "/inference/v1/generate": {"model": MODEL, "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}},
    "/v1/responses/{response_id}/cancel": {},
    # ours: a stream (never the victim's token), frames pushed to a stream
    "/v1/video/streams": {"config": {"clip_frames": 4}},
    FRAMES_ROUTE: {"frames": []},
}
# Our stream routes' other methods (a body is sent to them too).
OTHER_ROUTES = ("GET /v1/video/streams", "GET /v1/video/streams/{stream_id}", "DELETE /v1/video/streams/{stream_id}",
                "PUT /v1/video/streams/{stream_id}", "GET /v1/video/engine")
# Routes that build an engine request: tried three times as often as the others.
ENGINE_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses",
                 "/v1/messages", "/invocations", "/generative_scoring", "/tokenize")
# POST routes that build no engine request and are not fuzzed here, and why.
NOT_FUZZED = {
    "/ping": "no body: a health probe",
    "/v1/video/streams/import": "ours: reads a stream file only, never forwards a field (its bytes are fuzzed "
                                "by tests/test_portable.py)",
    "/is_scaling_elastic_ep": "engine control: not served (404, `serving.access.ADMIN_PATHS`)",
    "/scale_elastic_ep": "engine control: not served (404, `serving.access.ADMIN_PATHS`)",
    "/inference/v1/abort_requests": "engine control (aborts any request by id): not served (404)",
}
# vLLM's honest "not for this model" answer (the tiny model has no structured-decision support).
NOT_IMPLEMENTED = {"/v1/systemone": "The model does not support the structured decision API"}
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8)
small_ints = st.sampled_from([-1, 0, 1, 2, 3, 10**6, 2**63, 2**70]) | st.sampled_from(["1", 1.5, True, None, []])
# vLLM clamps a large token budget to what the context has left (~16k tokens here) instead of refusing it.
budgets = st.sampled_from([-1, 0, 1, 3, "1", 1.5, True, None, [], {}])


def forged_livevlm(stream_id: str) -> st.SearchStrategy[Any]:
    """`kv_transfer_params` as a forger writes them: well-formed sinks/clip/question requests naming the
    victim stream with plausible versions and context sizes and a made-up signature, and malformed ones."""
    ints = st.sampled_from([0, 1, 2, 16, 448, 2**31, -1])
    well_formed = st.fixed_dictionaries({
        "stream_id": st.just(stream_id), "kind": st.sampled_from(["sinks", "clip", "question", "nope"]),
        "version": ints, "context_tokens": ints, "frame_start": ints, "num_frames": ints,
        "context_extent": ints, "request_id": st.sampled_from(["forged", f"lv-sinks-{stream_id}", f"lv-question-{stream_id}-0"]),
        "mac": st.sampled_from(["0" * 64, "", "x"])})
    return st.fixed_dictionaries({"livevlm": well_formed}) | st.fixed_dictionaries({"livevlm": junk}) | junk


def forged_fields(stream_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """A reserved field as it reaches the engine: top level, or a `vllm_xargs` key (a JSON string there)."""
    params = forged_livevlm(stream_id)
    return st.one_of(
        st.fixed_dictionaries({"kv_transfer_params": params}),
        st.fixed_dictionaries({"vllm_xargs": st.fixed_dictionaries({"kv_transfer_params": params.map(json.dumps)})}),
        st.fixed_dictionaries({"ec_transfer_params": params}),
        st.fixed_dictionaries({"vllm_xargs": st.fixed_dictionaries({"kv_cache_report_mode": st.text(max_size=8)})}),
        st.fixed_dictionaries({"kv_cache_report_mode": junk}))


def a_few(options: dict[str, st.SearchStrategy[Any]], most: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Up to `most` of `options`, each with a value drawn from its strategy (a few fields per request, so
    that a valid base body mostly stays valid and each field is tried on its own)."""
    names = st.lists(st.sampled_from(sorted(options)), unique=True, max_size=most)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({name: options[name] for name in chosen}))


def one_in(n: int, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value of `strategy` in about one case of `n`, else None."""
    return st.integers(0, n - 1).flatmap(lambda i: strategy if i == 0 else st.none())


def engine_fields(stream_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """A few request fields that vLLM maps into the engine request (or rejects): reserved ones, sampling
    and budget knobs at their edges, multimodal and template knobs, structured outputs, ids; or junk."""
    reserved = forged_livevlm(stream_id)
    xarg_value = st.text(max_size=20) | st.integers(-5, 5) | st.floats(-1, 1) | reserved.map(json.dumps) | junk
    media = st.sampled_from([
        "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + bytes(64)).decode(),
        "data:video/mp4;base64,!!", "data:image/png;base64,iVBORw0KGgo=", "file:///etc/passwd",
        "http://127.0.0.1:9/x.mp4", "ftp://x/y", ""])
    part = st.sampled_from(["text", "image_url", "video_url", "input_audio", "nope"]).flatmap(
        lambda kind: st.fixed_dictionaries({"type": st.just(kind), kind: media | junk}))
    return a_few({
        **{key: reserved for key in RESERVED_KEYS},
        "vllm_xargs": st.dictionaries(st.sampled_from([*RESERVED_KEYS, "session_id", "priority", "x"]),
                                      xarg_value, max_size=3) | junk,
        "session_id": st.sampled_from([stream_id, "nope", ""]) | junk,
        "request_id": st.sampled_from([f"lv-sinks-{stream_id}", f"lv-question-{stream_id}-0", "r"]) | junk,
        "cache_salt": st.text(max_size=10) | junk, "priority": small_ints,
        **{key: budgets for key in TOKEN_LIMITS},
        **{key: small_ints for key in ("n", "best_of", "logprobs", "top_logprobs",
                                       "prompt_logprobs", "min_tokens", "truncate_prompt_tokens")},
        # Past 64 bits vLLM 0.32 answers 500 (msgpack cannot carry it to the engine): the boundary refuses it.
        "top_k": st.sampled_from([-2, -1, 0, 1, 10**6, 2**63 - 1, 2**63, 2**64, -2**70, "1", None]),
        **{key: st.floats() | junk for key in ("temperature", "top_p", "min_p", "repetition_penalty",
                                               "presence_penalty", "frequency_penalty")},
        **{key: st.booleans() | junk for key in ("echo", "use_beam_search", "ignore_eos", "add_special_tokens",
                                                 "return_token_ids", "skip_special_tokens", "background",
                                                 "continue_final_message", "return_tokens_as_token_ids")},
        "seed": st.integers(-2**70, 2**70) | junk,
        "stop": st.lists(st.text(max_size=5), max_size=20) | junk,
        "logit_bias": st.dictionaries(st.sampled_from(["1", "-1", "99999999"]), st.floats(), max_size=2) | junk,
        "allowed_token_ids": st.lists(st.integers(-2, 2**40), max_size=3) | junk,
        "bad_words": st.lists(st.text(max_size=5), max_size=3) | junk,
        "mm_processor_kwargs": st.fixed_dictionaries({}, optional={"num_frames": small_ints, "size": junk}) | junk,
        "media_io_kwargs": st.fixed_dictionaries({}, optional={"video": junk, "image": junk}) | junk,
        "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": junk, "tools": junk}) | junk,
        "chat_template": st.sampled_from(["{{ range(10**9) | list }}", "{% for m in messages %}x{% endfor %}"]),
        "logits_processors": st.sampled_from([["os.system"], ["builtins:exit"], [{"qualname": "os.system"}]]) | junk,
        # Anything but an object or null answers 500 in vLLM 0.32's validator: the boundary refuses it.
        "structured_outputs": st.sampled_from([{"regex": "(a+)+$"}, {"json": {"type": "object"}}, {"choice": []},
                                              {"grammar": "root ::= x"}, None])
        | st.dictionaries(st.sampled_from(["json", "regex", "choice", "grammar", "x"]), junk, max_size=2) | junk,
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "json_schema"}, {"type": "x"}]) | junk,
        "prompt_embeds": st.sampled_from(["", base64.b64encode(b"PK\x03\x04" + bytes(32)).decode()]) | junk,
        "stream": st.booleans(), "stream_options": junk,
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                    "content": st.lists(part, max_size=2)}), max_size=2),
    }) | one_in(8, st.dictionaries(st.text(max_size=12), junk, max_size=3)).map(lambda extra: extra or {})


def keys_in(value: Any, keys: frozenset[str]) -> set[str]:
    """Those of `keys` that `value` holds as an object key at any depth (what the boundary must refuse)."""
    if isinstance(value, dict):
        return {k for k in value if k in keys}.union(*(keys_in(v, keys) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_in(v, keys) for v in value))
    return set()


def bounded(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with every null token budget set to 2: a null one means the default, the whole context."""
    return {k: 2 if k in TOKEN_LIMITS and v is None else v for k, v in body.items()}
