"""LiveVLM on Ray Serve: replicas that each run one LiveVLM engine behind Serve's proxies, with stream
affinity (`router`: a stream id names its home, `ids`), forged ids refused at the proxy (`gate`), streams
restored from checkpoints when a replica dies (`healing`), handed over when one is stopped or a `rebalance`
evens them (`moving`, `rebalancing`), autoscaling by streams (`autoscaling`) and the layer's timings
(`limits`).
`vllm-livevlm serve-ray` (`cli.py`) writes and deploys the Serve config of the application (`app.build`).
"""
