"""The Ray Serve layer's pure parts, without a cluster: stream ids (`serving/ray/ids.py`), what a request
names (`addressing.py`), rebalance plans (`moving.plan`), limits, the streams autoscaling policy and the
Serve config `serve-ray` writes."""

from __future__ import annotations

import pytest

from vllm_livevlm.portable.checkpoints import stream_path
from vllm_livevlm.serving.ray.addressing import is_creation, named_stream
from vllm_livevlm.serving.ray.ids import StreamIds, home_tag

SECRET = b"s" * 32


def test_an_id_names_its_home_and_nothing_else_does(tmp_path):
    ids, tag = StreamIds(SECRET), home_tag("a1b2c3d4")
    minted = ids.mint(tag)
    assert len(minted) == 64 and minted.startswith(tag) and ids.home(minted) == tag
    assert ids.mint(tag) != minted  # 96 random bits each
    assert stream_path(tmp_path, minted).name == minted + ".livevlm"  # it can name a checkpoint file
    other_tag = home_tag("zzzzzzzz")
    forged = [minted[:-1] + ("0" if minted[-1] != "0" else "1"),  # MAC altered
              other_tag + minted[8:],                               # moved to another home
              minted[:8] + "0" * 24 + minted[32:],                  # new random part, old MAC
              minted.upper(), minted[:-2], minted + "00", "", "0" * 64, "0123456789abcdef" * 2]
    assert [ids.home(f) for f in forged] == [None] * len(forged)
    assert StreamIds(b"t" * 32).home(minted) is None  # another cluster's id


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError):
        StreamIds(b"short")


def test_the_stream_a_request_names_is_read_from_its_head():
    session = [(b"x-session-id", b"abc")]
    assert named_stream("/v1/video/streams/abc/frames", []) == "abc"
    assert named_stream("/v1/video/streams/abc/ws", session) == "abc"
    assert named_stream("/v1/video/streams/abc", []) == "abc"
    assert named_stream("/v1/chat/completions", [(b"X-Session-ID", b"def")]) == "def"
    assert named_stream("/v1/video/streams", session) is None  # a creation is placed by load, header or not
    assert named_stream("/v1/video/streams/import", session) is None
    assert named_stream("/v1/models", []) is None
    assert is_creation("POST", "/v1/video/streams") and is_creation("POST", "/v1/video/streams/import")
    assert not is_creation("GET", "/v1/video/streams") and not is_creation("POST", "/v1/video/streams/abc/frames")


def test_a_rebalance_plan_evens_the_counts_from_the_most_to_the_least_loaded():
    from vllm_livevlm.serving.ray.moving import plan

    assert plan({"a": 6, "b": 0}) == [("a", "b")] * 3
    assert plan({"a": 7, "b": 1, "c": 1}) == [("a", "b"), ("a", "c"), ("a", "b"), ("a", "c")]
    assert plan({"a": 3, "b": 2, "c": 3}) == [] and plan({"a": 9}) == [] and plan({}) == []
    assert plan({"a": 5, "b": 5, "c": 0, "d": 0}) == [("b", "c"), ("a", "d"), ("b", "c"), ("a", "d")]


def test_ray_limits_are_positive_numbers_and_known_names():
    from vllm_livevlm.serving.ray.limits import RayLimits

    assert RayLimits.from_dict({"hand_over_seconds": 5}).hand_over_seconds == 5
    for bad in ({"hand_over_seconds": 0}, {"retry_after_seconds": -1}, {"heal_poll_seconds": True},
                {"move_settle_seconds": "3"}, {"no_such_limit": 1}):
        with pytest.raises(ValueError):
            RayLimits.from_dict(bad)


