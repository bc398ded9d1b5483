"""LiveVLM model variants registered with vLLM's model registry (see `vllm_livevlm.plugin`)."""
