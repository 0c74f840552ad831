"""RuntimeRecipe: the packed model's interception of the decoder's sites and linears (nn/decoder.py), around the
recipe the model was quantized with (`inner`, whose transforms and rotations it reuses):

  activation sites   quantize to integer codes (int4 packed two per byte, or int8) with the inner spec's scale:
                     static [1, 1] from qparams, or dynamic per token (FlatQuant: the learned LAC factors);
                     the kernels backend fuses the site's rotation into the same kernel (rotate_quant: R4's
                     Hadamard, FlatQuant's Kronecker pair), the xla backend applies the inner recipe's transform
                     first; an FP site hands the linear the (transformed) floats
  KV sites           the inner transform (FlatQuant's P_k), then asymmetric codes for the integer cache
                     (runtime/cache.py), static per head or dynamic per (token, head)
  linears            the integer GEMM of those codes with the weight codes (runtime/gemm.py); a float activation
                     meets the dequantized weight
  R3 / q             as the inner recipe (online Hadamard; FlatQuant's q P_k^-T)
The quantizers round exactly as the fake model's (quant/qarray.py, FlatQuant's lac_qparams), and integer
accumulation is exact, so the xla backend gives the numbers of the fake model with matmul "int" bit for bit.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.int4 import pack_int4
from prefixquant_jax.flatquant.recipe import lac_logits, lac_qparams, lac_quantize
from prefixquant_jax.flatquant.transforms import factor, factors, has_transform
from prefixquant_jax.quant.qarray import EPS, QArray, dynamic_qparams
from prefixquant_jax.quant.recipe import ACT_SITES, KV_SITES
from prefixquant_jax.rotate.hadamard import hadamard_kron_factors
from prefixquant_jax.runtime.cache import QuantKV, cache_rows, kv_qarray, quantize_kv, static_kv
from prefixquant_jax.runtime.gemm import codes_qarray, int_gemm, quantize_activation

BACKENDS = ("kernels", "xla")


@dataclasses.dataclass(frozen=True)
class RuntimeRecipe:
    """`inner`: the recipe the model was quantized with (a QuantRecipe, or a merged FlatQuantRecipe); `backend`:
    "kernels" (Pallas; interpret mode off a GPU) or "xla" (the kernels' jnp references); `kernels`: the GEMMs'
    Pallas GPU backend, "auto" | "mosaic" | "triton" (runtime/kernel_choice.py); `interpret`: Pallas interpret
    mode (None: on the CPU only)."""

    inner: object
    backend: str = "xla"
    kernels: str = "auto"
    interpret: bool | None = None

    def __getattr__(self, name):  # the inner recipe's name, sites, specs, prefix... (static description)
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def flat(self) -> bool:
        return self.inner.method == "flatquant"

    @property
    def maps_kv_back(self) -> bool:
        """FlatQuant behind an FP prefix caches codes of k P_k and v P_v and reads them back through P^-1."""
        return self.flat and self.inner.prefix

    def _fuses_r4(self) -> bool:
        spec = self.inner.spec("down_in")
        return self.backend == "kernels" and not self.flat and self.inner.rotate and spec is not None

    # ---- sites
    def apply_site(self, name: str, x, qparams, block=None):
        if name == "down_rot" and self._fuses_r4():
            return x  # in down_in's rotate_quant
        if name in ACT_SITES:
            return self._activation(name, x, qparams, block)
        if name in KV_SITES:
            return self._kv(name, x, qparams, block)
        return self.inner.apply_site(name, x, qparams, block)

    def _pair(self, name: str, t, K: int):
        """The Kronecker pair of site `name`'s online transform, for the fused kernel; None without one."""
        if name == "down_in" and self._fuses_r4():
            return hadamard_kron_factors(K)
        if not self.flat:
            return None
        param = self.inner.param
        if name in ("qkv_in", "up_gate_in", "down_in") and has_transform(t, name):
            (p1, _), (p2, _) = factors(t, name, param)
            return p1, p2
        if name == "o_in" and has_transform(t, "o_in"):
            po = factor(t["o_in"]["left"], param)[0]
            if self.inner.prefix and has_transform(t, "v_cache"):
                return po, factor(t["v_cache"]["left"], param)[0]
            return po, jnp.eye(K // po.shape[0], dtype=jnp.float32)
        return None

    def _activation(self, name: str, x, qparams, block):
        spec, inner = self.inner.spec(name), self.inner
        if spec is None:  # FP activations: the linear multiplies the floats by the dequantized weight
            return inner.site_input(name, x, qparams, block)
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        scale = None if spec.dynamic else jnp.maximum(qparams[name]["scale"][...].astype(jnp.float32), EPS).reshape(1, 1)
        t = block.transforms
        lac = lac_logits(t, name) if self.flat and spec.dynamic else None
        pair = self._pair(name, t, K)
        if self.backend == "kernels" and pair is not None and pair[1].shape[0] % 2 == 0:
            factors_ = None if lac is None else (jax.nn.sigmoid(lac[0]), jax.nn.sigmoid(lac[1]))
            q = quantize_activation(x2, spec, scale, self.backend, pair, factors_, self.interpret)
        else:  # the inner transform first (FlatQuant's; R4 was applied by down_rot)
            x2 = inner.site_input(name, x2, qparams, block)
            if lac is not None:
                c = lac_quantize(x2, spec, *lac, ste=False)
                q = codes_qarray(pack_int4(c.qvalue, axis=-1) if spec.bits == 4 else c.qvalue, c.scale, spec.bits)
            else:
                q = quantize_activation(x2, spec, scale, self.backend, interpret=self.interpret)
        return dataclasses.replace(q, qvalue=q.qvalue.reshape(*lead, q.qvalue.shape[-1]))  # scale: [M, 1] or [1, 1]

    def _kv(self, name: str, x, qparams, block):
        spec = self.inner.spec(name)
        x = self.inner.site_input(name, x, qparams, block)  # FlatQuant: k P_k (v: folded into its kernel)
        if spec.dynamic:
            lac = lac_logits(block.transforms, name) if self.flat else None
            if lac is not None:
                scale, zero = lac_qparams(x.astype(jnp.float32), spec, *lac)
            else:
                scale, zero = dynamic_qparams(x.astype(jnp.float32), spec)
                scale = jnp.maximum(scale, EPS)
            scale, zero = scale[..., 0], zero[..., 0]
        else:
            scale, zero = static_kv(qparams, name)
        return kv_qarray(quantize_kv(x, scale, zero, spec.bits), scale, zero, spec.bits, spec.dynamic)

    def kv_back(self, name: str, x, block):
        """Dequantized cache rows as attention reads them (FlatQuant behind a prefix: mapped back by P^-1)."""
        return self.inner.kv_back(name, x, block) if self.maps_kv_back else x

    def init_kv(self, block, batch: int, rows: int) -> QuantKV:
        spec = self.inner.spec("k_cache")
        return QuantKV.empty(block.config, batch, cache_rows(rows) if self.backend == "kernels" else rows, spec.bits,
                             spec.dynamic)

    # ---- linears
    def weight(self, name: str, block) -> QArray:
        """Linear `name`'s packed weight: its codes [in(/2), out] (4 bits: packed along `in`) and scale [1, out]."""
        bits = self.inner.weight.bits
        return QArray(qvalue=block.linear_module(name).kernel[...], scale=block.qparams[name]["scale"][...],
                      zero_point=None, bits=bits, granularity="channel", packed_axis=0 if bits == 4 else None)

    def product(self, name: str, x, block):
        w = self.weight(name, block)
        if not isinstance(x, QArray):  # an FP site
            return x @ w.dequantize(block.dtype)
        lead = x.qvalue.shape[:-1]
        x2 = dataclasses.replace(x, qvalue=x.qvalue.reshape(-1, x.qvalue.shape[-1]))
        y = int_gemm(x2, w, self.backend, block.dtype, self.interpret, self.kernels)
        return y.reshape(*lead, -1)

    def bias(self, name: str, bias, block=None):
        return self.inner.bias(name, bias, block)