def test_the_stream_a_chat_body_names_is_the_one_vllm_answers_from():
    from vllm_livevlm.serving.ray.addressing import body_session

    messages = '"messages": [{"role": "user", "content": "hi"}]'
    assert body_session(f'{{{messages}}}'.encode(), None) is None
    assert body_session(f'{{{messages}}}'.encode(), "hdr") == "hdr"
    assert body_session(f'{{"session_id": "abc", {messages}}}'.encode(), None) == "abc"
    assert body_session(f'{{"session_id": "abc", {messages}}}'.encode(), "hdr") == "abc"  # the body wins, as in vLLM
    assert body_session(b'{"session_id": "a", "session_id": "b"}', "hdr") == "b"  # the last duplicate, as json
    assert body_session(b'{"session\\u005fid": "esc"}', "hdr") == "esc"  # escapes are parsed
    assert body_session('{"session_id": "u16"}'.encode("utf-16"), None) == "u16"
    assert body_session(b'{"vllm_xargs": {"session_id": "x"}}', None) == "x"
    assert body_session(b'{"vllm_xargs": {"session_id": "x"}}', "hdr") == "hdr"  # header before xargs
    assert body_session(b'{"session_id": 5}', "hdr") == "hdr"  # not a string: the replica refuses it
    assert body_session(b'{"session_id": ""}', None) is None
    assert body_session(b'{"session_id": ' + b'[' * 100_000, "hdr") == "hdr"  # nesting past the parser
    assert body_session(b'not json session_id', None) is None


def _context(streams: dict[str, float] | None, target: int = 2, lowest: int = 1, highest: int = 4):
    from ray.serve.config import AutoscalingContext

    return AutoscalingContext(
        deployment_id=None, deployment_name="LiveVLMServer", app_name="livevlm", current_num_replicas=target,
        target_num_replicas=target, running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=None if streams is None else {"streams": streams}, raw_metrics=None,
        capacity_adjusted_min_replicas=lowest, capacity_adjusted_max_replicas=highest, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=None)


def test_the_autoscaling_policy_asks_for_ceil_streams_over_streams_per_replica():
    from vllm_livevlm.serving.ray.autoscaling import StreamsPerReplica

    policy = StreamsPerReplica(streams_per_replica=3)
    assert policy(_context({"a": 3.0, "b": 4.0}))[0] == 3        # 7 streams: ceil(7 / 3)
    assert policy(_context({"a": 2.0, "b": 1.0}))[0] == 1        # 3 streams fit in one
    assert policy(_context({"a": 0.0, "b": 0.0}))[0] == 1        # never under min_replicas
    assert policy(_context({"a": 30.0}))[0] == 4                 # nor over max_replicas
    assert policy(_context({"a": 3.0000001, "b": 2.9999999}))[0] == 2  # averages: 6 streams
    assert policy(_context(None, target=2))[0] == 2 and policy(_context({}, target=3))[0] == 3  # none reported yet
    for bad in (0, -1, 1.5, "3"):
        with pytest.raises(ValueError):
            StreamsPerReplica(streams_per_replica=bad)


def test_serve_ray_writes_the_streams_policy_into_the_serve_config():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from vllm_livevlm.serving.ray.autoscaling import StreamsPerReplica
    from vllm_livevlm.serving.ray.cli import serve_config

    config = serve_config({"model": "m"}, "127.0.0.1", 8000, 1, 1.0, 0, streams_per_replica=3, max_replicas=4)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` accepts
    deployment = config["applications"][0]["deployments"][0]
    assert "num_replicas" not in deployment
    autoscaling = AutoscalingConfig(**deployment["autoscaling_config"])  # Serve resolves the import path
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert autoscaling.policy.policy_kwargs == {"streams_per_replica": 3}
    unpickled = autoscaling.policy.get_policy()  # what Serve's controller runs (pickled by value)
    assert unpickled.__name__ == StreamsPerReplica.__name__
    assert unpickled(**autoscaling.policy.policy_kwargs)(_context({"a": 7.0}))[0] == 3
    fixed = serve_config({"model": "m"}, "127.0.0.1", 8000, 2, 1.0, 0)["applications"][0]["deployments"][0]
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
