"""The OpenAI-compatible server side of vllm-livevlm: stream routes and chat completions from streams."""
