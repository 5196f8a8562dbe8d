"""vLLM's paged KV cache layouts built slot by slot from rows' keys and values, for the StepFlow-in-vLLM tests
(tests/test_vllm_units.py checks the CPU layout against vLLM's own cache writer)."""

import torch

BS = 16  # tokens per block


def flash_cache(rows, num_blocks, Hkv, D, dtype, fill=float("nan")):
    """FLASH_ATTN's cache [num_blocks, Hkv, block, 2D] holding each row's (keys, values) [Hkv, S, D] in the blocks
    of its block table, written slot by slot as FlashAttention's forward reads it (key_cache[b, slot, h] is
    kv[b, h, slot, :D], value_cache the second half); every other slot holds `fill`."""
    kv = torch.full((num_blocks, Hkv, BS, 2 * D), fill, dtype=dtype)
    for (keys, values), table in rows:
        for pos in range(keys.shape[1]):
            b, slot = int(table[pos // BS]), pos % BS
            for h in range(Hkv):
                kv[b, h, slot, :D] = keys[h, pos]
                kv[b, h, slot, D:] = values[h, pos]
    return kv


def cpu_vec_cache(rows, num_blocks, Hkv, D, dtype, fill=0.0):
    """The same rows in CPU_ATTN's "vec" layout: per block and head, keys transposed [D, block], then values
    [block, D] (what vLLM's CPU cache writer stores: tests/test_vllm_units.py); every other slot holds `fill`."""
    kv = torch.full((num_blocks, Hkv, 2 * BS, D), fill, dtype=dtype)
    for (keys, values), table in rows:
        for pos in range(keys.shape[1]):
            b, slot = int(table[pos // BS]), pos % BS
            for h in range(Hkv):
                kv[b, h, :BS].view(D, BS)[:, slot] = keys[h, pos]
                kv[b, h, BS + slot] = values[h, pos]
    return kv.view(num_blocks, Hkv, BS, 2 * D)
