"""vLLM's paged KV cache as StepFlow reads it: one row's keys and values gathered from its blocks.

CPU_ATTN's cache of one layer is [num_blocks, num_kv_heads, block_size, 2 * head_dim]; viewed as
[num_blocks, num_kv_heads, 2 * block_size, head_dim] its first half along dim 2 holds keys, the second values.
Inside a block, the "vec" ISA (x86 without AMX, float32/bfloat16/float16) stores each head's keys transposed,
[head_dim, block_size], and its values plainly, [block_size, head_dim]. Other ISAs (AMX, NEON, ...) pack
differently and are refused with a clear error rather than read wrongly. tests/test_vllm_paged.py checks the
layout against vLLM's own cache writer.
"""

from __future__ import annotations

import torch

from ..errors import StepscopeError

SUPPORTED_ISAS = ("vec",)


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, Hkv, block, 2 * D] -> (key_cache, value_cache), each a [num_blocks, Hkv, block, D] view."""
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)


def check_isa(isa: str | None) -> None:
    if isa not in SUPPORTED_ISAS:
        raise StepscopeError(f"StepFlow reads vLLM's CPU KV cache in the {', '.join(SUPPORTED_ISAS)} layout; this "
                             f"engine uses {isa!r} (an AMX bfloat16 or non-x86 CPU): use dtype float32, or run "
                             "without StepFlow")


def gather_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_len` keys and values of rows whose blocks are `blocks` (int [R, n] or [n] for one row,
    in order; unused trailing entries are read but never past `seq_len` keys).

    key_cache/value_cache: [num_blocks, Hkv, block, D] ("vec" layout). Returns (keys, values) [R, Hkv, seq_len,
    D] (or [Hkv, seq_len, D] for one row).
    """
    one = blocks.dim() == 1
    blocks = blocks[None] if one else blocks
    _, hkv, bs, d = key_cache.shape
    R, n = blocks.shape[0], -(-seq_len // bs)
    ids = blocks[:, :n].reshape(-1).long()
    k = key_cache.index_select(0, ids).reshape(R, n, hkv, d, bs)  # keys transposed per block
    k = k.permute(0, 2, 1, 4, 3).reshape(R, hkv, n * bs, d)[:, :, :seq_len]  # [R, Hkv, S, D]
    v = value_cache.index_select(0, ids).reshape(R, n, hkv, bs, d).permute(0, 2, 1, 3, 4)
    v = v.reshape(R, hkv, n * bs, d)[:, :, :seq_len]
    return (k[0], v[0]) if one else (k, v)
