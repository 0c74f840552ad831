"""Named presets (part of the CLI interface) -> what to rotate, prefix, quantize and calibrate."""
from __future__ import annotations

import dataclasses

from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.recipe import ACT_SITES, KV_SITES, QUANT_SITES, QuantRecipe
from prefixquant_jax.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """One quantization method. Bits None = that part stays FP.

    act_dynamic: per-token dynamic activations, else static per-tensor (grid-searched);
    kv_dynamic: per-(token, head) dynamic KV (groups of head_dim), else static per-head.
    method: "prefixquant" (Hadamard rotations, RTN weights) or "flatquant" (learned affine transforms,
    LWC/LAC, always trained then merged: prefixquant_jax/flatquant).
    full_grid: symmetric quantizers use the full 2^b - 1 step grid (QuantSpec.full_grid, PrefixQuant's
    authors' rule); the FlatQuant presets keep amax / (2^(b-1) - 1), FlatQuant's authors' rule.
    act_clip: clip ratio of the per-token dynamic activation quantizers (scale from act_clip x the row's amax;
    QuaRot's 0.9), ignored by static ones (their ratios are searched per block); kv_clip: the same for dynamic KV.
    act_site_clips: ((site, ratio), ...) overriding act_clip at those activation sites (ACT_SITES).
    custom_recipe: a researcher's own QuantRecipe (`Preset.from_recipe`, or a raw recipe given to quantize):
    recipe() returns it as it is, and the bits / dynamic / rotate / full_grid fields summarise it.
    """

    name: str
    method: str = "prefixquant"
    rotate: bool = True
    prefix: bool = True
    w_bits: int | None = 4
    a_bits: int | None = 4
    kv_bits: int | None = 4
    act_dynamic: bool = False
    kv_dynamic: bool = False
    full_grid: bool = True  # QuantSpec.full_grid of the symmetric quantizers
    act_clip: float = 1.0
    kv_clip: float = 1.0
    act_site_clips: tuple[tuple[str, float], ...] = ()
    description: str = ""
    custom_recipe: QuantRecipe | None = None

    @classmethod
    def from_recipe(cls, recipe: QuantRecipe, *, name: str = "custom", prefix: bool = True,
                    description: str = "a custom QuantRecipe") -> "Preset":
        """The preset that quantizes with exactly `recipe` (PrefixQuant's pipeline). What a recipe does not say is
        derived (rotate: its r3 = r4, the pipeline folds R1/R2 with them) or given (`prefix`: the FP prefix in
        front, PrefixQuant's default). UserError for a recipe the pipeline cannot calibrate (check_custom_recipe)."""
        check_custom_recipe(recipe)
        if not isinstance(prefix, bool):
            raise UserError(f"prefix must be True or False, got {prefix!r}")
        return cls(name=name, prefix=prefix, description=description, custom_recipe=recipe, **recipe_summary(recipe))

    def __post_init__(self):
        if self.custom_recipe is not None:
            check_custom_recipe(self.custom_recipe)
            if self.method != "prefixquant":
                raise UserError(f"Preset.custom_recipe runs PrefixQuant's pipeline, not method {self.method!r}",
                                "Preset.custom_recipe")
            for field, v in recipe_summary(self.custom_recipe).items():
                if getattr(self, field) != v:
                    raise UserError(f"Preset.{field} {getattr(self, field)!r} contradicts its custom_recipe ({v!r}); "
                                    "build the preset with Preset.from_recipe", f"Preset.{field}")
        checks = [("Preset.act_clip", self.act_clip), ("Preset.kv_clip", self.kv_clip)]
        for site, r in self.act_site_clips:
            if site not in ACT_SITES:
                raise UserError(f"Preset.act_site_clips: unknown activation site {site!r} (known: {', '.join(ACT_SITES)})",
                                "Preset.act_site_clips")
            checks.append(("Preset.act_site_clips", r))
        for field, r in checks:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise UserError(f"{field} must be a clip ratio in (0, 1], got {r!r}", field)

    def act_clip_at(self, site: str) -> float:
        return dict(self.act_site_clips).get(site, self.act_clip)

    @property
    def is_static(self) -> bool:
        return (self.a_bits is not None and not self.act_dynamic) or (self.kv_bits is not None and not self.kv_dynamic)

    def weight_spec(self) -> QuantSpec | None:
        if self.custom_recipe is not None:
            return self.custom_recipe.weight
        return None if self.w_bits is None else QuantSpec(bits=self.w_bits, granularity="channel", symmetric=True,
                                                          full_grid=self.full_grid)

    def recipe(self) -> QuantRecipe | None:
        if self.custom_recipe is not None:
            return self.custom_recipe
        sites = []
        if self.a_bits is not None:
            sites += [(s, QuantSpec(bits=self.a_bits, granularity="token" if self.act_dynamic else "tensor",
                                    symmetric=True, dynamic=self.act_dynamic, full_grid=self.full_grid,
                                    clip_ratio=self.act_clip_at(s) if self.act_dynamic else 1.0)) for s in ACT_SITES]
        if self.kv_bits is not None:
            kv = (QuantSpec(bits=self.kv_bits, granularity="token", symmetric=False, dynamic=True,
                            clip_ratio=self.kv_clip) if self.kv_dynamic
                  else QuantSpec(bits=self.kv_bits, granularity="head", symmetric=False))
            sites += [("k_cache", kv), ("v_cache", kv)]
        if self.method == "flatquant":
            from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
            return FlatQuantRecipe(sites=tuple(sites), weight=self.weight_spec(), kv_original_space=self.prefix)
        if not sites and not self.rotate and self.w_bits is None:
            return None
        return QuantRecipe(sites=tuple(sites), weight=self.weight_spec(), r3=self.rotate, r4=self.rotate)


