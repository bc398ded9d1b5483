"""`StreamsPerReplica`: a Serve autoscaling policy that sizes the deployment by the streams it holds, not by
requests in flight (a stream is memory held between requests; an idle stream still costs its replica).

Each replica reports its live and opening streams as the custom metric `streams`
(`LiveVLMServer.record_autoscaling_stats`); Serve's controller averages them over `look_back_period_s` and
calls this policy, which asks for `ceil(total / streams_per_replica)` replicas within the deployment's
`min_replicas`/`max_replicas`. Scaling down stops replicas whose streams then move (`moving`); scaling up adds
empty replicas that new streams go to (the least loaded) and that a `rebalance` fills. `serve-ray
--streams-per-replica N --max-replicas M` writes it into the Serve config (`cli.serve_config`).
Serve pickles this module by value into its controller: it imports nothing of this package.
"""

from __future__ import annotations

import math
from typing import Any

METRIC = "streams"
POLICY = "vllm_livevlm.serving.ray.autoscaling:StreamsPerReplica"


class StreamsPerReplica:
    def __init__(self, streams_per_replica: int):
        if not isinstance(streams_per_replica, int) or streams_per_replica < 1:
            raise ValueError(f"streams_per_replica must be a positive integer, got {streams_per_replica!r}")
        self.streams_per_replica = streams_per_replica

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """(replicas wanted, policy state) for a `ray.serve.config.AutoscalingContext`."""
        reported = (ctx.aggregated_metrics or {}).get(METRIC)
        if not reported:  # no replica reported yet (starting): keep what Serve aims at
            return ctx.target_num_replicas, ctx.policy_state
        streams = round(sum(reported.values()))  # averages over the look-back window
        wanted = math.ceil(streams / self.streams_per_replica)
        return max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, wanted)), \
            ctx.policy_state
