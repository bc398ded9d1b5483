"""An independent, readable plain-PyTorch LiveVLM on the Hugging Face transformers LLaVA-OneVision model.

The yardstick the plugin is checked against: it shares no code with `vllm_livevlm` and imports no vLLM.
It re-implements the whole algorithm of `shared/design/algorithm.md` with explicit tensors:
encoding clips over the compressed context at compact positions, vision-to-vision scores, Vision Sink
Bucketing, the long-term bound, Position-agnostic Retrieval, and greedy answers.

Conventions it shares with the plugin because the spec leaves them open (all marked "ours" there):
a clip's tokens are its frames' tokens plus the newline closing the video; stream token ids count clip
tokens from 0; the score of a token is, per KV head, the mean over the clip's last `score_queries`
vision queries (the newline excluded) and over that head's query heads; per-layer selection uses the sum
over KV heads (per-head selection, `per_head_selection`, each head's own score); the newest partial
long-term page is always read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration


@dataclass
class LayerMemory:
    """One layer's memory: raw keys / values [n, H, D], a score per slot and KV head, and per slot the stream
    token id and frame held by each KV head (the same for every head unless selection is per head)."""

    k: torch.Tensor
    v: torch.Tensor
    score: torch.Tensor
    ids: list[tuple[int, ...]] = field(default_factory=list)
    frames: list[tuple[int, ...]] = field(default_factory=list)

    def take(self, index: list[int]) -> "LayerMemory":
        return LayerMemory(self.k[index], self.v[index], self.score[index],
                           [self.ids[i] for i in index], [self.frames[i] for i in index])

    def take_per_head(self, index: list[list[int]]) -> "LayerMemory":
        """Head h keeps slots `index[h]` (every head the same number): per-head selection."""
        heads = range(len(index))

        def pick(t: torch.Tensor) -> torch.Tensor:
            return torch.stack([t[index[h], h] for h in heads], dim=1)

        def pick_list(values: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
            return [tuple(values[index[h][i]][h] for h in heads) for i in range(len(index[0]))]

        return LayerMemory(pick(self.k), pick(self.v), pick(self.score), pick_list(self.ids), pick_list(self.frames))

    def __add__(self, other: "LayerMemory") -> "LayerMemory":
        return LayerMemory(torch.cat([self.k, other.k]), torch.cat([self.v, other.v]),
                           torch.cat([self.score, other.score]), self.ids + other.ids, self.frames + other.frames)

    def __len__(self) -> int:
        return self.k.shape[0]


def vsb_keep(scores: list[float], budget: int, capacity: int, score_keep: int) -> list[int]:
    """Vision Sink Bucketing, step by step as the spec writes it."""
    n = len(scores)
    if n <= budget:
        return list(range(n))
    buckets = budget // capacity
    bucket_of = [p * buckets // n for p in range(n)]
    by_score = sorted(range(n), key=lambda i: (-scores[i], i))
    kept = set(by_score[:score_keep])
    filled = [0] * buckets
    for i in kept:
        filled[bucket_of[i]] += 1
    for i in by_score[score_keep:]:
        if len(kept) == budget:
            break
        if filled[bucket_of[i]] < capacity:
            kept.add(i)
            filled[bucket_of[i]] += 1
    return sorted(kept)


class ReferenceLiveVLM:
    """LLaVA-OneVision (1-D RoPE: a context slot's position is its index). A model family with another
    video layout or RoPE overrides `encode_clip`, `place`, `extent`, `clip_positions`, `text_positions` and
    `angles` (`qwen25vl_reference.py`)."""

    model_class = LlavaOnevisionForConditionalGeneration

    def __init__(self, model_dir: str, config: dict):
        self.cfg = config
        self.model = self.model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        text = self.model.config.text_config
        self.layers = self.model.model.language_model.layers
        self.q_heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", getattr(text, "rope_theta", 1e6))
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.sinks: list[LayerMemory] = []
        self.ltm: list[LayerMemory] = []
        self.stm: list[LayerMemory] = []
        self.tokens_seen = 0
        self.frames_seen = 0
        self.retrieved: dict[int, list[int]] = {}
        self.answer: list[int] = []

    @classmethod
    def answering(cls, model_dir: str, config: dict, video: np.ndarray, question: str,
                  tokens: int) -> "ReferenceLiveVLM":
        """A reference stream that ingested `video` clip by clip and answered `question` (`.answer`)."""
        ref = cls(model_dir, config)
        ref.open()
        for start in range(0, len(video), config["clip_frames"]):
            ref.append_clip(video[start:start + config["clip_frames"]])
        ref.answer = ref.ask(question, tokens)
        return ref

    # ---- positions (1-D) ----------------------------------------------------------------------------------
    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles [n, D/2] of tokens at `positions` [n]."""
        return positions.float()[:, None] * self.inv_freq[None, :]

    def extent(self, contexts: list[LayerMemory]) -> int:
        """E of a request whose layers may read `contexts` (unused by the 1-D rule: E is each layer's P)."""
        return max(len(context) for context in contexts)

    def place(self, context: LayerMemory, extent: int) -> tuple[torch.Tensor, int]:
        """Positions of a layer's placed context and the first position after it: slots 0..P-1, then P."""
        return torch.arange(len(context)), len(context)

    def text_positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n)

    def clip_positions(self, start: int, n: int) -> torch.Tensor:
        """Positions of the clip just encoded (`encode_clip`), its first token at `start`."""
        return torch.arange(start, start + n)

    # ---- pieces of the transformer, written out ----------------------------------------------------------
    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE (neox layout) of x [n, heads, D] at `positions`."""
        angles = self.angles(positions)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def qkv(self, layer, hidden: torch.Tensor):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n = x.shape[0]
        return (attn.q_proj(x).view(n, self.q_heads, self.head_dim), attn.k_proj(x).view(n, self.kv_heads, self.head_dim),
                attn.v_proj(x).view(n, self.kv_heads, self.head_dim))

    def finish_layer(self, layer, hidden, q_rot, keys, values, first_position: int) -> torch.Tensor:
        """Attention of the new tokens (causal among themselves) over `keys`/`values`, then the MLP."""
        n, total = q_rot.shape[0], keys.shape[0]
        group = self.q_heads // self.kv_heads
        k = keys.repeat_interleave(group, dim=1)
        v = values.repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q_rot, k) / math.sqrt(self.head_dim)
        key_pos = torch.arange(total)
        query_pos = torch.arange(n) + (total - n)
        logits = logits.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        out = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(n, -1)
        hidden = hidden + layer.self_attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self.model.model.language_model.embed_tokens(torch.tensor(ids))

    def encode_clip(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """A clip's input embeddings [n, hidden] and the frame (offset in the clip) of each of its tokens:
        the frames' tokens, then the newline closing the video (the last frame's)."""
        pixels = self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        cfg = self.model.config
        out = self.model.model.get_video_features(pixels.float(), vision_feature_layer=cfg.vision_feature_layer,
                                                  vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        hidden = out.pooler_output[0]
        per_frame = (hidden.shape[0] - 1) // len(frames)
        return hidden, [min(i // per_frame, len(frames) - 1) for i in range(hidden.shape[0])]

    # ---- the algorithm ------------------------------------------------------------------------------------
    @torch.no_grad()
    def open(self, prefix: str = "<|im_start|>user\n") -> None:
        hidden = self.embed_tokens(self.tokenizer.encode(prefix, add_special_tokens=False))
        positions = self.text_positions(0, hidden.shape[0])
        for layer in self.layers:
            q, k, v = self.qkv(layer, hidden)
            none = [(-1,) * self.kv_heads] * len(k)
            self.sinks.append(LayerMemory(k.clone(), v.clone(), torch.zeros(len(k), self.kv_heads), none, none))
            empty = LayerMemory(k[:0].clone(), v[:0].clone(), torch.zeros(0, self.kv_heads))
            self.ltm.append(empty)
            self.stm.append(empty)
            hidden = self.finish_layer(layer, hidden, self.rotate(q, positions), self.rotate(k, positions), v, 0)

    @torch.no_grad()
    def append_clip(self, frames: np.ndarray) -> None:
        cfg = self.cfg
        hidden, offsets = self.encode_clip(frames)
        n = hidden.shape[0]
        ids = list(range(self.tokens_seen, self.tokens_seen + n))
        clip_frames = [self.frames_seen + offset for offset in offsets]
        new_stm = []
        use_ltm = cfg["encode_context"] == "all"
        contexts = [self.sinks[index] + (self.ltm[index] if use_ltm else self.ltm[index].take([])) + self.stm[index]
                    for index in range(len(self.layers))]
        extent = self.extent(contexts)
        for index, layer in enumerate(self.layers):
            context = contexts[index]
            p = len(context)
            placed, start = self.place(context, extent)
            ctx_k = self.rotate(context.k, placed)
            q, k, v = self.qkv(layer, hidden)
            own = self.clip_positions(start, n)
            q_rot, k_rot = self.rotate(q, own), self.rotate(k, own)
            # Vision-to-vision scores: the last r vision queries over the cached vision keys and the clip.
            s = len(self.sinks[index])
            vision_keys = torch.cat([ctx_k[s:], k_rot])
            last = n - 1
            first = max(last - cfg["score_queries"], 0)
            group = self.q_heads // self.kv_heads
            per_head = torch.zeros(len(vision_keys), self.kv_heads, dtype=torch.float64)
            for h in range(self.q_heads):
                logits = q_rot[first:last, h] @ vision_keys[:, h // group].T / math.sqrt(self.head_dim)
                n_ctx = p - s
                for row, query in enumerate(range(first, last)):
                    logits[row, n_ctx + query + 1:] = float("-inf")
                per_head[:, h // group] += logits.double().softmax(-1).mean(0) / group
            scores = per_head.float()
            n_old = len(vision_keys) - n
            if use_ltm:
                self.ltm[index].score = scores[: len(self.ltm[index])]
                self.stm[index].score = scores[len(self.ltm[index]): n_old]
            else:
                self.stm[index].score = scores[:n_old]
            new_stm.append(LayerMemory(k.clone(), v.clone(), scores[n_old:], [(i,) * self.kv_heads for i in ids],
                                       [(f,) * self.kv_heads for f in clip_frames]))
            hidden = self.finish_layer(layer, hidden, q_rot, torch.cat([ctx_k, k_rot]), torch.cat([context.v, v]), p)
        self.tokens_seen += n
        self.frames_seen += len(frames)
        for index in range(len(self.layers)):
            stm = self.stm[index] + new_stm[index]
            old = [i for i, f in enumerate(stm.frames) if f[0] < self.frames_seen - cfg["short_term_frames"]]
            young = [i for i in range(len(stm)) if i not in set(old)]
            ltm = self.ltm[index] + stm.take(old)
            budget = cfg["long_term_budget_tokens"]
            if budget is not None and len(ltm) > budget:
                keep = int(cfg["score_fraction"] * budget)
                if cfg.get("per_head_selection"):  # each KV head ranks by its own score
                    ltm = ltm.take_per_head([vsb_keep(ltm.score[:, h].tolist(), budget, cfg["bucket_capacity"], keep)
                                             for h in range(self.kv_heads)])
                else:
                    ltm = ltm.take(vsb_keep(ltm.score.sum(dim=1).tolist(), budget, cfg["bucket_capacity"], keep))
            self.ltm[index], self.stm[index] = ltm, stm.take(young)

    def kept_ids(self) -> list[list[int]]:
        """Per layer the long-term token ids (of KV head 0: every head's, unless selection is per head)."""
        return [[ids[0] for ids in memory.ids] for memory in self.ltm]

    def kept_ids_per_head(self) -> list[list[list[int]]]:
        return [[[ids[h] for ids in memory.ids] for h in range(self.kv_heads)] for memory in self.ltm]

    @torch.no_grad()
    def ask(self, question: str, max_tokens: int, forced: list[int] | None = None) -> list[int]:
        """The greedy answer; with `forced`, the top-1 token at each step while decoding `forced` instead
        (teacher forcing: compares another implementation's answer token by token)."""
        cfg = self.cfg
        ids = self.tokenizer.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = self.embed_tokens(ids)
        self.retrieved = {}
        size = cfg["page_tokens"]
        extent = self.extent([self.sinks[i] + self.ltm[i] + self.stm[i] for i in range(len(self.layers))])
        for index, layer in enumerate(self.layers):
            q, k, v = self.qkv(layer, hidden)
            ltm = self.ltm[index]
            pages = math.ceil(len(ltm) / size)
            full, tail = len(ltm) // size, len(ltm) % size
            read = min(pages, math.ceil(cfg["retrieve_ratio"] * pages - 1e-9))
            full_read = read - (1 if tail else 0)
            if full_read == full:
                chosen = list(range(full))
            else:
                query = q.mean(0).view(self.kv_heads, -1, self.head_dim).mean(1)            # [H, D]
                summaries = [ltm.k[p * size:(p + 1) * size].mean(0) for p in range(full)]  # [H, D] each
                scores = [float((query * summary).sum()) for summary in summaries]
                chosen = sorted(sorted(range(full), key=lambda p: (-scores[p], p))[:full_read])
            self.retrieved[index] = chosen + ([full] if tail else [])
            token_index = [p * size + t for p in chosen for t in range(size)] + list(range(full * size, len(ltm)))
            context = self.sinks[index] + ltm.take(token_index) + self.stm[index]
            placed, start = self.place(context, extent)
            positions = self.text_positions(start, len(ids))
            keys = torch.cat([self.rotate(context.k, placed), self.rotate(k, positions)])
            values = torch.cat([context.v, v])
            caches.append((keys, values))
            hidden = self.finish_layer(layer, hidden, self.rotate(q, positions), keys, values, start)
        answer: list[int] = []
        next_position = start + len(ids)
        for _ in range(len(forced) if forced else max_tokens):
            logits = self.model.lm_head(self.model.model.language_model.norm(hidden[-1:]))
            token = int(logits[0].argmax())
            answer.append(token)
            hidden = self.embed_tokens([forced[len(answer) - 1] if forced else token])
            position = self.text_positions(next_position, 1)
            for index, layer in enumerate(self.layers):
                q, k, v = self.qkv(layer, hidden)
                keys = torch.cat([caches[index][0], self.rotate(k, position)])
                values = torch.cat([caches[index][1], v])
                caches[index] = (keys, values)
                hidden = self.finish_layer(layer, hidden, self.rotate(q, position), keys, values, next_position)
            next_position += 1
        return answer