def check_custom_recipe(recipe) -> None:
    """UserError unless `recipe` is a QuantRecipe that PrefixQuant's pipeline can initialise and calibrate: known
    sites, each named once; static activation quantizers per tensor, static KV ones per tensor or per head
    (dynamic ones at any granularity); a static symmetric per-channel weight quantizer (or none); r3 = r4."""
    kind = type(recipe).__name__
    if kind == "Capture":
        raise UserError("a Capture records statistics while a recipe runs; give quantize the recipe it wraps "
                        "(Capture.inner)")
    if type(recipe) is not QuantRecipe:
        raise UserError(f"a raw recipe must be a quant.recipe.QuantRecipe (PrefixQuant's pipeline), got {kind}; "
                        "FlatQuant runs through its presets (flatquant-w4a4kv4, flatquant-w4a4kv4-static-prefix)")
    names = [s for s, _ in recipe.sites]
    for site in names:
        if site not in QUANT_SITES:
            raise UserError(f"QuantRecipe.sites: unknown site {site!r} (known: {', '.join(QUANT_SITES)})",
                            "QuantRecipe.sites")
        if names.count(site) > 1:
            raise UserError(f"QuantRecipe.sites: site {site!r} is given {names.count(site)} times", "QuantRecipe.sites")
    for site, spec in recipe.sites:
        if not isinstance(spec, QuantSpec):
            raise UserError(f"QuantRecipe.sites: {site!r} needs a QuantSpec, got {type(spec).__name__}",
                            "QuantRecipe.sites")
        allowed = ("tensor",) if site in ACT_SITES else ("tensor", "head")
        if not spec.dynamic and spec.granularity not in allowed:
            raise UserError(f"QuantRecipe.sites: static {site!r} must have granularity {' or '.join(allowed)} (the "
                            f"calibrated scales), got {spec.granularity!r}; a dynamic quantizer may use any",
                            "QuantRecipe.sites")
    w = recipe.weight
    if w is not None and (not isinstance(w, QuantSpec) or w.dynamic or not w.symmetric or w.granularity != "channel"):
        raise UserError(f"QuantRecipe.weight must be a static symmetric per-channel QuantSpec (scales [1, out], RTN or "
                        f"GPTQ), got {w!r}", "QuantRecipe.weight")
    if recipe.r3 != recipe.r4:
        raise UserError(f"QuantRecipe.r3 ({recipe.r3}) and QuantRecipe.r4 ({recipe.r4}) must be equal: the pipeline "
                        "rotates with all of R1-R4 or none", "QuantRecipe.r3", "QuantRecipe.r4")


def recipe_summary(recipe: QuantRecipe) -> dict:
    """The Preset fields that describe a custom recipe: rotate (r3), the lowest bits of the weights, activations
    and KV (None: FP), whether it has activation / KV quantizers and all are dynamic (so Preset.is_static says
    whether any is static), and the grid of its weight (else first symmetric) quantizer."""
    act = [spec for site, spec in recipe.sites if site in ACT_SITES]
    kv = [spec for site, spec in recipe.sites if site in KV_SITES]
    symmetric = [s for s in (recipe.weight, *act, *kv) if s is not None and s.symmetric]
    return {"rotate": recipe.r3, "w_bits": None if recipe.weight is None else recipe.weight.bits,
            "a_bits": min((s.bits for s in act), default=None), "kv_bits": min((s.bits for s in kv), default=None),
            "act_dynamic": bool(act) and all(s.dynamic for s in act), "kv_dynamic": bool(kv) and all(s.dynamic for s in kv),
            "full_grid": symmetric[0].full_grid if symmetric else True}


PRESETS = {p.name: p for p in [
    Preset(name="fp", rotate=False, prefix=False, w_bits=None, a_bits=None, kv_bits=None,
           description="full precision reference"),
    Preset(name="quarot-w4a4kv4", prefix=False, act_dynamic=True, kv_dynamic=True,
           description="QuaRot baseline: Hadamard R1-R4, RTN W4, per-token dynamic A4, dynamic KV4, no prefix"),
    Preset(name="w4a4kv4-static-noprefix", prefix=False,
           description="ablation: PrefixQuant-O2 without the prefix"),
    Preset(name="w4a4kv4-static",
           description="PrefixQuant-O2: FP prefix, static per-tensor A4, static per-head KV4"),
    # act_clip 0.85: chosen on the validation split (RESULTS.md, "Dynamic activation clip")
    Preset(name="w4a4kv4-dynamic", act_dynamic=True, kv_dynamic=True, act_clip=0.85,
           description="PrefixQuant-O1: FP prefix, per-token dynamic A4 (clipped at 0.85 amax), per-head-group dynamic KV4"),
    Preset(name="w4a8kv4-static", a_bits=8, description="PrefixQuant W4A8KV4, static"),
    Preset(name="w8a8kv8-static", w_bits=8, a_bits=8, kv_bits=8, description="PrefixQuant W8A8KV8, static"),
    Preset(name="flatquant-w4a4kv4", method="flatquant", rotate=False, prefix=False, act_dynamic=True, kv_dynamic=True,
           full_grid=False,
           description="FlatQuant: learned Kronecker affine transforms, LWC W4, per-token dynamic A4 (LAC), dynamic KV4"),
    Preset(name="flatquant-w4a4kv4-static-prefix", method="flatquant", rotate=False, full_grid=False,
           description="FlatQuant + FP prefix: static per-tensor A4, static per-head KV4 (grid-searched, then trained)"),
]}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    p = PRESETS[name]
    kw = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(kw.get("act_site_clips"), dict):  # {site: ratio} accepted from Python
        kw["act_site_clips"] = tuple(kw["act_site_clips"].items())
    return dataclasses.replace(p, **kw) if kw else p
