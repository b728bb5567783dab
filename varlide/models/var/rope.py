"""Rotary position embeddings for VARSR's transformer, behind one small interface.

The transformer never builds angles itself: it asks a :class:`RotaryEmbedding` for the
rotation of a *segment* (segment 0 = the LR prefix plus the class token, segment ``si`` >= 1 =
scale ``si``) or of the whole sequence, and applies it with :func:`apply_rotary`. A rotation
is a complex tensor ``(L, head_dim // 2)`` (shared by the batch) or ``(B, L, head_dim // 2)``
(per sample), pairs interleaved (dims ``2i, 2i + 1``).

:class:`SARoPE` is VARSR's spatial RoPE (qyp2000/VARSR ``models/basic_var.py``,
``precompute_freqs_cis``): every token map, whatever its side ``pn``, is laid on the same
``grid`` (32, hard-coded by the authors) so a token at (row r, col c) sits at
``(r / pn * grid, c / pn * grid)``; the first ``head_dim // 4`` pairs rotate with the row, the
next ``head_dim // 4`` with the column. The scale list is ``(prefix_side, 1, pn_1, ...)``: the
prefix grid, the class token at (0, 0), then each scale after the 1x1 one.

SF-RoPE (the paper's frequency-phase rotation fused with SA-RoPE by a learned lambda) is meant
to subclass :class:`RotaryEmbedding`: both methods receive the Cvae token map fed to a scale
(the area-interpolated ``f_hat`` before ``word_embed``), which exists in teacher forcing and in
cached inference alike, and may return a batched rotation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SA_ROPE_GRID = 32
"""VARSR's grid: ``grid = 32#patch_nums[-1]`` in ``precompute_freqs_cis``."""


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Tensor:
    """``head_dim // 4`` inverse frequencies, one per pair of each spatial axis (fp32)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    exponents = torch.arange(0, head_dim, 4, device="cpu")[: head_dim // 4].float() / head_dim
    return 1.0 / (theta ** exponents)


def sa_rope_positions(sides: tuple[int, ...], grid: int = SA_ROPE_GRID) -> Tensor:
    """(N, 2) fp32 (row, col) positions: each ``pn x pn`` map scaled onto ``grid``, row-major."""
    rows, cols = [], []
    for pn in sides:
        r, c = torch.meshgrid(torch.arange(pn, device="cpu"), torch.arange(pn, device="cpu"),
                              indexing="ij")
        rows.append(r.flatten() / pn * grid)  # int / int: fp32, as the authors compute it
        cols.append(c.flatten() / pn * grid)
    return torch.stack((torch.cat(rows), torch.cat(cols)), dim=1)


def rotation_from_angles(angles: Tensor) -> Tensor:
    """Unit complex numbers ``exp(i * angles)`` in complex64."""
    angles = angles.float()
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` (B, H, L, D) by ``rot`` ((L, D/2) or (B, L, D/2)).

    The product is taken in fp32 (complex64) and cast back to ``x``'s dtype, as VARSR does.
    """
    if rot.dim() == 3:
        rot = rot.unsqueeze(1)  # (B, 1, L, D/2): shared by the heads
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Interface: the rotation of each segment of VARSR's token sequence.

    ``segment_lengths[0]`` is the prefix plus the class token; ``segment_lengths[si]`` is
    ``pn_si ** 2``. Subclasses implement :meth:`segment`; :meth:`sequence` concatenates.
    """

    def __init__(self, head_dim: int, segment_lengths: tuple[int, ...]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.segment_lengths = tuple(segment_lengths)
        starts = [0]
        for n in self.segment_lengths:
            starts.append(starts[-1] + n)
        self.segment_starts = tuple(starts)

    @property
    def num_tokens(self) -> int:
        return self.segment_starts[-1]

    def segment(self, si: int, scale_input: Tensor | None = None,
                device: torch.device | None = None) -> Tensor:
        """Rotation of segment ``si``; ``scale_input`` (B, pn^2, Cvae) is the map fed there."""
        raise NotImplementedError

    def sequence(self, scale_inputs: Tensor | None = None,
                 device: torch.device | None = None) -> Tensor:
        """Rotation of the whole sequence; ``scale_inputs`` (B, L - 1, Cvae) as in teacher forcing.

        ``scale_inputs`` holds the maps of scales 1.. concatenated, so segment ``si`` reads
        ``scale_inputs[:, start_si - first_l : end_si - first_l]``.
        """
        first_l = self.segment_lengths[0]
        parts = []
        for si in range(len(self.segment_lengths)):
            piece = None
            if si > 0 and scale_inputs is not None:
                a, b = self.segment_starts[si] - first_l, self.segment_starts[si + 1] - first_l
                piece = scale_inputs[:, a:b]
            parts.append(self.segment(si, piece, device))
        if any(p.dim() == 3 for p in parts):
            batch = next(p.shape[0] for p in parts if p.dim() == 3)
            parts = [p if p.dim() == 3 else p.expand(batch, -1, -1) for p in parts]
        return torch.cat(parts, dim=-2)


class SARoPE(RotaryEmbedding):
    """VARSR's scale-aware spatial RoPE: fixed, no parameters, nothing in the state dict.

    The table is a plain attribute (not a buffer) so ``module.to(dtype)`` cannot truncate the
    complex values and the checkpoint keeps its 405 tensors; it is copied once per device.
    """

    def __init__(self, head_dim: int, patch_nums: tuple[int, ...],
                 prefix_side: int | None = None, grid: int = SA_ROPE_GRID,
                 theta: float = 10000.0) -> None:
        if patch_nums[0] != 1:
            raise ValueError("VARSR's sequence has a single class token: patch_nums[0] must be 1")
        prefix_side = patch_nums[-1] if prefix_side is None else prefix_side
        sides = (prefix_side, *patch_nums)  # = (32, 1, 2, 3, ..., 32) at the released sizes
        lengths = (prefix_side**2 + 1, *(pn * pn for pn in patch_nums[1:]))
        super().__init__(head_dim, lengths)
        self.sides, self.grid, self.theta = sides, grid, theta
        freqs = rope_frequencies(head_dim, theta)
        pos = sa_rope_positions(sides, grid)
        angles = torch.cat((torch.outer(pos[:, 0], freqs), torch.outer(pos[:, 1], freqs)), dim=1)
        self.positions = pos
        self.freqs_cis = rotation_from_angles(angles)  # (N, head_dim // 2) complex64, CPU
        self._on_device: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device | None) -> Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.freqs_cis.to(device)
        return self._on_device[device]

    def segment(self, si: int, scale_input: Tensor | None = None,
                device: torch.device | None = None) -> Tensor:
        a, b = self.segment_starts[si], self.segment_starts[si + 1]
        return self._table(device)[a:b]

    def sequence(self, scale_inputs: Tensor | None = None,
                 device: torch.device | None = None) -> Tensor:
        return self._table(device)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, sides={self.sides}, grid={self.grid}"

