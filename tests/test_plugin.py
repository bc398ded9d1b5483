"""Plugin registration: version guard and architecture registration in the real vLLM registry."""

import importlib.metadata

import pytest

from vllm_livevlm import plugin


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "vllm_livevlm.plugin:register" in {ep.value for ep in eps}


def test_refuses_wrong_vllm_version(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.4")
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(plugin.UnsupportedVLLMVersion, match=r"supports vLLM 0\.32\.x.*0\.31\.4 is installed"):
        plugin.register()
    for bad in ("0.33.0", "1.32.0", "0.3.2"):
        with pytest.raises(plugin.UnsupportedVLLMVersion):
            plugin.check_vllm_version(bad)
    assert plugin.check_vllm_version("0.32.1+cpu") == "0.32.1+cpu"


def test_registers_architecture_in_vllm_registry():
    from vllm import ModelRegistry

    plugin.register()
    assert "LiveVLMLlavaOnevisionForConditionalGeneration" in ModelRegistry.get_supported_archs()
