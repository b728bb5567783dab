"""SF-RoPE: VAR-LIDE's spatial-frequency rotary embedding, a :class:`RotaryEmbedding`.

The paper gives ``Phi = arg FFT(x_{K-1})`` and ``RoPE_fused = lambda RoPE_freq + (1 - lambda)
RoPE_spa`` and no code; the open choices are made here (see docs/METHOD.md, "SF-RoPE"):

* ``x_{K-1}`` is the token map fed to scale K (the area-interpolated ``f_hat`` before
  ``word_embed``), which teacher forcing and cached inference both hand to the rotary module,
  so the KV cache stays consistent. Segment 0 (LR prefix + class token = the 1x1 scale) has no
  previous scale: SA-RoPE only.
* Token (r, c) of a ``pn x pn`` scale reads FFT bin (u, v) = (r, c) of every channel; the phase
  enters as ``(cos Phi, sin Phi)`` (continuous on the circle: the 0 / pi phases of tiny real
  maps and the +-pi wrap cannot jump), and a bias-free linear map gives ``head_dim // 2``
  angles per token, ``theta_f`` (B, pn^2, head_dim // 2).
* ``fusion="angle"`` (default) mixes the angles, ``lambda theta_f + (1 - lambda) theta_s``,
  computed as ``cis(theta_s) * cis(lambda (theta_f - theta_s))`` so lambda = 0 returns the SA
  table bit for bit; ``fusion="complex"`` is the literal average of the two unit rotations
  (modulus < 1 where they differ; near-opposite angles cancel).
* ``lambda = max(tanh(raw), 0)`` with a straight-through clamp, ``raw`` zero-initialised: it
  starts at exactly 0 (the released SA-RoPE checkpoint is unchanged), lies in [0, 1), and its
  gradient at 0 is the one-sided derivative (1), so training can switch the branch on.

The new parameters are named ``sfrope_*`` (``rope.sfrope_lambda_raw``, ``rope.sfrope_phase.
weight`` inside :class:`VARTransformer`); :func:`load_released_state_dict` loads a released
(SA-RoPE) state dict strictly except for exactly those keys.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varlide.models.var.rope import (
    SA_ROPE_GRID,
    RotaryEmbedding,
    SARoPE,
    rope_frequencies,
    rotation_from_angles,
)

SFROPE_PREFIX = "sfrope_"
"""Prefix of every SF-RoPE parameter name: none of them is in the released checkpoint."""

Fusion = Literal["angle", "complex"]
LambdaShape = Literal["global", "pair"]


def phase_features(scale_input: Tensor, side: int) -> Tensor:
    """(B, pn^2, Cvae) token map -> (B, pn^2, 2 Cvae) ``(cos, sin)`` of ``arg FFT2`` per channel.

    Token (r, c) (row-major, as the token order) gets bin (u, v) = (r, c), unshifted (DC at
    token 0). The map is detached and taken in fp32: the phase is a read-only feature, and
    ``d arg F / dF`` grows like ``1 / |F|`` at near-empty bins. ``arg 0 = 0`` gives (1, 0).
    """
    b, n, c = scale_input.shape
    if n != side * side:
        raise ValueError(f"a {side}x{side} scale has {side * side} tokens, got {n}")
    maps = scale_input.detach().float().transpose(1, 2).reshape(b, c, side, side)
    phase = torch.angle(torch.fft.fft2(maps)).flatten(2).transpose(1, 2)  # (B, pn^2, C)
    return torch.cat((phase.cos(), phase.sin()), dim=-1)


def fuse_rotations(theta_f: Tensor, theta_s: Tensor, rot_s: Tensor, lam: Tensor,
                   fusion: Fusion = "angle") -> Tensor:
    """Fuse the frequency angles ``theta_f`` with SA-RoPE (``theta_s``, ``rot_s = cis(theta_s)``).

    ``"angle"``: ``cis(lam theta_f + (1 - lam) theta_s)``, written as a correction of the SA
    rotation so ``lam = 0`` multiplies ``rot_s`` by exactly 1 (bit-exact SA-RoPE) and the large
    SA angles are never re-evaluated. ``"complex"``: ``lam cis(theta_f) + (1 - lam) rot_s``, the
    paper's literal formula; its modulus is ``< 1`` wherever the angles differ.
    """
    if fusion == "angle":
        return rot_s * rotation_from_angles(lam * (theta_f - theta_s))
    if fusion == "complex":
        return lam * rotation_from_angles(theta_f) + (1 - lam) * rot_s
    raise ValueError(f"fusion must be 'angle' or 'complex', got {fusion!r}")


def _straight_through_clamp_min0(x: Tensor) -> Tensor:
    """``max(x, 0)`` forward, identity backward: lambda can leave 0 (torch's clamp has zero
    gradient at the boundary, which would freeze a zero-initialised lambda for good)."""
    return x + (x.clamp_min(0.0) - x).detach()


class SFRoPE(SARoPE):
    """SA-RoPE fused with a phase-driven rotation read from each scale's input map.

    One module is shared by every block (the transformer computes the rotation once per
    forward / step), so lambda is global (``lambda_shape="global"``, the paper's single
    coefficient) or one per rotary pair (``"pair"``), never per layer or per head.
    """

    def __init__(self, head_dim: int, patch_nums: tuple[int, ...], cvae: int,
                 prefix_side: int | None = None, grid: int = SA_ROPE_GRID,
                 theta: float = 10000.0, fusion: Fusion = "angle",
                 lambda_shape: LambdaShape = "global") -> None:
        super().__init__(head_dim, patch_nums, prefix_side, grid, theta)
        if fusion not in ("angle", "complex"):
            raise ValueError(f"fusion must be 'angle' or 'complex', got {fusion!r}")
        if lambda_shape not in ("global", "pair"):
            raise ValueError(f"lambda_shape must be 'global' or 'pair', got {lambda_shape!r}")
        self.cvae, self.fusion, self.lambda_shape = cvae, fusion, lambda_shape
        pos, freqs = self.positions, rope_frequencies(head_dim, theta)
        # theta_s, unwrapped, as SARoPE builds it (plain fp32 attribute, not in the state dict)
        self.angles = torch.cat((torch.outer(pos[:, 0], freqs), torch.outer(pos[:, 1], freqs)),
                                dim=1)
        self._angles_on: dict[torch.device, Tensor] = {}
        pairs = head_dim // 2
        self.sfrope_lambda_raw = nn.Parameter(torch.zeros(() if lambda_shape == "global"
                                                          else (pairs,)))
        self.sfrope_phase = nn.Linear(2 * cvae, pairs, bias=False)
        self.reset_sfrope_parameters()

    def reset_sfrope_parameters(self) -> None:
        """lambda's raw parameter = 0 (SA-RoPE exactly); the projection ~ N(0, 1 / Cvae), so
        ``theta_f`` has ~1 rad spread for random phases and matters only through lambda."""
        with torch.no_grad():
            self.sfrope_lambda_raw.zero_()
            nn.init.normal_(self.sfrope_phase.weight, std=1.0 / math.sqrt(self.cvae))

    @property
    def lam(self) -> Tensor:
        """The mixing coefficient in [0, 1), fp32: ``max(tanh(raw), 0)`` (straight-through)."""
        return _straight_through_clamp_min0(torch.tanh(self.sfrope_lambda_raw.float()))

    def set_lambda(self, value: float | Tensor) -> None:
        """Set lambda by hand (tests, ablations): ``raw = atanh(value)``, value in [0, 1)."""
        value = torch.as_tensor(value, dtype=torch.float32)
        if bool((value < 0).any()) or bool((value >= 1).any()):
            raise ValueError("lambda must lie in [0, 1)")
        with torch.no_grad():
            raw = self.sfrope_lambda_raw
            raw.copy_(torch.atanh(value).to(raw.device, raw.dtype).expand_as(raw))

    def sfrope_parameter_names(self, prefix: str = "") -> list[str]:
        """Names of the parameters absent from the released checkpoint (all ``sfrope_*``)."""
        return [prefix + name for name, _ in self.named_parameters()]

    def _angle_table(self, device: torch.device) -> Tensor:
        if device not in self._angles_on:
            self._angles_on[device] = self.angles.to(device)
        return self._angles_on[device]

    def segment(self, si: int, scale_input: Tensor | None = None,
                device: torch.device | None = None) -> Tensor:
        """SA-RoPE for segment 0; the fused (B, pn^2, head_dim // 2) rotation for scales >= 1.

        A scale without its input map is an error rather than a silent SA-RoPE fallback, which
        would make a fine-tuned model disagree between callers.
        """
        rot_s = super().segment(si, device=device)
        if si == 0:
            return rot_s
        if scale_input is None:
            raise ValueError(f"SF-RoPE needs the input map of scale {si}")
        side = self.sides[si + 1]  # sides = (prefix, 1, pn_1, ...): segment si is pn_si
        if scale_input.dim() != 3 or scale_input.shape[-1] != self.cvae:
            raise ValueError(f"scale {si} takes (B, {side * side}, {self.cvae}), "
                             f"got {tuple(scale_input.shape)}")
        a, b = self.segment_starts[si], self.segment_starts[si + 1]
        with torch.autocast(rot_s.device.type, enabled=False):  # rotations stay fp32
            feats = phase_features(scale_input, side).to(rot_s.device)
            theta_f = F.linear(feats, self.sfrope_phase.weight.float())
            lam = self.lam.to(rot_s.device)
            return fuse_rotations(theta_f, self._angle_table(rot_s.device)[a:b], rot_s, lam,
                                  self.fusion)

    def sequence(self, scale_inputs: Tensor | None = None,
                 device: torch.device | None = None) -> Tensor:
        """The (B, N, head_dim // 2) rotation of teacher forcing: segment by segment."""
        if scale_inputs is None:
            raise ValueError("SF-RoPE needs the scale inputs (B, L - 1, Cvae)")
        return RotaryEmbedding.sequence(self, scale_inputs, device)  # not SARoPE's table

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, cvae={self.cvae}, fusion={self.fusion}, "
                f"lambda_shape={self.lambda_shape}")


def sfrope_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of ``model`` that belong to SF-RoPE (a name component ``sfrope_*``)."""
    return [k for k in model.state_dict()
            if any(part.startswith(SFROPE_PREFIX) for part in k.split("."))]


def load_released_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Strict load of a released (SA-RoPE) state dict into a model using SF-RoPE.

    Exactly the SF-RoPE keys may be missing (all of them, or none for a fine-tuned state
    dict); any other missing or unexpected key raises, as ``strict=True`` would. The SF-RoPE
    parameters keep their values (lambda = 0 at construction: the released model unchanged).
    """
    own = set(model.state_dict())
    sf = set(sfrope_state_keys(model))
    missing, unexpected = own - set(state_dict), set(state_dict) - own
    if unexpected or (missing and missing != sf):  # checked before anything is copied
        raise RuntimeError(f"state dict mismatch: missing {sorted(missing - sf)} "
                           f"(SF-RoPE missing {sorted(missing & sf)} of {sorted(sf)}), "
                           f"unexpected {sorted(unexpected)}")
    model.load_state_dict(state_dict, strict=not missing)
