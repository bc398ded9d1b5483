"""The language model's forward pass for a question placed after a given KV context, in plain PyTorch.

The fidelity measures need what vLLM does not hand out: every question query's attention over every
context token, and full next-token distributions under teacher forcing. This recomputes a question
request exactly as a LiveVLM question runs it (context raw keys placed at positions 0..P-1, or on a
multi-axis model at the positions of `docs/positions.md`; the question tokens after them, causal
attention) from the checkpoint's Qwen2 weights, over KV read from a stream's memory snapshot. The
fidelity run checks it against vLLM: over the lossless stream its greedy tokens equal the answer vLLM
decoded.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

import torch


@dataclass
class ForwardResult:
    logits: torch.Tensor             # [n, vocab] next-token logits after each input token
    attention: list[torch.Tensor]    # per layer [n_probe, query heads, P] probabilities on the context slots


class QuestionForward:
    """Qwen2 decoder layers of a LLaVA-OneVision or Qwen2.5-VL checkpoint, run over an explicit KV context."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from safetensors.torch import load_file
        from transformers import AutoConfig, Qwen2ForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        text = getattr(config, "text_config", config)
        with torch.device(device):
            model = Qwen2ForCausalLM(text)
        state = {}
        for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
            for key, value in load_file(path).items():
                name = _language_model_key(key)
                if name is not None:
                    state[name] = value.float()
        if "lm_head.weight" not in state:  # tied embeddings
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
        self.model = model.eval()
        self.device = device
        self.layers = model.model.layers
        self.q_heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(text, "rope_theta", 1e6))
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                         / self.head_dim))
        # Multi-axis RoPE: frequency i rotates by the coordinate on axis `axis_of[i]` (t, h, w sections).
        section = rope.get("mrope_section") or [self.head_dim // 2]
        self.axis_of = torch.cat([torch.full((n,), axis, device=device) for axis, n in enumerate(section)])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE (neox layout) of x [n, heads, D] at `positions` [n], or [3, n] on a multi-axis model."""
        axes = positions.view(-1, positions.shape[-1]).float()
        angles = axes[self.axis_of].T * self.inv_freq[None, :]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.no_grad()
    def run(self, context: list[tuple[torch.Tensor, torch.Tensor]], tokens: list[int], probe_tokens: int = 0,
            placement: tuple[list[torch.Tensor], int] | None = None) -> ForwardResult:
        """Forward `tokens` after per-layer raw context keys / values [P, H, D], placed at `placement` (per
        layer positions [3, P] and the question's first position E: multi-axis models) or at slots 0..P-1.

        Returns the logits after every token and, for the first `probe_tokens` tokens, their attention
        probabilities on the context slots (normalised over context + the causal tokens, as the model sees)."""
        hidden = self.model.model.embed_tokens(torch.tensor(tokens, device=self.device))
        n = hidden.shape[0]
        group = self.q_heads // self.kv_heads
        attention = []
        for index, (layer, (ctx_k, ctx_v)) in enumerate(zip(self.layers, context)):
            p = ctx_k.shape[0]
            if placement is None:
                ctx_positions = torch.arange(p, device=self.device)
                positions = torch.arange(p, p + n, device=self.device)
            else:
                ctx_positions = placement[0][index].to(self.device)
                positions = torch.arange(placement[1], placement[1] + n, device=self.device).expand(3, n)
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = self.rotate(attn.q_proj(x).view(n, self.q_heads, self.head_dim), positions)
            k = self.rotate(attn.k_proj(x).view(n, self.kv_heads, self.head_dim), positions)
            v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim)
            keys = torch.cat([self.rotate(ctx_k.to(self.device).float(), ctx_positions), k])
            values = torch.cat([ctx_v.to(self.device).float(), v])
            # [Hq, n, P + n], grouped query heads share their KV head.
            logits = torch.einsum("qhd,khd->hqk", q, keys.repeat_interleave(group, dim=1)) / math.sqrt(self.head_dim)
            causal = torch.arange(p + n, device=self.device)[None, :] > (torch.arange(n, device=self.device) + p)[:, None]
            probs = logits.masked_fill(causal[None], float("-inf")).softmax(-1)
            if probe_tokens:
                attention.append(probs[:, :probe_tokens, :p].permute(1, 0, 2).cpu())
            out = torch.einsum("hqk,khd->qhd", probs, values.repeat_interleave(group, dim=1)).reshape(n, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = self.model.lm_head(self.model.model.norm(hidden))
        return ForwardResult(logits.float().cpu(), attention)


def _language_model_key(key: str) -> str | None:
    """Checkpoint key of the language model -> the `Qwen2ForCausalLM` key (None for vision/projector).
    LLaVA-OneVision nests the language model (`model.language_model.`); Qwen2.5-VL's hub layout keeps it at
    `model.` beside `visual.`."""
    for prefix, replacement in (("language_model.model.", "model."), ("model.language_model.", "model."),
                                ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
                                ("model.layers.", "model.layers."), ("model.embed_tokens.", "model.embed_tokens."),
                                ("model.norm.", "model.norm.")):
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return None
