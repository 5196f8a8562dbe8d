"""The reference Step-Saliency: eager attention, every layer's probabilities and their gradients kept; obviously correct.

Memory grows with L * H * T^2, so this is for short traces and for testing the chunked method. It shares no
code with the chunked path beyond model preparation: the model's own eager attention gives `A` (transformers'
`output_attentions`; for GPT-OSS the probabilities over real keys, the sink column dropped), the model's own
forward gives the logits, `torch.autograd.grad` gives dLoss/dA, and pooling is a plain einsum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import attn_implementation
from ..trace import Trace


def reference_loss_weights(trace: Trace, loss: str) -> torch.Tensor:
    """w[p] for predictions p = 0..T-2 (target p + 1), written out from the segments for independence."""
    T = len(trace)
    targets = list(range(1, T))
    if loss == "response":
        targets = [t for t in targets if t >= trace.segments["thinking"][0]]
    elif loss == "summary":
        a, b = trace.segments["summary"]
        targets = [t for t in targets if a <= t < b]
    w = torch.zeros(T - 1, dtype=torch.float64)
    for t in targets:
        w[t - 1] = 1.0 / len(targets)
    return w


def pool_maps(sal: torch.Tensor, trace: Trace, pool: str) -> torch.Tensor:
    """Pool token saliency I = sal [..., T, T] into step maps [..., S, S]: sum (or mean) over token pairs of two steps."""
    S = trace.num_steps
    P = torch.zeros(len(trace), S, dtype=sal.dtype)  # one-hot step membership [T, S]
    for s in trace.steps:
        P[s.token_start:s.token_end, s.index] = 1.0
    M = torch.einsum("ti,...tk,kj->...ij", P, sal, P)
    if pool == "mean":
        n = P.sum(dim=0)
        M = M / (n[:, None] * n[None, :])
    return M


def reference_saliency(model, trace: Trace, loss: str = "all", pool: str = "mean", layers: list[int] | None = None,
                       heads: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """maps [L, S, S] (and head maps [L, H, S, S] or None) of one trace, the brute-force way, in float32 (float64
    for a float64 model).

    The caller puts the model in eval mode with frozen parameters (gradients flow from the embeddings).
    """
    device = model.get_input_embeddings().weight.device
    wide = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    ids = torch.tensor([trace.token_ids], dtype=torch.long, device=device)  # [1, T]
    with attn_implementation(model, "eager"):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
        logits = out.logits[0, :-1].to(wide)  # [T-1, V]
        ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")  # [T-1]
        w = reference_loss_weights(trace, loss).to(device=device, dtype=wide)
        total = (ce * w).sum()
        n_layers = len(out.attentions)
        layers = list(range(n_layers)) if layers is None else layers
        attns = [out.attentions[i] for i in layers]  # each [1, H, T, T]
        grads = torch.autograd.grad(total, attns)
    maps, head_maps = [], []
    for A, G in zip(attns, grads):
        I_h = (A.detach().to(wide) * G.to(wide)).abs()[0].cpu()  # [H, T, T]
        maps.append(pool_maps(I_h.mean(dim=0), trace, pool))
        if heads:
            head_maps.append(pool_maps(I_h, trace, pool))
    return torch.stack(maps), (torch.stack(head_maps) if heads else None)
