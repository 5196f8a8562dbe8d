"""Memory: peak measurement (CUDA allocator or the process's peak RSS) and up-front estimates for saliency runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

GiB = 2**30


def process_peak_rss() -> int | None:
    """The process's peak resident set size in bytes (VmHWM of /proc/self/status), or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Measure:
    """Wall time and peak memory of a block of code on one device.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (kind "cuda_max_allocated"). Elsewhere: the process's
    peak RSS (kind "process_peak_rss"), which also counts everything the process held before the block.
    """

    device: torch.device
    time_s: float = 0.0
    peak_bytes: int | None = None
    kind: str = ""

    def __enter__(self) -> Measure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.kind = "cuda_max_allocated"
        else:
            self.peak_bytes = process_peak_rss()
            self.kind = "process_peak_rss"
        self.time_s = time.perf_counter() - self._t0


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_shape(model) -> dict:
    """Layers, heads, KV heads, head dim, hidden, intermediate and vocabulary sizes read from the config."""
    cfg = _text_config(model)
    H = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    return {
        "layers": int(cfg.num_hidden_layers),
        "heads": H,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or H),
        "head_dim": int(getattr(cfg, "head_dim", None) or hidden // H),
        "hidden": hidden,
        "intermediate": int(getattr(cfg, "intermediate_size", None) or 4 * hidden),
        "vocab": int(cfg.vocab_size),
    }


def estimate_memory(model, num_tokens: int, batch: int = 1, num_steps: int = 64, method: str = "chunked",
                    heads: bool = False, block_budget_bytes: int | None = None) -> dict:
    """Rough peak memory (bytes) of a saliency run, by part; `total` is their sum.

    chunked: weights + one checkpointed hidden state per layer + one layer's recomputed activations + the
    attention block temporaries (sized as the run sizes them: from the free CUDA memory now, or the CPU budget)
    + one loss chunk + the maps. reference: weights + every layer's probabilities,
    kept with their gradients (T x T per head and layer) + full activations + full logits.
    """
    s = model_shape(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    e = next(model.parameters()).element_size()
    B, T, L = batch, num_tokens, s["layers"]
    qkv = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    maps = B * L * num_steps * num_steps * 4 * (1 + (s["heads"] if heads else 0))
    if method == "reference":
        probs = L * B * s["heads"] * T * T * (4 + 2 * e if e < 4 else 8)
        acts = L * B * T * (8 * s["hidden"] + 3 * s["intermediate"] + 2 * qkv) * e
        logits = B * T * s["vocab"] * 4 * 3
        parts = {"weights": weights, "attention_probs_and_grads": probs, "activations": acts, "logits": logits,
                 "maps": maps}
    else:
        from .attention import block_budget, rows_for_budget

        device = next(model.parameters()).device
        if block_budget_bytes is None:
            block_budget_bytes = block_budget(device)
        rows = min(T, rows_for_budget(B, s["heads"], T, block_budget_bytes))
        per_row = B * s["heads"] * T * 4 * 5
        loss_budget = max(64 * 2**20, block_budget_bytes // 2) if device.type == "cuda" else 256 * 2**20
        parts = {
            "weights": weights,
            "checkpoints": B * T * s["hidden"] * e * (L + 3),
            "layer_recompute": B * T * (8 * s["hidden"] + 3 * s["intermediate"] + 3 * qkv) * e
            + B * T * qkv * 4 * 2,  # float32 gradient accumulators of Q, K, V
            "attention_block": rows * per_row,
            "loss_chunk": min(T, max(16, loss_budget // max(B * s["vocab"] * 12, 1))) * B * s["vocab"] * 12,
            "maps": maps,
        }
    parts["total"] = sum(parts.values())
    return parts


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"
