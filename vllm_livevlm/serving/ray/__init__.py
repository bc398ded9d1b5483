"""Scale-out with Ray: N LiveVLM server replicas (Ray actors) behind a router with stream affinity.

A stream's memory lives inside one engine, so the router (`router.StreamRouter`) places each new stream on
the least-loaded live replica and sends every later request of that stream to it; a stream whose replica
died answers 503. `vllm-livevlm serve-ray` (`cli.py`) starts the replicas and the router.
"""
