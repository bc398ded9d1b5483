"""LiveVLMConfig: the paper's defaults, validation with clear errors, JSON and CLI loading."""

import argparse
import json

import pytest

from vllm_livevlm.config import LiveVLMConfig, LiveVLMConfigError


def test_defaults_are_the_papers():
    c = LiveVLMConfig()
    assert (c.clip_frames, c.short_term_frames, c.encode_context, c.score_queries) == (32, 2, "all", 196)
    assert (c.long_term_budget_tokens, c.bucket_capacity, c.score_fraction) == (12000, 1, 0.5)
    assert (c.per_head_selection, c.page_tokens, c.retrieve_ratio) == (False, 16, 0.4)
    assert (c.flush_on_question, c.history_turns) == (True, 0)
    assert c.score_keep_tokens == 6000
    assert not c.lossless
    assert LiveVLMConfig(long_term_budget_tokens=None, retrieve_ratio=1.0).lossless


@pytest.mark.parametrize("overrides, message", [
    ({"clip_frames": 0}, "clip_frames"),
    ({"page_tokens": -3}, "page_tokens"),
    ({"retrieve_ratio": 0.0}, "retrieve_ratio"),
    ({"retrieve_ratio": 1.5}, "retrieve_ratio"),
    ({"score_fraction": 2}, "score_fraction"),
    ({"encode_context": "everything"}, "encode_context"),
    ({"long_term_budget_tokens": 100, "bucket_capacity": 3}, "multiple of bucket_capacity"),
    ({"short_term_frames": -1}, "short_term_frames"),
    ({"no_such_knob": 1}, "unknown LiveVLM config key"),
])
def test_invalid_values_name_the_knob(overrides, message):
    with pytest.raises(LiveVLMConfigError, match=message):
        LiveVLMConfig.from_dict(overrides)


def test_json_inline_and_file(tmp_path):
    assert LiveVLMConfig.from_json('{"page_tokens": 8}').page_tokens == 8
    path = tmp_path / "lv.json"
    path.write_text(json.dumps({"long_term_budget_tokens": None, "retrieve_ratio": 1.0}))
    assert LiveVLMConfig.from_json(str(path)).lossless
    with pytest.raises(LiveVLMConfigError, match="neither a JSON object nor a file"):
        LiveVLMConfig.from_json(str(tmp_path / "missing.json"))
    with pytest.raises(LiveVLMConfigError, match="not valid JSON"):
        LiveVLMConfig.from_json("{page_tokens: 8")


def test_coerce_applies_overrides_on_a_base():
    base = LiveVLMConfig(page_tokens=8)
    assert LiveVLMConfig.coerce({"clip_frames": 4}, base) == LiveVLMConfig(page_tokens=8, clip_frames=4)
    assert LiveVLMConfig.coerce(None, base) is base


def test_cli_flags_override_json():
    parser = argparse.ArgumentParser()
    LiveVLMConfig.add_cli_args(parser)
    args = parser.parse_args(["--livevlm-config", '{"page_tokens": 8, "clip_frames": 4}',
                              "--livevlm-clip-frames", "16", "--livevlm-long-term-budget-tokens", "none",
                              "--livevlm-flush-on-question", "false"])
    c = LiveVLMConfig.from_cli_args(args)
    assert (c.page_tokens, c.clip_frames, c.long_term_budget_tokens, c.flush_on_question) == (8, 16, None, False)
