"""The LiveVLM KV connector: a per-stream session store on the workers, fed and read by vLLM requests.

Load it with `--kv-transfer-config '{"kv_connector": "LiveVLMConnector",
"kv_connector_module_path": "vllm_livevlm.connector", "kv_role": "kv_both"}'`.
"""

from vllm_livevlm.connector.connector import LiveVLMConnector
from vllm_livevlm.connector.params import LiveVLMParams, RequestKind

__all__ = ["LiveVLMConnector", "LiveVLMParams", "RequestKind"]
