"""Engine settings LiveVLM's correctness depends on are refused at start, with the flag named (the connector
checks them in every engine process, before the model loads)."""

from __future__ import annotations

import pytest

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.connector.connector import check_engine_settings
from vllm_livevlm.streams import engine_args_for, tokens_per_frame_of

CONFIG = {"clip_frames": 4}


def vllm_config(model: str, **overrides):
    from vllm import EngineArgs

    args = engine_args_for(model, LiveVLMConfig.coerce(CONFIG), tokens_per_frame_of(model), dtype="float32",
                           max_model_len=16384, **overrides)
    return EngineArgs(**args).create_engine_config()


def test_default_settings_pass(tiny_model_dir):
    check_engine_settings(vllm_config(tiny_model_dir))


@pytest.mark.parametrize("overrides, flag", [
    ({"enable_prefix_caching": True}, "--enable-prefix-caching"),
    ({"disable_chunked_mm_input": False}, "--disable-chunked-mm-input"),
])
def test_setting_refused(tiny_model_dir, overrides, flag):
    """The check on the engine's real config (what `EngineArgs` makes of the flag)."""
    with pytest.raises(ValueError, match=f"cannot run with these engine settings:\n- {flag}"):
        check_engine_settings(vllm_config(tiny_model_dir, **overrides))


@pytest.mark.parametrize("attribute, flag", [
    ("pipeline_parallel_size", "--pipeline-parallel-size"),
    ("data_parallel_size", "--data-parallel-size"),
])
def test_parallelism_refused(tiny_model_dir, attribute, flag):
    """Pipeline and data parallelism need several devices to start at all: the engine's real config with
    the setting changed."""
    config = vllm_config(tiny_model_dir)
    setattr(config.parallel_config, attribute, 2)
    with pytest.raises(ValueError, match=flag):
        check_engine_settings(config)


@pytest.mark.slow
def test_engine_start_refused(tiny_model_dir, capfd):
    """A real engine start (Python API) with both: the engine core refuses it before serving anything,
    and its log names every flag and why (one start: each takes a minute on a loaded CPU)."""
    from vllm_livevlm import LiveVLM

    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        LiveVLM(tiny_model_dir, CONFIG, dtype="float32", max_model_len=16384, enable_prefix_caching=True,
                disable_chunked_mm_input=False).shutdown()
    log = capfd.readouterr()
    text = log.out + log.err
    assert "LiveVLM cannot run with these engine settings" in text
    for flag in ("--enable-prefix-caching", "--disable-chunked-mm-input is required"):
        assert f"- {flag}" in text, flag
