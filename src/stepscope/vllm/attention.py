"""StepFlow's attention for rows of a vLLM batch: OEB recomputed over a row's keys, SMI added to its output.

Both go through the pure mathematics of `stepscope.flow.functional` (docs/method.md §5), in its probability form,
as the transformers engine's decoding path does: each query's softmax over the keys it sees (a GPT-OSS sink as one
more logit whose mass belongs to O), the keys' group indicators (`key_groups`), and `oeb_reweight`; SMI adds
`step_momentum` of the window. Scores and probabilities are float32.

- `oeb_rows`: Q queries of one row over its gathered keys (prefill and chunked prefill: each query is a row of
  the probability form, with its own groups and target);
- `oeb_decode_blocks`: the decoding rows of a forward (one query each) over their cache blocks as the paged
  cache holds them (`paged.*Layout.blocks`): scores block by block in one batched product, no per-row copy of
  the keys into one contiguous tensor.

Engine-free: tests/test_vllm_units.py checks both against a dense softmax reference and each other.
"""

from __future__ import annotations

import torch

from ..flow.functional import hidden_keys, key_groups, oeb_reweight, step_momentum

BLOCK_ELEMS = 1 << 22  # most (head, query, key) scores one block of queries holds


def segment_onehot(codes: torch.Tensor) -> torch.Tensor:
    """Each key's segment (codes [..., K] long: 0 question, 1 thinking, 2 summary) one-hot, float32 [..., K, 3]."""
    return torch.nn.functional.one_hot(codes, 3).to(torch.float32)


def _bridged(s: torch.Tensor, hidden: torch.Tensor, groups, sinks: torch.Tensor | None):
    """Scores s [B, H, K] float32 (contiguous, overwritten), hidden [B, 1, K] -> `oeb_reweight` of their
    softmax (with a sink logit per head when given)."""
    s.masked_fill_(hidden, float("-inf"))
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:
        B, H, _ = s.shape
        p = torch.softmax(torch.cat([s, sinks.to(torch.float32).view(1, H, 1).expand(B, H, 1)], -1), dim=-1)[..., :-1]
    return oeb_reweight(p, *groups)


def oeb_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, qpos: torch.Tensor,
             gidx: torch.Tensor, tau: torch.Tensor, codes: torch.Tensor, scale: float, window: int | None = None,
             sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridged attention of Q queries of one row.

    query [Q, H, D]; keys/values [Hkv, S, D] (the row's keys 0..S-1); qpos [Q] long (each query's position;
    it sees keys <= qpos, and > qpos - window in a sliding-window layer); gidx [Q, 2] long; tau [Q] float32
    (0: OEB leaves the query alone); codes [S] long; sinks [H] or None (GPT-OSS).
    Returns (out [Q, H, D] float32, fired [Q, H], masses before [Q, H, 2], after [Q, H, 2]).
    """
    Q, H, D = query.shape
    hkv, S = keys.shape[0], keys.shape[1]
    n_rep = H // hkv
    k_t = keys.to(torch.float32).transpose(-1, -2)  # [Hkv, D, S]
    v = values.to(torch.float32)
    onehot = segment_onehot(codes)  # [S, 3]
    step = max(1, BLOCK_ELEMS // max(1, H * S))
    parts = []
    for a in range(0, Q, step):
        q = query[a:a + step].to(torch.float32)
        n = q.shape[0]
        # one plain batched product per kv head: its n_rep * n queries against its keys
        q = q.view(n, hkv, n_rep, D).permute(1, 2, 0, 3).reshape(hkv, n_rep * n, D)
        s = (torch.bmm(q, k_t) * scale).view(hkv, n_rep, n, S).permute(2, 0, 1, 3).reshape(n, H, S)
        groups = key_groups(onehot.expand(n, S, 3), gidx[a:a + n], tau[a:a + n])
        hidden = hidden_keys(qpos[a:a + n, None], torch.arange(S, device=qpos.device), window)
        p, fired, p_bs, factors = _bridged(s, hidden, groups, sinks)
        out = torch.bmm(p.view(n, hkv, n_rep, S).permute(1, 2, 0, 3).reshape(hkv, n_rep * n, S), v)
        parts.append((out.view(hkv, n_rep, n, D).permute(2, 0, 1, 3).reshape(n, H, D), fired[..., 0], p_bs,
                      p_bs * factors))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def oeb_decode_blocks(query: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor,
                      groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scale: float,
                      sinks: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bridged attention of R decoding rows (one query each) over their n cache blocks of `bs` keys each.

    query [R, H, D]; keys_t [R * n * Hkv, D, bs] (each block's keys of one kv head, transposed; any strides a
    batched matmul takes) and values [R * n * Hkv, bs, D], in (row, block, kv head) order, as
    `paged.*Layout.blocks` hands them out; hidden [R, 1, n * bs] bool: keys the row's query does not see
    (`functional.hidden_keys`; every slot past a row's keys among them); groups: `functional.key_groups` of the
    rows over the n * bs keys; sinks [H] or None. Values of hidden slots must be finite (they are weighted by 0).
    Returns (out [R, H, D] float32, fired [R, H, 1], masses before [R, H, 2], factors [R, H, 2]).
    """
    R, H, D = query.shape
    N, _, bs = keys_t.shape
    Sp = hidden.shape[-1]
    n = Sp // bs
    hkv = N // (R * n)
    n_rep = H // hkv
    q = (query.to(torch.float32) * scale).view(R, 1, hkv, n_rep, D).expand(R, n, hkv, n_rep, D)
    s = torch.bmm(q.reshape(N, n_rep, D), keys_t.to(torch.float32))  # [R * n * Hkv, n_rep, bs]
    s = s.view(R, n, hkv, n_rep, bs).permute(0, 2, 3, 1, 4).reshape(R, H, Sp)
    p, fired, p_bs, factors = _bridged(s, hidden, groups, sinks)
    p = p.view(R, hkv, n_rep, n, bs).permute(0, 3, 1, 2, 4).reshape(N, n_rep, bs)
    out = torch.bmm(p, values.to(torch.float32)).view(R, n, H, D).sum(1)
    return out, fired, p_bs, factors


def smi_delta(values: torch.Tensor, ws: int, we: int, qpos: int, alpha: float, n_rep: int,
              window: int | None = None) -> torch.Tensor | None:
    """alpha times the mean value vector of keys [ws, we) (only those the query at `qpos` sees in a
    sliding-window layer), per query head: values [Hkv, S, D] -> [H, D] float32, or None when no key is seen."""
    lo = max(ws, qpos - window + 1) if window else ws
    if lo >= we:
        return None
    return step_momentum(values[:, lo:we], alpha).repeat_interleave(n_rep, dim=0)
