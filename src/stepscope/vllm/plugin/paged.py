"""vLLM's paged KV cache as StepFlow reads it: one layout object per attention backend, each able to hand out the
layer's key and value views and to gather rows' keys and values from their blocks.

- `CpuVecLayout` (CPU_ATTN, vLLM's CPU backend): one layer's cache is [num_blocks, num_kv_heads, block_size,
  2 * head_dim]; viewed as [num_blocks, num_kv_heads, 2 * block_size, head_dim] its first half along dim 2 holds
  keys, the second values. Inside a block, the "vec" ISA (x86 without AMX, float32/bfloat16/float16) stores each
  head's keys transposed, [head_dim, block_size], and its values plainly, [block_size, head_dim]. Other ISAs (AMX,
  NEON, ...) pack differently and are refused with a clear error rather than read wrongly. tests/test_vllm_units.py
  checks the layout against vLLM's own cache writer.
- `FlashLayout` (FLASH_ATTN, vLLM's CUDA backend): the same [num_blocks, num_kv_heads, block_size, 2 * head_dim]
  tensor, read as FlashAttention's forward reads it, `kv_cache.transpose(1, 2).split(head_dim, -1)`: key and value
  views [num_blocks, block_size, num_kv_heads, head_dim] (keys in the first half of the last dim). The fused Triton
  kernel (`stepscope.core.kernels.oeb_decode_paged`) reads these views in place; `gather` is the torch path (prefill
  rows, SMI, and decoding where the kernel is unavailable).

`gather` returns the first `seq_len` keys and values of rows whose blocks are `blocks` (int [R, n] or [n] for
one row, in order; entries past `seq_len` keys are read but their keys are never used): (keys, values)
[R, Hkv, seq_len, D] (or [Hkv, seq_len, D] for one row). `blocks(kv_cache, ids)` copies the cache blocks `ids`
(long [P]) out with one index_select and returns views of that copy as the decoding path
(`core.oeb.oeb_decode_blocks`) multiplies them: (keys_t [P * Hkv, D, block], values [P * Hkv, block, D]).
"""

from __future__ import annotations

import torch

from ...errors import StepscopeError

SUPPORTED_ISAS = ("vec",)


def _rows(blocks: torch.Tensor, seq_len: int, block_size: int) -> tuple[bool, torch.Tensor, int, int]:
    one = blocks.dim() == 1
    blocks = blocks[None] if one else blocks
    n = -(-seq_len // block_size)
    return one, blocks[:, :n].reshape(-1).long(), blocks.shape[0], n


class CpuVecLayout:
    """CPU_ATTN's cache in the "vec" ISA (see the module docstring)."""

    name = "CPU_ATTN"
    paged_kernel = False

    def __init__(self, isa: str | None) -> None:
        self.isa = isa

    def check(self) -> None:
        if self.isa not in SUPPORTED_ISAS:
            raise StepscopeError(f"StepFlow reads vLLM's CPU KV cache in the {', '.join(SUPPORTED_ISAS)} layout; "
                                 f"this engine uses {self.isa!r} (an AMX bfloat16 or non-x86 CPU): use dtype "
                                 "float32, or run without StepFlow")

    @staticmethod
    def views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_blocks, Hkv, block, 2 * D] -> (key_cache, value_cache), each a [num_blocks, Hkv, block, D] view."""
        nb, hkv, bs, _ = kv_cache.shape
        return kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)

    @staticmethod
    def gather(key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        _, hkv, bs, d = key_cache.shape
        one, ids, R, n = _rows(blocks, seq_len, bs)
        k = key_cache.index_select(0, ids).reshape(R, n, hkv, d, bs)  # keys transposed per block
        k = k.permute(0, 2, 1, 4, 3).reshape(R, hkv, n * bs, d)[:, :, :seq_len]  # [R, Hkv, S, D]
        v = value_cache.index_select(0, ids).reshape(R, n, hkv, bs, d).permute(0, 2, 1, 3, 4)
        v = v.reshape(R, hkv, n * bs, d)[:, :, :seq_len]
        return (k[0], v[0]) if one else (k, v)

    @staticmethod
    def blocks(kv_cache: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, hkv, bs, d2 = kv_cache.shape
        g = kv_cache.index_select(0, ids).view(ids.numel() * hkv, bs * d2)  # per (block, head): K^T, then V
        half = bs * d2 // 2
        return g[:, :half].view(-1, d2 // 2, bs), g[:, half:].view(-1, bs, d2 // 2)


class FlashLayout:
    """FLASH_ATTN's cache (see the module docstring). `kernel`: decoding rows go through the fused paged kernel
    where it can run (a CUDA device, or Triton's interpreter); False keeps them on the torch path."""

    name = "FLASH_ATTN"

    def __init__(self, kernel: bool = True) -> None:
        self.paged_kernel = kernel

    def check(self) -> None:
        pass

    @staticmethod
    def views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_blocks, Hkv, block, 2 * D] -> (key_cache, value_cache), each a [num_blocks, block, Hkv, D] view."""
        return kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)

    @staticmethod
    def gather(key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        _, bs, hkv, d = key_cache.shape
        one, ids, R, n = _rows(blocks, seq_len, bs)
        k, v = (c.index_select(0, ids).reshape(R, n * bs, hkv, d).transpose(1, 2)[:, :, :seq_len]
                for c in (key_cache, value_cache))
        return (k[0], v[0]) if one else (k, v)

    @staticmethod
    def blocks(kv_cache: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, hkv, bs, d2 = kv_cache.shape
        g = kv_cache.index_select(0, ids)  # [P, Hkv, block, 2D] (the view FlashAttention transposes)
        d = d2 // 2
        return g[..., :d].transpose(-1, -2).reshape(-1, d, bs), g[..., d:].reshape(-1, bs, d)
