"""`StepRequests`: the LiveVLM requests of one engine step, as the attention layers see them.

Built once per step from the connector metadata and the forward context. For each request it finds the
request's rows in the flattened batch (by matching its first scheduled slot in the slot mapping), then,
per layer, the model variant calls:
- `before_attention` (raw keys): fills the request's context slots 0..P-1 with the snapshot's raw keys
  rotated once to those positions, and captures the raw K/V of sinks and clip rows;
- `after_rotary` (rotated q/k): computes a clip's vision-to-vision scores.
`commit` (after the last layer) turns a clip's captures into the stream's next memory version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vllm_livevlm.connector.params import LiveVLMParams, RequestKind
from vllm_livevlm.connector.store import Reask
from vllm_livevlm.log import get_logger
from vllm_livevlm.memory import retrieval
from vllm_livevlm.memory.scoring import vision_scores
from vllm_livevlm.memory.stream import ClipKV, StreamMemory

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

    from vllm_livevlm.connector.store import SessionStore

logger = get_logger(__name__)


@dataclass
class RequestSlots:
    """Scheduler → worker: one LiveVLM request's first scheduled step."""

    req_id: str
    params: LiveVLMParams
    block_ids: list[int]
    num_computed: int   # tokens already in the KV (P for clip/question: the claimed placeholders)
    num_scheduled: int  # tokens computed this step
    num_prompt: int
    block_size: int
    video_grid: tuple[int, ...] | None = None  # a clip's merged video grid (multi-axis models)

    def slots(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(start, stop, device=device)
        blocks = torch.tensor(self.block_ids, dtype=torch.long, device=device)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass
class _Active:
    slots: RequestSlots
    rows: slice
    memory: StreamMemory | None  # the snapshot it reads (clip, question); None for sinks and failed requests
    fill_context: bool
    failed: str | None = None    # why: its context slots are blanked, nothing is captured or committed
    captured_k: dict[int, torch.Tensor] = field(default_factory=dict)
    captured_v: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    scored_context_k: dict[int, torch.Tensor] = field(default_factory=dict)
    context_slots: torch.Tensor | None = None
    retrieved: dict[int, torch.Tensor] = field(default_factory=dict)  # question: pages read per layer (device)
    ltm_index: torch.Tensor | None = None  # question: the long-term tokens this layer reads (None: all)
    retrieval_seconds: float = 0.0


class StepRequests:
    """Total: whatever goes wrong with one request (an unknown stream or version, an inconsistent request,
    an exception or out-of-memory in a hook or at commit) fails that request alone. A failed request's
    context slots are written with zeros on every later layer, so it never attends to what the blocks held
    before; the store records the failure and `livevlm_release` reports it to the front end, which
    discards the output. The stream's memory is untouched (a commit is all or nothing)."""

    def __init__(self, requests: list[RequestSlots], store: "SessionStore", forward_context: "ForwardContext"):
        self.store = store
        slot_mapping = _any_slot_mapping(forward_context)
        self.device = slot_mapping.device
        self.active: list[_Active] = []
        for req in requests:
            try:
                active = self._activate(req, slot_mapping)
            except Exception as e:
                self.store.fail_request(req.params.request_id, f"step preparation failed: {type(e).__name__}: {e}")
                logger.exception("LiveVLM: request %s", req.params.request_id)
                continue
            if active is not None:
                self.active.append(active)

    def _activate(self, req: RequestSlots, slot_mapping: torch.Tensor) -> _Active | None:
        first = req.slots(req.num_computed, req.num_computed + 1, self.device)
        hit = (slot_mapping == first).nonzero()
        if hit.numel() == 0:
            return None  # not in this forward (e.g. a dummy or partial batch)
        row = int(hit[0, 0])
        params = req.params
        if params.kind == RequestKind.SINKS and not self.store.is_open(params.stream_id):
            return None  # closed while its sinks were in flight: no context to fill, nothing will be kept
        memory = None
        problem = None
        reask = False
        if params.kind != RequestKind.SINKS:
            try:
                if params.kind == RequestKind.QUESTION:
                    memory = self.store.question_snapshot(params.stream_id, params.version, params.request_id,
                                                          params.context_tokens)
                else:
                    memory = self.store.snapshot(params.stream_id, params.version)
            except (KeyError, ValueError) as e:  # unknown stream or a version no longer (or never) held
                problem, reask = str(e), isinstance(e, Reask)
            else:
                expected = (memory.clip_context_tokens if params.kind == RequestKind.CLIP
                            else memory.question_context_tokens)
                if params.context_tokens != expected:
                    problem = (f"{params.context_tokens} placeholder tokens but version {params.version} "
                               f"needs {expected}")
                elif self.store.axes and params.context_extent != memory.context_extent(
                        params.kind == RequestKind.CLIP, self.store.stride(memory.config)):
                    problem = f"context extent {params.context_extent} does not fit version {memory.version}"
        if params.kind == RequestKind.CLIP and req.num_computed + req.num_scheduled != req.num_prompt:
            problem = (f"a clip must be prefilled in one step ({req.num_prompt - req.num_computed} tokens, "
                       f"{req.num_scheduled} scheduled): raise --max-num-batched-tokens and keep "
                       "--disable-chunked-mm-input")
        fill = params.kind != RequestKind.SINKS and req.num_computed == params.context_tokens
        active = _Active(req, slice(row, row + req.num_scheduled), memory, fill)
        if fill:
            active.context_slots = req.slots(0, params.context_tokens, self.device)
        if problem is not None:
            self._fail(active, problem, reask)
        return active

    def _fail(self, a: _Active, reason: str, reask: bool = False) -> None:
        params = a.slots.params
        if a.failed is None:
            logger.error("LiveVLM: request %s of stream %s failed: %s", params.request_id, params.stream_id, reason)
            self.store.fail_request(params.request_id, reason, reask)
        a.failed, a.memory = reason, None
        a.captured_k.clear()
        a.captured_v.clear()
        a.scores.clear()

    # ---- per layer, called by the `livevlm::rotary_with_hooks` op (vllm_livevlm.model.ops) ------------------
    def before_attention(self, layer: int, attn, rotary_emb, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> None:
        """`rotary_emb(positions, keys, None)` rotates in place (the layer's own RoPE kernel)."""
        for a in self.active:
            if a.failed is None:
                try:
                    self._before_attention(a, layer, attn, rotary_emb, q, k, v)
                except Exception as e:  # includes out-of-memory
                    self._fail(a, f"layer {layer}: {type(e).__name__}: {e}")
            if a.failed is not None:
                _blank(a, attn, k)

    def _before_attention(self, a: _Active, layer: int, attn, rotary_emb, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> None:
        heads, dim = attn.num_kv_heads, attn.head_size
        kind = a.slots.params.kind
        if kind in (RequestKind.SINKS, RequestKind.CLIP):
            a.captured_k[layer] = k[a.rows].reshape(-1, heads, dim).clone()
            a.captured_v[layer] = v[a.rows].reshape(-1, heads, dim).clone()
        if not a.fill_context or a.slots.params.context_tokens == 0 or a.memory is None:
            return
        if kind == RequestKind.CLIP:
            ctx_k, ctx_v = a.memory.clip_context(layer)
        else:
            a.ltm_index = self._retrieve(a, a.memory, layer, attn, q)
            ctx_k, ctx_v = a.memory.question_context(layer, a.ltm_index)
        rotated = ctx_k.view(ctx_k.shape[0], heads * dim)  # a new tensor (see `StreamMemory`): rotated in place
        # Rotated once from raw, with the model's own kernel.
        rotary_emb(self._context_positions(a, layer, rotated.device), rotated, None)
        rotated = rotated.view(-1, heads, dim)
        attn.impl.do_kv_cache_update(attn, rotated, ctx_v, attn.kv_cache, a.context_slots)
        if kind == RequestKind.CLIP:
            start, stop = a.memory.scored_context_range()
            a.scored_context_k[layer] = rotated[start:stop]

    def _context_positions(self, a: _Active, layer: int, device: torch.device) -> torch.Tensor:
        """Positions of the context slots: 0..P-1 (1-D), or the multi-axis rule's (`docs/positions.md`)."""
        params, memory = a.slots.params, a.memory
        if not self.store.axes:
            return torch.arange(params.context_tokens, device=device)
        clip = params.kind == RequestKind.CLIP
        return memory.context_positions(layer, clip, a.ltm_index, self.store.stride(memory.config),
                                        params.context_extent)

    def _retrieve(self, a: _Active, memory: StreamMemory, layer: int, attn, q: torch.Tensor) -> torch.Tensor | None:
        """PaR for one question and layer: the long-term token indices to place (None: all of them)."""
        layout = memory.page_layout
        if layout.reads_everything:
            a.retrieved[layer] = torch.arange(layout.num_pages, device=self.device)
            return None
        start = time.perf_counter()
        # The question turn's rows only: a recompute after a preemption also schedules the tokens decoded so
        # far, which must not change the pages it reads.
        slots = a.slots
        prompt_rows = slice(a.rows.start, a.rows.start + min(slots.num_scheduled, slots.num_prompt - slots.num_computed))
        query = retrieval.average_query(q[prompt_rows].reshape(-1, attn.num_heads, attn.head_size), attn.num_kv_heads)
        scores = _sum_over_ranks(retrieval.page_scores(query, memory.ltm_summary[layer]))
        pages = retrieval.top_pages(scores, layout.full_pages_read)
        # Kept on the device: the report is read once, after the last layer (`_commit`).
        a.retrieved[layer] = torch.cat([pages, torch.arange(layout.num_full_pages, layout.num_pages,
                                                            device=pages.device)])
        index = retrieval.token_index(pages, layout)
        a.retrieval_seconds += time.perf_counter() - start
        return index

    def after_rotary(self, layer: int, attn, q: torch.Tensor, k: torch.Tensor) -> None:
        """Vision-to-vision scores of a clip: its last vision queries against all cached vision keys."""
        heads, dim = attn.num_kv_heads, attn.head_size
        for a in self.active:
            if a.slots.params.kind != RequestKind.CLIP or a.failed is not None or a.memory is None:
                continue
            try:
                clip_q = q[a.rows].reshape(-1, attn.num_heads, dim)
                clip_k = k[a.rows].reshape(-1, heads, dim)
                # Popped: a clip holds one layer's rotated context at a time, not every layer's until commit.
                context_k = a.scored_context_k.pop(layer, clip_k[:0])
                a.scores[layer] = vision_scores(clip_q, clip_k, context_k, a.memory.config.score_queries,
                                                attn.impl.scale)
            except Exception as e:  # includes out-of-memory
                self._fail(a, f"layer {layer} scores: {type(e).__name__}: {e}")

    # ---- after the last layer --------------------------------------------------------------------------------
    def commit(self) -> list[str]:
        """Report this step's questions, then commit its clips (and sinks prefixes) one after another;
        returns the streams that got a new version. Each request lets go of its snapshot and captures as it
        is done (questions' pins are settled: their context is in vLLM's blocks now), so a step holds at most
        one version beyond each stream's latest at a time: the one being built (see `StreamService`)."""
        committed = []
        questions_first = sorted(self.active, key=lambda a: a.slots.params.kind != RequestKind.QUESTION)
        for a in questions_first:
            try:
                if a.failed is None and self._commit(a):
                    committed.append(a.slots.params.stream_id)
            except Exception as e:  # the store keeps its last version: a commit is all or nothing
                self._fail(a, f"commit: {type(e).__name__}: {e}")
            finally:
                if a.fill_context and a.slots.params.kind == RequestKind.QUESTION:
                    self.store.settle([a.slots.params.request_id])
                a.memory = None
                for held in (a.captured_k, a.captured_v, a.scores, a.scored_context_k):
                    held.clear()
        return committed

    def _commit(self, a: _Active) -> bool:
        params = a.slots.params
        if params.kind == RequestKind.QUESTION:
            if a.retrieved and a.memory is not None:
                layers = sorted(a.retrieved)
                pages = torch.stack([a.retrieved[layer] for layer in layers])  # [layers, pages read]
                # One device-to-host transfer per question: page numbers with their first and last frames.
                rows = torch.cat([pages.unsqueeze(-1), a.memory.page_frames(layers, pages)], dim=-1).tolist()
                self.store.record_retrieval(params.request_id, {
                    "pages": {layer: [(first, last) for _, first, last in row] for layer, row in zip(layers, rows)},
                    "page_indices": {layer: [page for page, _, _ in row] for layer, row in zip(layers, rows)},
                    "seconds": a.retrieval_seconds})
            return False
        if not a.captured_k:
            return False
        layers = sorted(a.captured_k)
        k = torch.stack([a.captured_k[i] for i in layers])
        v = torch.stack([a.captured_v[i] for i in layers])
        if not self.store.is_open(params.stream_id):
            return False  # closed while this clip or sinks prefix was in flight: nothing to keep
        config = self.store.config(params.stream_id)
        if params.kind == RequestKind.SINKS:
            complete = a.slots.num_computed + a.slots.num_scheduled >= a.slots.num_prompt
            prefix = self.store.gather_sink_chunks(params.request_id, k, v, complete)
            if prefix is None:
                return False  # the rest of the chunked prefix comes with a later step
            memory = StreamMemory.from_sinks(config, *prefix, self.store.axes)
        else:
            if a.memory is None or len(a.scores) != len(layers):
                raise ValueError("the clip was not scored on every layer")
            offsets, records = self.store.adapter.clip_layout(k.shape[1], params.num_frames, a.slots.video_grid,
                                                              a.memory.clips, k.device)
            scores = torch.stack([a.scores[i] for i in layers])
            memory = a.memory.commit_clip(ClipKV(k, v, params.frame_start + offsets, scores, records), _sum_over_ranks)
        self.store.commit(params.stream_id, memory, params.request_id)
        return True


def _blank(a: _Active, attn, k: torch.Tensor) -> None:
    """Zeros in a failed request's context slots on this layer: it must not attend to stale KV."""
    if a.context_slots is None or a.context_slots.numel() == 0:
        return
    try:
        zeros = k.new_zeros(a.context_slots.numel(), attn.num_kv_heads, attn.head_size)
        attn.impl.do_kv_cache_update(attn, zeros, zeros, attn.kv_cache, a.context_slots)
    except Exception:
        logger.exception("LiveVLM: could not blank the context slots of a failed request")


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum a score over tensor-parallel ranks (each holds some KV heads) so every rank decides alike."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x) if get_tensor_model_parallel_world_size() > 1 else x


def _any_slot_mapping(forward_context: "ForwardContext") -> torch.Tensor:
    mapping = forward_context.slot_mapping
    if isinstance(mapping, list):
        mapping = mapping[0]
    if mapping:
        return next(iter(mapping.values()))
    metadata = forward_context.attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0]
    return next(iter(metadata.values())).slot_mapping
