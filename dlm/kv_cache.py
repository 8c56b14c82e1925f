"""Key/value reuse for block-wise diffusion sampling (Fast-dLLM's approximate cache).

A `fill` pass runs the model on whole rows and stores every layer's keys and values. The
`window` passes that follow run the model only on a few query positions per row (the current
block, and for a prefix cache everything after it); their fresh keys/values replace the stored
ones at those positions, and every other position is read from the store.

This is exact only where the stored entries could not have changed since the fill: with causal
attention the keys of a committed prefix depend on that prefix alone, so a prefix cache
reproduces the uncached model. With bidirectional attention every key depends on the whole row,
so stored entries are stale once tokens of the block are committed; the sampler refills at
every block start, which bounds the staleness to one block (the approximation Fast-dLLM and
dKV-cache measure as harmless).

Window attention has queries at a few positions and keys over the whole row, a shape the
varlen kernels do not take with our layout, so it always runs as SDPA with an explicit
[rows, 1, W, L + 1] boolean mask (small: W query positions), whatever `attn_backend` is; fill
passes use the configured backend.

    cache = KVCache(layout, n_layers)
    model(ids[rows], sub_layout, head=..., cache=cache.fill(rows))
    model(ids_window, window_layout, head=..., cache=cache.window(rows, cols, valid))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.attention import attend
from dlm.attention.layout import AttentionLayout


class KVCache:
    """Per-layer keys/values [B, Hkv, L + 1, D] of the B rows of `layout`. Column L is scratch:
    window entries that are only padding write there, and no query ever attends to it."""

    def __init__(self, layout: AttentionLayout, n_layers: int):
        self.layout = layout  # the full rows: who may attend to whom
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self._rows: torch.Tensor | None = None
        self._target: torch.Tensor | None = None  # window: cache column of each query entry
        self._mask: torch.Tensor | None = None

    def fill(self, rows: torch.Tensor) -> KVCache:
        """Set up the next forward pass: whole rows `rows` (indices into the batch), stored."""
        self._rows, self._target, self._mask = rows, None, None
        return self

    def window(self, rows: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor) -> KVCache:
        """Set up the next forward pass: query positions `cols` [R, W] of rows `rows` [R]. Entries
        with `valid` False are padding of a shorter window: computed, never written or read."""
        if any(k is None for k in self.keys):
            raise ValueError("KVCache.window before any fill: nothing is stored yet")
        L = self.layout.position_ids.shape[1]
        dev = cols.device
        keys = torch.arange(L, device=dev)
        allowed = self.layout.allowed(rows[:, None, None], cols[:, :, None], keys[None, None, :])  # [R, W, L]
        scratch = torch.zeros(*allowed.shape[:2], 1, dtype=torch.bool, device=dev)
        self._rows = rows
        self._target = torch.where(valid, cols, L)
        self._mask = torch.cat([allowed, scratch], dim=-1)[:, None]
        return self

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self, index)

    def attend(
        self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, backend: str
    ) -> torch.Tensor:
        if self._rows is None:
            raise ValueError("KVCache used without fill() or window() before the forward pass")
        if self._target is None:  # fill: normal attention over whole rows, keys/values stored
            self._store(index, k, v)
            return attend(q, k, v, layout, backend=backend)
        stored_k, stored_v = self.keys[index], self.values[index]
        if stored_k is None or stored_v is None:
            raise ValueError(f"KVCache layer {index} has nothing stored: a window pass needs a fill first")
        idx = self._target[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        keys = stored_k[self._rows].scatter_(2, idx, k)  # advanced indexing copies
        values = stored_v[self._rows].scatter_(2, idx, v)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self._mask, enable_gqa=keys.shape[1] != q.shape[1]
        )

    def _store(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        B, L = self.layout.position_ids.shape
        if k.shape[2] != L:
            raise ValueError(f"a fill pass needs whole rows of {L} positions, got {k.shape[2]}")
        stored_k, stored_v = self.keys[index], self.values[index]
        if stored_k is None or stored_v is None:
            shape = (B, k.shape[1], L + 1, k.shape[-1])
            stored_k = self.keys[index] = k.new_zeros(shape)
            stored_v = self.values[index] = v.new_zeros(shape)
        stored_k[self._rows, :, :L] = k
        stored_v[self._rows, :, :L] = v


@dataclass
class LayerKV:
    """One layer's view of a KVCache: what a model's attention module calls instead of `attend`."""

    cache: KVCache
    index: int

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, backend: str
    ) -> torch.Tensor:
        return self.cache.attend(self.index, q, k, v, layout, backend)


__all__ = ["KVCache", "LayerKV"]
