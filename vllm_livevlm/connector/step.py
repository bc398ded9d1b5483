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
from vllm_livevlm.memory import retrieval
from vllm_livevlm.memory.stream import ClipKV, StreamMemory

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

    from vllm_livevlm.connector.store import SessionStore


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

    def slots(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(start, stop, device=device)
        blocks = torch.tensor(self.block_ids, dtype=torch.long, device=device)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass
class _Active:
    slots: RequestSlots
    rows: slice
    memory: StreamMemory | None
    fill_context: bool
    captured_k: dict[int, torch.Tensor] = field(default_factory=dict)
    captured_v: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    scored_context_k: dict[int, torch.Tensor] = field(default_factory=dict)
    context_slots: torch.Tensor | None = None
    retrieved: dict[int, list[int]] = field(default_factory=dict)  # question: pages read per layer
    retrieval_seconds: float = 0.0


class StepRequests:
    def __init__(self, requests: list[RequestSlots], store: "SessionStore", forward_context: "ForwardContext"):
        self.store = store
        slot_mapping = _any_slot_mapping(forward_context)
        self.device = slot_mapping.device
        self.active: list[_Active] = []
        for req in requests:
            first = req.slots(req.num_computed, req.num_computed + 1, self.device)
            hit = (slot_mapping == first).nonzero()
            if hit.numel() == 0:
                continue  # not in this forward (e.g. a dummy or partial batch)
            row = int(hit[0, 0])
            params = req.params
            memory = None
            problem = None
            if not store.is_open(params.stream_id) and not store.holds(params.stream_id, params.version):
                continue  # its stream was closed (and, for a clip or question, its pin released): output unused
            if params.kind != RequestKind.SINKS:
                memory = store.snapshot(params.stream_id, params.version)
                expected = (memory.clip_context_tokens if params.kind == RequestKind.CLIP
                            else memory.question_context_tokens)
                if params.context_tokens != expected:
                    problem = (f"{params.context_tokens} placeholder tokens but version {params.version} "
                               f"needs {expected}")
            if params.kind == RequestKind.CLIP and req.num_computed + req.num_scheduled != req.num_prompt:
                problem = (f"a clip must be prefilled in one step ({req.num_prompt - req.num_computed} tokens, "
                           f"{req.num_scheduled} scheduled): raise --max-num-batched-tokens and keep "
                           "--disable-chunked-mm-input")
            if problem is not None:
                # Never take the engine down for one stream: the stream fails, its requests report it.
                store.fail(params.stream_id, f"request {params.request_id}: {problem}")
                continue
            fill = params.kind != RequestKind.SINKS and req.num_computed == params.context_tokens
            active = _Active(req, slice(row, row + req.num_scheduled), memory, fill)
            if fill:
                active.context_slots = req.slots(0, params.context_tokens, self.device)
            self.active.append(active)

    # ---- per layer, called by LiveVLMQwen2Attention ---------------------------------------------------------
    def before_attention(self, layer: int, attn, rotary_emb, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> None:
        heads, dim = attn.num_kv_heads, attn.head_size
        for a in self.active:
            kind = a.slots.params.kind
            if kind in (RequestKind.SINKS, RequestKind.CLIP):
                a.captured_k[layer] = k[a.rows].reshape(-1, heads, dim).clone()
                a.captured_v[layer] = v[a.rows].reshape(-1, heads, dim).clone()
            if not a.fill_context or a.slots.params.context_tokens == 0:
                continue
            assert a.memory is not None and a.context_slots is not None
            if kind == RequestKind.CLIP:
                ctx_k, ctx_v = a.memory.clip_context(layer)
            else:
                ctx_k, ctx_v = a.memory.question_context(layer, self._retrieve(a, layer, attn, q))
            rotated = ctx_k.reshape(ctx_k.shape[0], heads * dim).clone()
            positions = torch.arange(rotated.shape[0], device=rotated.device)
            rotary_emb(positions, rotated, None)  # rotate once from raw, in place, same kernel as the model
            rotated = rotated.view(-1, heads, dim)
            attn.impl.do_kv_cache_update(attn, rotated, ctx_v.contiguous(), attn.kv_cache, a.context_slots)
            if kind == RequestKind.CLIP:
                start, stop = a.memory.scored_context_range()
                a.scored_context_k[layer] = rotated[start:stop]

    def _retrieve(self, a: _Active, layer: int, attn, q: torch.Tensor) -> torch.Tensor | None:
        """PaR for one question and layer: the long-term token indices to place (None: all of them)."""
        assert a.memory is not None
        layout = a.memory.page_layout
        if layout.reads_everything:
            a.retrieved[layer] = list(range(layout.num_pages))
            return None
        start = time.perf_counter()
        query = retrieval.average_query(q[a.rows].reshape(-1, attn.num_heads, attn.head_size), attn.num_kv_heads)
        scores = _sum_over_ranks(retrieval.page_scores(query, a.memory.ltm_summary[layer]))
        pages = retrieval.top_pages(scores, layout.full_pages_read)
        a.retrieved[layer] = pages.tolist() + ([layout.num_full_pages] if layout.tail_tokens else [])
        index = retrieval.token_index(pages, layout)
        a.retrieval_seconds += time.perf_counter() - start
        return index

    def after_rotary(self, layer: int, attn, q: torch.Tensor, k: torch.Tensor) -> None:
        """Vision-to-vision scores of a clip: its last vision queries against all cached vision keys."""
        heads, dim = attn.num_kv_heads, attn.head_size
        for a in self.active:
            if a.slots.params.kind != RequestKind.CLIP:
                continue
            clip_q = q[a.rows].reshape(-1, attn.num_heads, dim)
            clip_k = k[a.rows].reshape(-1, heads, dim)
            context_k = a.scored_context_k.get(layer, clip_k[:0])
            assert a.memory is not None
            a.scores[layer] = vision_scores(clip_q, clip_k, context_k, a.memory.config.score_queries,
                                            attn.impl.scale)

    # ---- after the last layer --------------------------------------------------------------------------------
    def commit(self) -> list[str]:
        committed = []
        for a in self.active:
            params = a.slots.params
            if params.kind == RequestKind.QUESTION:
                if a.retrieved:
                    assert a.memory is not None
                    self.store.record_retrieval(params.request_id, {
                        "pages": {layer: a.memory.page_frames(layer, pages) for layer, pages in a.retrieved.items()},
                        "page_indices": dict(a.retrieved), "seconds": a.retrieval_seconds})
                continue
            if not a.captured_k:
                continue
            layers = sorted(a.captured_k)
            k = torch.stack([a.captured_k[i] for i in layers])
            v = torch.stack([a.captured_v[i] for i in layers])
            if not self.store.is_open(params.stream_id):
                continue  # closed while this clip or sinks prefix was in flight: nothing to keep
            config = self.store.config(params.stream_id)
            if params.kind == RequestKind.SINKS:
                complete = a.slots.num_computed + a.slots.num_scheduled >= a.slots.num_prompt
                prefix = self.store.gather_sink_chunks(params.request_id, k, v, complete)
                if prefix is None:
                    continue  # the rest of the chunked prefix comes with a later step
                memory = StreamMemory.from_sinks(config, *prefix)
            else:
                assert a.memory is not None
                num_tokens = k.shape[1]
                per_frame = (num_tokens - 1) // params.num_frames  # one newline token closes a video
                offsets = torch.clamp(torch.arange(num_tokens, device=k.device) // per_frame, max=params.num_frames - 1)
                scores = torch.stack([a.scores[i] for i in layers])
                memory = a.memory.commit_clip(ClipKV(k, v, params.frame_start + offsets, scores),
                                              _sum_over_ranks)
            self.store.commit(params.stream_id, memory)
            committed.append(params.stream_id)
        return committed


def vision_scores(clip_q: torch.Tensor, clip_k: torch.Tensor, context_k: torch.Tensor, num_queries: int,
                  scale: float) -> torch.Tensor:
    """Scores [n_context + T, H] per KV head: softmax attention of the clip's last `num_queries` vision
    queries (the trailing newline token excluded) over the context vision keys and the clip's keys
    (causal inside the clip), averaged over those queries and the query heads of each KV head."""
    num_tokens, num_heads, dim = clip_q.shape
    kv_heads = clip_k.shape[1]
    last = num_tokens - 1  # the newline token that closes the video
    first = max(last - num_queries, 0)
    queries = clip_q[first:last].float()                          # [r, Hq, D]
    keys = torch.cat([context_k, clip_k]).float()                 # [n, H, D]
    keys = keys.repeat_interleave(num_heads // kv_heads, dim=1)   # [n, Hq, D]
    logits = torch.einsum("rhd,nhd->hrn", queries, keys) * scale  # [Hq, r, n]
    n_context = context_k.shape[0]
    query_index = torch.arange(first, last, device=clip_q.device)
    key_index = torch.arange(num_tokens, device=clip_q.device)
    future = key_index.view(1, -1) > query_index.view(-1, 1)      # [r, T]
    logits[:, :, n_context:].masked_fill_(future, float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)                    # [Hq, n]
    return probs.view(kv_heads, num_heads // kv_heads, -1).mean(dim=1).transpose(0, 1).contiguous()


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
