"""A stream's parts and its file: the engine's memory shards (wire form, one per tensor-parallel rank) and the
front end's state (JSON) and tensors (pending frames, frame times) ⇄ one stream file (`format`).

`pack` and `unpack` run in a thread of the front end (serialising and checksumming cost CPU, never engine
time). `unpack` checks the front-end state too, so an imported stream starts with counters that agree with
its memory: nothing is half-loaded, whatever the file says.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.memory.stream import COUNTERS, StreamMemory
from vllm_livevlm.portable.format import (ENCODED_TIMES, FRONT_TENSORS, MEMORY_TENSORS, PENDING_FRAMES,
                                          PENDING_TIMES, StreamFileError, decode_stream, encode_stream, shard_name,
                                          torch_dtype)
from vllm_livevlm.portable.wire import from_wire, to_wire

FRONT_COUNTERS = ("frames_received", "frames_encoded", "frames_dropped", "frames_sampled_out", "clips_encoded")


@dataclass(frozen=True)
class StreamFile:
    """A decoded, checked stream file."""

    header: dict[str, Any]
    shards: list[dict[str, torch.Tensor]]  # the memory tensors of each tensor-parallel rank
    front: dict[str, torch.Tensor]         # PENDING_FRAMES, PENDING_TIMES, ENCODED_TIMES

    @property
    def state(self) -> dict[str, Any]:
        """The front end's state as exported (`LiveStream.portable_state`)."""
        return self.header["stream"]

    @property
    def sink_tokens(self) -> int:
        return self.shards[0]["sinks_k"].shape[1]

    def memory_payload(self, config: LiveVLMConfig) -> dict[str, Any]:
        """The import RPC's payload (version, counters, shards in wire form), once the memory passed the
        engine's own checks (`StreamMemory.from_tensors`) against `config` here, in the front end: a bad
        file costs the engine nothing."""
        model, memory = self.header["model"], self.header["memory"]
        shape = (model["layers"], model["kv_heads"] // model["tp_size"], model["head_dim"])
        for tensors in self.shards:
            try:
                StreamMemory.from_tensors(config, memory["version"], tensors, memory["counters"], shape,
                                          torch_dtype(model["dtype"]))
            except ValueError as e:
                raise StreamFileError(f"the memory does not fit its config: {e}") from None
        return {"version": memory["version"], "counters": memory["counters"],
                "shards": [{name: to_wire(t) for name, t in tensors.items()} for tensors in self.shards]}


def pack(fingerprint: dict[str, Any], shards: list[dict[str, Any]], state: dict[str, Any],
         front: dict[str, torch.Tensor], owner_token_sha256: str | None = None) -> bytes:
    """The stream file of an export: `shards` are the export RPC's results (one per rank, any order)."""
    shards = sorted(shards, key=lambda shard: shard["rank"])
    tensors = {shard_name(s["rank"], name): from_wire(wire) for s in shards for name, wire in s["tensors"].items()}
    header = {"model": fingerprint, "stream": state, "owner_token_sha256": owner_token_sha256,
              "memory": {"version": shards[0]["version"], "counters": shards[0]["counters"]},
              "exported_at": time.time()}
    return encode_stream(header, {**tensors, **front})


def unpack(data: bytes, max_bytes: int, fingerprint: dict[str, Any]) -> StreamFile:
    """Decode and check a stream file for this engine (`fingerprint`); raises `StreamFileError`."""
    header, tensors = decode_stream(data, max_bytes, fingerprint)
    memory = header.get("memory")
    if not isinstance(memory, dict) or not isinstance(memory.get("counters"), dict) \
            or set(memory["counters"]) != set(COUNTERS) or not _count(memory.get("version"), 1) \
            or not all(_count(v) for v in memory["counters"].values()):
        raise StreamFileError(f"the header's memory version and counters {COUNTERS} must be non-negative integers")
    front = {name: tensors[name] for name in FRONT_TENSORS}
    _check_state(header.get("stream"), memory["counters"], front)
    shards = [{name: tensors[shard_name(rank, name)] for name in MEMORY_TENSORS}
              for rank in range(header["model"]["tp_size"])]
    return StreamFile(header, shards, front)


def _count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_state(state: Any, counters: dict[str, int], front: dict[str, torch.Tensor]) -> None:
    """The front-end state's types, and its counters against the memory's and the front tensors."""
    if not isinstance(state, dict):
        raise StreamFileError("the header has no stream state")
    if not isinstance(state.get("config"), dict) or not isinstance(state.get("system_prompt"), (str, type(None))):
        raise StreamFileError("the stream state needs a config object and a system prompt (string or null)")
    seen = state.get("counters")
    if not isinstance(seen, dict) or set(seen) != set(FRONT_COUNTERS) or not all(_count(v) for v in seen.values()):
        raise StreamFileError(f"the stream state's counters {FRONT_COUNTERS} must be non-negative integers")
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                                for t in history):
        raise StreamFileError("the stream state's history must be a list of [question, answer] strings")
    for name in (PENDING_TIMES, ENCODED_TIMES):  # dtype and shape are the format's (`decode_stream`)
        if not bool(torch.isfinite(front[name]).all()):
            raise StreamFileError(f"{name} must be finite seconds")
    pending = front[PENDING_FRAMES]
    shape = state.get("frame_shape")
    if pending.shape[0] and (shape is None or list(pending.shape[1:]) != shape):
        raise StreamFileError(f"the pending frames are {list(pending.shape[1:])}, the stream's frames {shape}")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and shape[2] == 3
                                  and all(_count(d, 2) for d in shape)):
        raise StreamFileError(f"frame_shape {shape!r} is not [height, width, 3]")
    _check_clock(state.get("clock"))
    received, encoded = seen["frames_received"], seen["frames_encoded"]
    if encoded != counters["frames_seen"] or seen["clips_encoded"] != counters["clips"] \
            or len(front[ENCODED_TIMES]) != encoded or len(front[PENDING_TIMES]) != pending.shape[0] \
            or received != encoded + pending.shape[0] + seen["frames_dropped"] + seen["frames_sampled_out"]:
        raise StreamFileError("the stream's frame counters disagree with its memory and pending frames")


def _check_clock(clock: Any) -> None:
    if not isinstance(clock, dict) or set(clock) != {"origin", "last", "last_slot"} \
            or not _count(clock["last_slot"], -1) or not all(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
                for value in (clock["origin"], clock["last"])):
        raise StreamFileError("the stream state's clock needs origin, last (seconds or null) and last_slot")

