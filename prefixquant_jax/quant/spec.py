"""QuantSpec: a frozen, hashable description of one quantizer."""
from __future__ import annotations

import dataclasses

from prefixquant_jax.errors import UserError

GRANULARITIES = ("tensor", "channel", "token", "group", "head")
FULL_GRID_OFFSET = 2.0 ** -10  # in code units: far above float32 rounding of x / scale (~1e-6)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize an array x whose last axis is channels.

    granularity -> axes that share one (scale, zero):
      tensor  every element                          scale shape [1, ..., 1]
      channel all but the last axis (per channel)    [1, ..., C]   (weights [in, out]: per output channel)
      token   the last axis only (per row)           [..., 1]
      group   groups of `group_size` along the last axis, per row
      head    all but axis -2 (x is [..., heads, head_dim]: one scale per head)
    symmetric: q in [-2^(b-1), 2^(b-1)-1], zero = 0; else q in [0, 2^b-1] with a zero point.
    full_grid (symmetric only): scale = amax / (2^(b-1) - 1/2 + 2^-10), so the 2^b - 1 steps of the code range
      span [-amax, amax] (4 bits: 2 amax / 15; the top half step of the positive side is clipped), the
      authors' PrefixQuant grid; else scale = amax / (2^(b-1) - 1) (4 bits: amax / 7, code -8 unused).
    dynamic: scales computed from x at run time (times `clip_ratio`); static: given scales.
    """

    bits: int
    granularity: str = "tensor"
    symmetric: bool = True
    dynamic: bool = False
    group_size: int | None = None
    clip_ratio: float = 1.0
    full_grid: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise UserError(f"quantizer bits must be in 2..8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {self.granularity!r} (one of {', '.join(GRANULARITIES)})")
        if self.granularity == "group" and not self.group_size:
            raise UserError("granularity 'group' needs group_size")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise UserError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def sym_divisor(self) -> float:
        """amax / scale of a symmetric quantizer (see full_grid). With full_grid, -amax / scale would sit exactly
        on the -2^(b-1) + 1/2 rounding tie, so its code would hang on float rounding (and differ between
        the fake model, the packers and the kernels); FULL_GRID_OFFSET puts it just past the tie: code -2^(b-1)."""
        return self.qmax + 0.5 + FULL_GRID_OFFSET if self.full_grid else float(self.qmax)

    def replace(self, **kw) -> "QuantSpec":
        return dataclasses.replace(self, **kw)
