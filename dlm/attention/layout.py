"""How the tokens of a packed batch may attend to each other.

Everything derives from per-token position ids that restart at 0 at every document start,
so a collated batch needs no extra structure. `cu_seqlens` (for the varlen kernels) and
`max_seqlen` are derived from them unless given: deriving them reads a value back from the
device, so the trainer computes them on the host (`dlm.diffusion.host_layout`) and passes them
in; in debug mode (`dlm.debug`) a given `cu_seqlens` is checked against the position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.debug import debug_checks

_MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31 so that products of 32-bit values never overflow int64
_K_SEED, _K_Q, _K_K = 0x2545F491, 0x6C8E9CF5, 0x3C6EF372
_M1, _M2 = 0x7FEB352D, 0x046CA68B


def _mix32(h):
    """A 32-bit integer finaliser (xorshift-multiply) on Python ints or int64 tensors < 2**32."""
    h = h ^ (h >> 16)
    h = (h * _M1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _M2) & _MASK32
    return h ^ (h >> 16)


def future_open(q_idx: torch.Tensor, k_idx: torch.Tensor, key, threshold) -> torch.Tensor:
    """The annealing draw of entry (q, k): open iff hash(key, q, k) < threshold. Pure tensor ops;
    key/threshold may be ints or 0-d tensors (FlexAttention passes tensors so that a new step
    does not recompile its kernel)."""
    h = (q_idx.to(torch.int64) * _K_Q + k_idx.to(torch.int64) * _K_K + key) & _MASK32
    return _mix32(h) < threshold


@dataclass(frozen=True)
class AnnealMask:
    """Causal -> bidirectional annealing (docs/design.md §2): at optimizer step `step`, each
    future entry (q, k > q) of a document is open with probability `p`, drawn from a hash of
    (seed, step, q, k) that is shared by batch rows, heads and layers."""

    seed: int
    step: int
    p: float

    @property
    def key(self) -> int:
        return _mix32(((self.seed * _K_SEED) ^ (self.step + 0x9E37)) & _MASK32)

    @property
    def threshold(self) -> int:
        """Entry open iff hash < threshold; p is quantised to multiples of 2**-32."""
        return min(1 << 32, max(0, int(self.p * (1 << 32))))

    def future_open(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Whether future entry (q, k) is open."""
        return future_open(q_idx, k_idx, self.key, self.threshold)

    @staticmethod
    def schedule(seed: int, step: int, anneal_steps: int) -> AnnealMask | None:
        """The mask for `step`, or None once annealing is over (p = 1: plain bidirectional)."""
        if anneal_steps <= 0 or step + 1 >= anneal_steps:
            return None
        return AnnealMask(seed=seed, step=step, p=(step + 1) / anneal_steps)


def _cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """[S+1] int32 segment boundaries over the flattened tokens of a [B, L] start mask."""
    flat = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    return torch.cat([flat, flat.new_tensor([starts.numel()])]).to(torch.int32)


@dataclass
class AttentionLayout:
    """Attention structure of a [B, L] batch.

    position_ids: [B, L] int64, 0 at each document start (index 0 always starts a segment).
    doc_ids: [B, L] int64, segment index within the row.
    cu_seqlens: [S+1] int32 over the flattened B*L tokens (may hold zero-length padding segments).
    max_seqlen: longest segment.
    causal: AR mode (the original model). anneal: partial future visibility (bidirectional only).
    """

    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    causal: bool = False
    anneal: AnnealMask | None = None

    @staticmethod
    def from_position_ids(
        position_ids: torch.Tensor,
        causal: bool = False,
        anneal: AnnealMask | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> AttentionLayout:
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, L], got {tuple(position_ids.shape)}")
        if causal and anneal is not None:
            raise ValueError("an annealing mask only applies to bidirectional attention")
        starts = position_ids == 0
        starts[:, 0] = True
        doc_ids = starts.long().cumsum(dim=1) - 1
        if cu_seqlens is None:
            cu_seqlens = _cu_seqlens(starts)
        elif debug_checks():
            derived = _cu_seqlens(starts).to(cu_seqlens.device)
            if not torch.equal(torch.unique_consecutive(cu_seqlens.to(torch.int32)), derived):
                raise ValueError(
                    f"cu_seqlens {cu_seqlens.tolist()} do not match the position ids' segments {derived.tolist()}"
                )
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        return AttentionLayout(position_ids, doc_ids, cu_seqlens, max_seqlen, causal, anneal)

    @staticmethod
    def single(batch: int, length: int, device=None, causal: bool = False) -> AttentionLayout:
        """One document per row."""
        pos = torch.arange(length, device=device).expand(batch, length).clone()
        return AttentionLayout.from_position_ids(pos, causal=causal)

    @property
    def needs_dense_mask(self) -> bool:
        """True when the mask is more than documents (+causal): varlen kernels cannot serve it."""
        return self.anneal is not None

    def allowed(self, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """mask_mod semantics: may query q of row b attend key k? Broadcasts over index tensors."""
        same_doc = self.doc_ids[b, q] == self.doc_ids[b, k]
        if self.causal:
            return same_doc & (k <= q)
        if self.anneal is None:
            return same_doc
        return same_doc & ((k <= q) | self.anneal.future_open(q, k))

    def dense_mask(self) -> torch.Tensor:
        """[B, 1, L, L] boolean mask (True = attend): the reference every backend is checked against.
        Built once per layout, since every layer of a forward pass shares it."""
        # cached outside the dataclass fields, so `dataclasses.replace` (FSDP's input casting,
        # for one) copies a layout without tripping over it
        dense = self.__dict__.get("_dense")
        if dense is None:
            dense = self.__dict__["_dense"] = self._build_dense_mask()
        return dense

    def _build_dense_mask(self) -> torch.Tensor:
        B, L = self.doc_ids.shape
        dev = self.doc_ids.device
        b = torch.arange(B, device=dev)[:, None, None]
        q = torch.arange(L, device=dev)[None, :, None]
        k = torch.arange(L, device=dev)[None, None, :]
        return self.allowed(b, q, k)[:, None]
