"""`StreamMemory`: one immutable snapshot of a stream's KV memory on the worker.

Layout (spec, "Vocabulary"): sinks (the chat prefix), long-term memory (LTM; compressed by VSB, per layer
or per KV head its own token set) and short-term memory (STM; the most recent frames, uncompressed).
Keys are stored raw (pre-RoPE) so they can be placed at any position by rotating them once.
Every commit returns a new snapshot and never mutates tensors of the old one, so a question pinned to a
version keeps a consistent view while later clips are ingested.

Shapes: L layers, H KV heads, D head dim; K/V are [L, n, H, D]; per-token scores [L, n, H];
LTM token ids and frames are [L, H, n] (per KV head: with per-layer selection all heads agree); position
records (multi-axis models, `docs/positions.md`) [L, H, n, A] and [m, A], A = 0 on 1-D models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace

import torch

from vllm_livevlm.config import LiveVLMConfig
from vllm_livevlm.memory.positions import place, placement_extent
from vllm_livevlm.memory.retrieval import PageLayout, page_summaries
from vllm_livevlm.memory.vsb import VisionSinkBucketing
from vllm_livevlm.model.adapter import RECORD_AXES, TEXT_GROUP

MAX_GRID_SIDE = 4096  # rows or columns of a merged video grid an imported record may name

Reduce = Callable[[torch.Tensor], torch.Tensor]
COUNTERS = ("frames_seen", "clips", "tokens_seen", "ltm_candidates")  # a snapshot's counters (exports carry them)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def held_bytes(memories: Iterable["StreamMemory"]) -> int:
    """Bytes of the distinct storages the snapshots keep alive: snapshots of one stream share tensors (the
    sinks), and a view keeps its whole storage, so tensors are counted by storage, not by shape."""
    storages = {}
    for memory in memories:
        for tensor in memory.tensors:
            storage = tensor.untyped_storage()
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@dataclass(frozen=True)
class ClipKV:
    """What one clip prefill produced for the memory: raw keys, values and the refreshed scores."""

    k: torch.Tensor          # [L, T, H, D] raw keys of the clip's tokens
    v: torch.Tensor          # [L, T, H, D]
    frames: torch.Tensor     # [T] stream frame index of each clip token
    scores: torch.Tensor     # [L, n_scored, H]: scores of the scored context vision tokens, then the clip's
    pos: torch.Tensor | None = None  # [T, A] position record of each clip token (None: A = 0, a 1-D model)


@dataclass(frozen=True)
class StreamMemory:
    config: LiveVLMConfig
    version: int
    sinks_k: torch.Tensor    # [L, S, H, D]
    sinks_v: torch.Tensor
    ltm_k: torch.Tensor      # [L, n, H, D]
    ltm_v: torch.Tensor
    ltm_score: torch.Tensor  # [L, n, H]
    ltm_ids: torch.Tensor    # [L, H, n] stream token id of each kept token
    ltm_frames: torch.Tensor  # [L, H, n]
    ltm_pos: torch.Tensor    # [L, H, n, A]
    ltm_summary: torch.Tensor  # [L, full pages, H, D] float32 page summary keys (mean raw key)
    stm_k: torch.Tensor      # [L, m, H, D]
    stm_v: torch.Tensor
    stm_score: torch.Tensor  # [L, m, H]
    stm_ids: torch.Tensor    # [m]
    stm_frames: torch.Tensor  # [m]
    stm_pos: torch.Tensor    # [m, A]
    frames_seen: int = 0
    clips: int = 0
    tokens_seen: int = 0     # vision tokens ingested (including per-clip newline tokens)
    ltm_candidates: int = 0  # tokens that ever entered LTM
    # E per (clip?, stride), computed once per snapshot: a request's prepare and its first step both ask.
    _extents: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_sinks(cls, config: LiveVLMConfig, k: torch.Tensor, v: torch.Tensor, axes: int = 0) -> "StreamMemory":
        """`axes`: the model's position-record width (0 on 1-D models)."""
        layers, _, heads, dim = k.shape
        empty_kv = k.new_zeros((layers, 0, heads, dim))
        empty_score = torch.zeros((layers, 0, heads), dtype=torch.float32, device=k.device)
        empty_ids = torch.zeros((layers, heads, 0), dtype=torch.long, device=k.device)
        empty_1d = torch.zeros((0,), dtype=torch.long, device=k.device)
        empty_summary = torch.zeros((layers, 0, heads, dim), dtype=torch.float32, device=k.device)
        return cls(config, 1, k, v, ltm_k=empty_kv, ltm_v=empty_kv, ltm_score=empty_score, ltm_ids=empty_ids,
                   ltm_frames=empty_ids, ltm_pos=empty_ids.unsqueeze(-1).expand(-1, -1, -1, axes).contiguous(),
                   ltm_summary=empty_summary, stm_k=empty_kv, stm_v=empty_kv, stm_score=empty_score,
                   stm_ids=empty_1d, stm_frames=empty_1d, stm_pos=empty_1d.view(0, 1).expand(0, axes).contiguous())

    @classmethod
    def from_tensors(cls, config: LiveVLMConfig, version: int, tensors: dict[str, torch.Tensor],
                     counters: dict[str, int], kv_shape: tuple[int, int, int], kv_dtype: torch.dtype) -> "StreamMemory":
        """A snapshot rebuilt from exported tensors (`vllm_livevlm.portable`), refused (ValueError) unless it has
        the shapes of this model (`kv_shape` = layers, KV heads here, head dim; `kv_dtype`) and config and the
        invariants a committed snapshot keeps: an imported stream never holds more than its budget allows."""
        names = [f.name for f in fields(cls) if f.type == "torch.Tensor"]
        if set(tensors) != set(names) or set(counters) != set(COUNTERS):
            raise ValueError(f"a stream's memory is the tensors {names} and the counters {list(COUNTERS)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (version, *counters.values())) \
                or version < 1:
            raise ValueError(f"version {version!r} and counters {counters!r} must be non-negative integers (version >= 1)")
        memory = cls(config, version, **tensors, **counters)
        memory._check_layout(kv_shape, kv_dtype)
        return memory

    def _check_layout(self, kv_shape: tuple[int, int, int], kv_dtype: torch.dtype) -> None:
        layers, heads, dim = kv_shape
        s, n, m, axes = self.num_sinks, self.num_ltm, self.num_stm, self.position_axes
        expect = {"sinks_k": ((layers, s, heads, dim), kv_dtype), "sinks_v": ((layers, s, heads, dim), kv_dtype),
                  "ltm_k": ((layers, n, heads, dim), kv_dtype), "ltm_v": ((layers, n, heads, dim), kv_dtype),
                  "ltm_score": ((layers, n, heads), torch.float32), "ltm_ids": ((layers, heads, n), torch.long),
                  "ltm_frames": ((layers, heads, n), torch.long), "ltm_pos": ((layers, heads, n, axes), torch.long),
                  "ltm_summary": ((layers, n // self.config.page_tokens, heads, dim), torch.float32),
                  "stm_k": ((layers, m, heads, dim), kv_dtype), "stm_v": ((layers, m, heads, dim), kv_dtype),
                  "stm_score": ((layers, m, heads), torch.float32), "stm_ids": ((m,), torch.long),
                  "stm_frames": ((m,), torch.long), "stm_pos": ((m, axes), torch.long)}
        for name, (shape, dtype) in expect.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"{name} is {tensor.dtype} {list(tensor.shape)}; this model and config need "
                                 f"{dtype} {list(shape)}")
        budget = self.config.long_term_budget_tokens
        if budget is not None and n > budget:
            raise ValueError(f"{n} long-term tokens, over the config's long_term_budget_tokens={budget}")
        if n + m > self.tokens_seen or self.clips > self.frames_seen:
            raise ValueError(f"the memory keeps {n + m} tokens of {self.tokens_seen} seen, {self.clips} clips of "
                             f"{self.frames_seen} frames: counters and tensors disagree")
        ids, frames = torch.cat([self.ltm_ids.flatten(), self.stm_ids]), torch.cat([self.ltm_frames.flatten(), self.stm_frames])
        first_stm = self.frames_seen - self.config.short_term_frames
        if bool(((ids < 0) | (ids >= self.tokens_seen) | (frames < 0) | (frames >= self.frames_seen)).any()) \
                or bool((self.stm_frames < first_stm).any()):
            raise ValueError("token ids or frame indices lie outside what the stream has seen (or short-term "
                             "memory holds frames older than short_term_frames)")
        if axes not in (0, RECORD_AXES):
            raise ValueError(f"position records have {axes} axes; a model has 0 (1-D RoPE) or {RECORD_AXES}")
        records = torch.cat([self.ltm_pos.flatten(0, 2), self.stm_pos])  # [L*H*n, A], A may be 0
        if axes and bool(((records[:, 0] < 0) | (records[:, 0] >= max(self.clips, 1)) | (records[:, 1] < TEXT_GROUP)
                          | (records[:, 1] >= self.frames_seen) | (records[:, 2:] < 0)
                          | (records[:, 2:] >= MAX_GRID_SIDE)).any()):
            raise ValueError("position records lie outside the stream's clips, frames or a video grid")

    # ---- sizes --------------------------------------------------------------------------------------
    @property
    def num_sinks(self) -> int:
        return self.sinks_k.shape[1]

    @property
    def num_ltm(self) -> int:
        return self.ltm_k.shape[1]

    @property
    def num_stm(self) -> int:
        return self.stm_k.shape[1]

    @property
    def position_axes(self) -> int:
        """Width of the position records (0: a 1-D model, whose placement is by slot)."""
        return self.stm_pos.shape[1]

    @property
    def clip_context_tokens(self) -> int:
        """Tokens placed before a clip's own tokens (`encode_context`)."""
        ltm = self.num_ltm if self.config.encode_context == "all" else 0
        return self.num_sinks + ltm + self.num_stm

    @property
    def page_layout(self) -> PageLayout:
        return PageLayout(self.num_ltm, self.config.page_tokens, self.config.retrieve_ratio)

    @property
    def question_context_tokens(self) -> int:
        """Tokens placed before a question: sinks + retrieved long-term pages + short-term memory."""
        return self.num_sinks + self.page_layout.tokens_read + self.num_stm

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this snapshot keeps alive."""
        return [value for f in fields(self) if isinstance(value := getattr(self, f.name), torch.Tensor)]

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot keeps allocated (its distinct storages, see `held_bytes`)."""
        return held_bytes([self])

    # ---- what a request's context slots receive ---------------------------------------------------------
    def clip_context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys and values [P, H, D] of a clip's context for one layer, in slot order (new tensors: the
        caller may rotate them in place)."""
        parts = [(self.sinks_k, self.sinks_v)]
        if self.config.encode_context == "all":
            parts.append((self.ltm_k, self.ltm_v))
        parts.append((self.stm_k, self.stm_v))
        return (torch.cat([k[layer] for k, _ in parts]), torch.cat([v[layer] for _, v in parts]))

    def question_context(self, layer: int, ltm_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw keys and values of a question's context: sinks, the long-term tokens `ltm_index` (all when
        None), short-term memory. New tensors (the caller may rotate them in place), each written in one pass:
        the retrieved tokens are gathered straight into their slots."""
        return (self._question_part(self.sinks_k, self.ltm_k, self.stm_k, layer, ltm_index),
                self._question_part(self.sinks_v, self.ltm_v, self.stm_v, layer, ltm_index))

    @staticmethod
    def _question_part(sinks: torch.Tensor, ltm: torch.Tensor, stm: torch.Tensor, layer: int,
                       ltm_index: torch.Tensor | None) -> torch.Tensor:
        read = ltm.shape[1] if ltm_index is None else ltm_index.shape[0]
        start, stop = sinks.shape[1], sinks.shape[1] + read
        out = sinks.new_empty((stop + stm.shape[1], *sinks.shape[2:]))
        out[:start] = sinks[layer]
        if ltm_index is None:
            out[start:stop] = ltm[layer]
        else:
            torch.index_select(ltm[layer], 0, ltm_index, out=out[start:stop])
        out[stop:] = stm[layer]
        return out

    # ---- multi-axis positions of a placed context (`docs/positions.md`) ----------------------------------------
    def context_records(self, layer: int, ltm_index: torch.Tensor | None = None) -> torch.Tensor:
        """Position records [n, A] of the non-sink context tokens of one layer in slot order: the long-term
        tokens `ltm_index` (all when None), then short-term memory. Multi-axis models select per layer
        (`per_head_selection` is refused there), so KV head 0 speaks for all heads."""
        ltm = self.ltm_pos[layer, 0]
        if ltm_index is not None:
            ltm = ltm.index_select(0, ltm_index)
        return torch.cat([ltm, self.stm_pos])

    def _reads_ltm(self, clip: bool) -> bool:
        return not clip or self.config.encode_context == "all"

    def context_extent(self, clip: bool, stride: float) -> int:
        """E: the positions the whole context of a clip (`clip`) or question request spans, the largest over
        layers; the slot count P on a 1-D model."""
        if not self.position_axes:
            return self.clip_context_tokens if clip else self.question_context_tokens
        key = (self._reads_ltm(clip), stride)
        if key not in self._extents:
            self._extents[key] = max(
                placement_extent(self.context_records(layer) if key[0] else self.stm_pos, self.num_sinks, stride)
                for layer in range(self.ltm_pos.shape[0]))
        return self._extents[key]

    def context_positions(self, layer: int, clip: bool, ltm_index: torch.Tensor | None, stride: float,
                          extent: int) -> torch.Tensor:
        """Positions [3, P] of the context slots of one layer, right-aligned to `extent` (the request's E)."""
        records = self.context_records(layer, ltm_index) if self._reads_ltm(clip) else self.stm_pos
        return place(records, self.num_sinks, stride, extent)

    def page_frames(self, layers: list[int], pages: torch.Tensor) -> torch.Tensor:
        """First and last stream frame [len(layers), k, 2] of the long-term pages `pages` [len(layers), k] of
        those layers (over all KV heads), in a few device ops: reporting a question's pages costs no host
        round trip per page or layer."""
        frames = self.ltm_frames[layers]                              # [l, H, n], temporal per head
        size = self.config.page_tokens
        pad = -frames.shape[2] % size                                # the partial newest page
        per_page = (*frames.shape[:2], -1, size)
        first = torch.nn.functional.pad(frames, (0, pad), value=self.frames_seen)  # after every frame
        last = torch.nn.functional.pad(frames, (0, pad), value=-1)                # before every frame
        first = first.view(per_page).amin(dim=(1, 3)).gather(1, pages)
        last = last.view(per_page).amax(dim=(1, 3)).gather(1, pages)
        return torch.stack([first, last], dim=-1)

    def scored_context_range(self) -> tuple[int, int]:
        """Slot range of the context vision tokens that a clip's queries score (LTM and/or STM)."""
        start = self.num_sinks
        return start, self.clip_context_tokens

    # ---- ingestion ---------------------------------------------------------------------------------------
    def commit_clip(self, clip: ClipKV, reduce: Reduce = _local) -> "StreamMemory":
        """Add a clip: refresh scores, roll old frames from STM to LTM, compress LTM with VSB.

        `reduce` sums a per-token score over tensor-parallel ranks (each holds some KV heads), so that
        every rank keeps the same tokens."""
        cfg = self.config
        n_ltm, n_stm, n_clip = self.num_ltm, self.num_stm, clip.k.shape[1]
        scored = clip.scores
        if cfg.encode_context == "all":
            ltm_score, scored = scored[:, :n_ltm], scored[:, n_ltm:]
        else:
            ltm_score = self.ltm_score
        stm_score, clip_score = scored[:, :n_stm], scored[:, n_stm:]
        assert clip_score.shape[1] == n_clip, "scores do not match the clip's tokens"

        first_id = self.tokens_seen
        clip_ids = torch.arange(first_id, first_id + n_clip, device=self.stm_ids.device)
        clip_frames = clip.frames.to(self.stm_frames.device)
        # STM is temporal: the oldest tokens (STM's, then the clip's) leave first. One transfer to the host.
        frames_seen = torch.cat([self.stm_frames, clip_frames]).max() + 1
        keep_from = frames_seen - cfg.short_term_frames
        from_stm, from_clip, frames_seen = torch.stack(
            [(self.stm_frames < keep_from).sum(), (clip_frames < keep_from).sum(), frames_seen]).tolist()

        def roll(ltm: torch.Tensor, stm: torch.Tensor, new: torch.Tensor,
                 dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
            """(ltm + the moved tokens, the tokens staying in STM), each freshly allocated at its own size: a
            view into a concatenation of STM and the clip would keep the whole clip alive, uncounted."""
            return (torch.cat([ltm, stm.narrow(dim, 0, from_stm), new.narrow(dim, 0, from_clip)], dim),
                    torch.cat([stm.narrow(dim, from_stm, n_stm - from_stm),
                               new.narrow(dim, from_clip, n_clip - from_clip)], dim))

        layers, heads = clip.k.shape[0], clip.k.shape[2]
        axes = self.position_axes
        clip_pos = clip.pos if clip.pos is not None else clip_ids.view(-1, 1)[:, :0]
        ltm_k, stm_k = roll(self.ltm_k, self.stm_k, clip.k)
        ltm_v, stm_v = roll(self.ltm_v, self.stm_v, clip.v)
        ltm_score, stm_score = roll(ltm_score, stm_score, clip_score)
        moved_ids, stm_ids = roll(self.stm_ids[:0], self.stm_ids, clip_ids, dim=0)
        moved_frames, stm_frames = roll(self.stm_frames[:0], self.stm_frames, clip_frames, dim=0)
        moved_pos, stm_pos = roll(self.stm_pos[:0], self.stm_pos, clip_pos.to(self.stm_pos.device), dim=0)
        ltm = _Ltm(ltm_k, ltm_v, ltm_score,
                   torch.cat([self.ltm_ids, moved_ids.view(1, 1, -1).expand(layers, heads, -1)], 2),
                   torch.cat([self.ltm_frames, moved_frames.view(1, 1, -1).expand(layers, heads, -1)], 2),
                   torch.cat([self.ltm_pos,
                              moved_pos.view(1, 1, moved_pos.shape[0], axes).expand(layers, heads, -1, -1)], 2))
        if cfg.long_term_budget_tokens is not None and ltm.k.shape[1] > cfg.long_term_budget_tokens:
            ltm = ltm.compress(VisionSinkBucketing(cfg.long_term_budget_tokens, cfg.bucket_capacity,
                                                   cfg.score_keep_tokens), cfg.per_head_selection, reduce)
        summary = torch.stack([page_summaries(ltm.k[layer], cfg.page_tokens) for layer in range(layers)])
        return replace(
            self, version=self.version + 1,
            ltm_k=ltm.k, ltm_v=ltm.v, ltm_score=ltm.score, ltm_ids=ltm.ids, ltm_frames=ltm.frames,
            ltm_pos=ltm.pos, ltm_summary=summary, stm_k=stm_k, stm_v=stm_v, stm_score=stm_score, stm_ids=stm_ids,
            stm_frames=stm_frames, stm_pos=stm_pos, frames_seen=frames_seen, clips=self.clips + 1,
            tokens_seen=self.tokens_seen + n_clip, ltm_candidates=self.ltm_candidates + from_stm + from_clip)

    # ---- reporting -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        kept = self.num_sinks + self.num_ltm + self.num_stm
        vision_kept = self.num_ltm + self.num_stm
        return {
            "version": self.version, "frames": self.frames_seen, "clips": self.clips,
            "tokens_seen": self.tokens_seen, "tokens_kept": kept, "sink_tokens": self.num_sinks,
            "long_term_tokens": self.num_ltm, "short_term_tokens": self.num_stm,
            "pages": math.ceil(self.num_ltm / self.config.page_tokens),
            "bytes": self.nbytes,
            "compression_ratio": (self.tokens_seen / vision_kept) if vision_kept else 1.0,
        }


@dataclass(frozen=True)
class _Ltm:
    k: torch.Tensor
    v: torch.Tensor
    score: torch.Tensor
    ids: torch.Tensor
    frames: torch.Tensor
    pos: torch.Tensor  # [L, H, n, A]

    def compress(self, vsb: VisionSinkBucketing, per_head: bool, reduce: Reduce) -> "_Ltm":
        layers, _, heads, dim = self.k.shape
        if per_head:
            keep = vsb.select(self.score.transpose(1, 2))  # [L, H, M]
        else:
            # Summed over KV heads (all ranks): same order as the mean over the layer's heads.
            keep = vsb.select(reduce(self.score.sum(dim=2))).unsqueeze(1).expand(layers, heads, -1)
        token_index = keep.transpose(1, 2)  # [L, M, H]
        kv_index = token_index.unsqueeze(-1).expand(-1, -1, -1, dim)
        pos_index = keep.unsqueeze(-1).expand(-1, -1, -1, self.pos.shape[3])
        return _Ltm(self.k.gather(1, kv_index), self.v.gather(1, kv_index), self.score.gather(1, token_index),
                    self.ids.gather(2, keep), self.frames.gather(2, keep), self.pos.gather(2, pos_index))
