"""Named presets: each is a QuantRecipe (quant/recipe.py; FlatQuant's: flatquant/recipe.py) built by `recipe`
from a few numbers, so that the command line's overrides (--w-bits, --dynamic-act-clip, --grid, ...) rebuild
it the same way: `preset("w4a4kv4-static", a_bits=8)`.

  method     "prefixquant" (Hadamard rotations, RTN/GPTQ weights) or "flatquant" (learned affine transforms,
             LWC/LAC, always trained then merged)
  rotate     R1-R4 (PrefixQuant); prefix: the FP prefix of outlier tokens in front
  *_bits     None = that part stays FP
  act_dynamic   per-token dynamic activations, else static per-tensor (grid-searched)
  kv_dynamic    per-(token, head) dynamic KV, else static per-head
  full_grid  symmetric quantizers use the full 2^b - 1 step grid (QuantSpec.full_grid, PrefixQuant's authors'
             rule); the FlatQuant presets keep amax / (2^(b-1) - 1), FlatQuant's authors' rule
  act_clip   clip ratio of the per-token dynamic activation quantizers (QuaRot's 0.9); act_site_clips overrides
             it at named sites; kv_clip: the same for dynamic KV. Static quantizers search theirs per block.
"""
from __future__ import annotations

import dataclasses

from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
from prefixquant_jax.quant.recipe import ACT_SITES, QuantRecipe
from prefixquant_jax.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Definition:
    method: str = "prefixquant"
    rotate: bool = True
    prefix: bool = True
    w_bits: int | None = 4
    a_bits: int | None = 4
    kv_bits: int | None = 4
    act_dynamic: bool = False
    kv_dynamic: bool = False
    full_grid: bool = True
    act_clip: float = 1.0
    act_site_clips: tuple[tuple[str, float], ...] = ()
    kv_clip: float = 1.0
    description: str = ""


def _ratio(field: str, r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise UserError(f"{field} must be a clip ratio in (0, 1], got {r!r}", field)
    return float(r)


def recipe(name: str, d: _Definition) -> QuantRecipe:
    """The QuantRecipe of definition `d` under `name`."""
    act_clip, kv_clip = _ratio("preset.act_clip", d.act_clip), _ratio("preset.kv_clip", d.kv_clip)
    site_clips = dict(d.act_site_clips)
    for site, r in site_clips.items():
        if site not in ACT_SITES:
            raise UserError(f"preset.act_site_clips: unknown activation site {site!r} (known: {', '.join(ACT_SITES)})",
                            "preset.act_site_clips")
        _ratio("preset.act_site_clips", r)
    sites = []
    if d.a_bits is not None:
        sites += [(s, QuantSpec(bits=d.a_bits, granularity="token" if d.act_dynamic else "tensor", symmetric=True,
                                dynamic=d.act_dynamic, full_grid=d.full_grid,
                                clip_ratio=site_clips.get(s, act_clip) if d.act_dynamic else 1.0)) for s in ACT_SITES]
    if d.kv_bits is not None:
        kv = (QuantSpec(bits=d.kv_bits, granularity="token", symmetric=False, dynamic=True, clip_ratio=kv_clip)
              if d.kv_dynamic else QuantSpec(bits=d.kv_bits, granularity="head", symmetric=False))
        sites += [("k_cache", kv), ("v_cache", kv)]
    weight = None if d.w_bits is None else QuantSpec(bits=d.w_bits, granularity="channel", symmetric=True,
                                                     full_grid=d.full_grid)
    kw = dict(name=name, description=d.description, sites=tuple(sites), weight=weight, prefix=d.prefix)
    if d.method == "flatquant":
        return FlatQuantRecipe(**kw)
    return QuantRecipe(rotate=d.rotate, **kw)


_DEFINITIONS = {
    "fp": _Definition(rotate=False, prefix=False, w_bits=None, a_bits=None, kv_bits=None,
                      description="full precision reference"),
    "quarot-w4a4kv4": _Definition(prefix=False, act_dynamic=True, kv_dynamic=True,
                                  description="QuaRot baseline: Hadamard R1-R4, RTN W4, per-token dynamic A4, dynamic "
                                              "KV4, no prefix"),
    "w4a4kv4-static-noprefix": _Definition(prefix=False, description="ablation: PrefixQuant-O2 without the prefix"),
    "w4a4kv4-static": _Definition(description="PrefixQuant-O2: FP prefix, static per-tensor A4, static per-head KV4"),
    # act_clip 0.85: chosen on the validation split (RESULTS.md, "Dynamic activation clip")
    "w4a4kv4-dynamic": _Definition(act_dynamic=True, kv_dynamic=True, act_clip=0.85,
                                   description="PrefixQuant-O1: FP prefix, per-token dynamic A4 (clipped at 0.85 amax), "
                                               "per-head-group dynamic KV4"),
    "w4a8kv4-static": _Definition(a_bits=8, description="PrefixQuant W4A8KV4, static"),
    "w8a8kv8-static": _Definition(w_bits=8, a_bits=8, kv_bits=8, description="PrefixQuant W8A8KV8, static"),
    "flatquant-w4a4kv4": _Definition(method="flatquant", rotate=False, prefix=False, act_dynamic=True,
                                     kv_dynamic=True, full_grid=False,
                                     description="FlatQuant: learned Kronecker affine transforms, LWC W4, per-token "
                                                 "dynamic A4 (LAC), dynamic KV4"),
    "flatquant-w4a4kv4-prefix": _Definition(method="flatquant", rotate=False, act_dynamic=True, kv_dynamic=True,
                                            full_grid=False,
                                            description="FlatQuant + FP prefix, per-token dynamic A4 (LAC), dynamic KV4; "
                                                        "with --flat-start hadamard --gptq: the best of both methods"),
    "flatquant-w4a4kv4-static-prefix": _Definition(method="flatquant", rotate=False, full_grid=False,
                                                   description="FlatQuant + FP prefix: static per-tensor A4, static "
                                                               "per-head KV4 (grid-searched, then trained)"),
}
PRESETS = {name: recipe(name, d) for name, d in _DEFINITIONS.items()}


def preset(name: str, **overrides) -> QuantRecipe:
    """PRESETS[name], rebuilt with the overrides that are not None: w_bits, a_bits, kv_bits, act_clip,
    act_site_clips ({site: ratio} or pairs), kv_clip, full_grid, prefix."""
    if name not in _DEFINITIONS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    kw = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(_Definition)} - {"method", "rotate", "description"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise UserError(f"unknown preset override {unknown[0]!r} (one of {', '.join(sorted(fields))})")
    if not kw:
        return PRESETS[name]
    if isinstance(kw.get("act_site_clips"), dict):
        kw["act_site_clips"] = tuple(kw["act_site_clips"].items())
    return recipe(name, dataclasses.replace(_DEFINITIONS[name], **kw))
