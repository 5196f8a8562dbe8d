"""Step Momentum Injection as pure functions (docs/method.md §5): at the first token of a new thinking step, in
an SMI layer, each head's attention output gains alpha times the mean value vector of the last w tokens of the
step just completed (only the window keys the query sees, in a sliding-window layer).

Forms: `smi_inject` adds the momentum of many fires of a padded batch at once (the transformers engine; the
window mean as pair weights alpha / n from `smi_weights`); `smi_delta` is one fire of one row over its gathered
values (vLLM). `smi_window` says which tokens a completed step hands on.
"""

from __future__ import annotations

import numpy as np
import torch


def smi_window(step_start: int, step_end: int, window: int | str) -> tuple[int, int]:
    """The token range whose values SMI averages for a completed step [step_start, step_end): its last
    `window` tokens, or the whole step for window="step"."""
    if window == "step":
        return step_start, step_end
    return max(step_start, step_end - int(window)), step_end


def step_momentum(window_values: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha times the mean value vector of a window: [..., w, D] -> [..., D] (float32)."""
    return alpha * window_values.to(torch.float32).mean(dim=-2)


def smi_weights(fire_qabs: np.ndarray, pair_fire: np.ndarray, pair_k: np.ndarray, window: int | None,
                alpha: float) -> np.ndarray:
    """alpha / (number of window keys the query sees) for every (fire, key) pair; 0 for a hidden key.

    In a sliding-window layer only the window keys the fire's query can see count (ours): it keeps cached
    decoding (whose cache has dropped older keys) and one uncached forward identical."""
    valid = np.ones(len(pair_k), dtype=bool)
    if window:
        valid = pair_k > fire_qabs[pair_fire] - window
    count = np.bincount(pair_fire, weights=valid, minlength=len(fire_qabs))
    return np.where(valid, alpha / np.maximum(count[pair_fire], 1.0), 0.0).astype(np.float32)


def smi_inject(out: torch.Tensor, value: torch.Tensor, fires: torch.Tensor, pair_fire: torch.Tensor,
               pair_kidx: torch.Tensor, pair_weight: torch.Tensor, num_fires: int) -> torch.Tensor:
    """out [B, Q, H, D] plus alpha * window mean of values at each fire (row, query). Out of place, so that a
    kernel that saved its output for backward is not disturbed."""
    B, Q, H, D = out.shape
    Hkv = value.shape[1]
    fire_b = fires[0]
    vals = value[fire_b[pair_fire], :, pair_kidx, :].to(torch.float32)  # [P, Hkv, D]
    mom = torch.zeros(num_fires, Hkv, D, dtype=torch.float32, device=out.device).index_add_(
        0, pair_fire, vals * pair_weight[:, None, None])  # [F, Hkv, D]: alpha * window mean
    delta = mom.to(out.dtype)[:, :, None, :].expand(num_fires, Hkv, H // Hkv, D).reshape(num_fires, H, D)
    return out.index_put((fire_b, fires[1]), delta, accumulate=True)


def smi_delta(values: torch.Tensor, ws: int, we: int, qpos: int, alpha: float, n_rep: int,
              window: int | None = None) -> torch.Tensor | None:
    """alpha times the mean value vector of keys [ws, we) (only those the query at `qpos` sees in a
    sliding-window layer), per query head: values [Hkv, S, D] -> [H, D] float32, or None when no key is seen."""
    lo = max(ws, qpos - window + 1) if window else ws
    if lo >= we:
        return None
    return step_momentum(values[:, lo:we], alpha).repeat_interleave(n_rep, dim=0)
