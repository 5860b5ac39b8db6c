"""J-DiT: the joint diffusion transformer of LaVin-DiT (Flax NNX).

Two token streams (condition = context pairs + query, target = noisy latent) with their own
weights in every layer meet in one joint attention. The native input is packed
(lavin_jax/packing.py): several episodes per row, segment-masked attention, one timestep per
segment. ``model(x, t, cond)`` is the convenience call on channels-last latents.

Layers are stacked (leading 'layers' axis) and applied under ``jax.lax.scan`` so compile time is
flat in depth; remat policy, dtypes and the attention backend come from the config.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lavin_jax import packing
from lavin_jax.models import attention as attn_lib
from lavin_jax.models.layers import Dense, LayerNorm, RMSNorm, dtype_of, param, rms_norm
from lavin_jax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class JDiTConfig:
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    kv_group: int = 1
    patch_size: int = 2
    in_channels: int = 16
    freq_dim: int = 256
    attention_backend: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True  # False: a Python loop (compile time grows with depth; CPU-friendly)
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Std of the patch embedders' LayerNorm bias at init (0 = zeros, the release's init). A
    # token-independent part of every token is what lets RoPE attention find "the same (row,
    # col) in another frame" while the target tokens are still noise; grown from zero it takes
    # hundreds of steps (`bench copy`, demo config, 300 steps: one-step error 0.28 -> 0.06).
    embed_bias_init: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.kv_group

    @property
    def mlp_dim(self) -> int:
        return int(4 * self.hidden_size * 2 / 3 / 64) * 64

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> JDiTConfig:
        d = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"name"})
        if unknown:
            raise ValueError(f"config.model has unknown keys {unknown}; known: {sorted(names)}")
        out = cls(**{k: v for k, v in d.items() if k in names})
        out.validate()
        return out

    def validate(self) -> None:
        """One clear line per problem, before anything is compiled."""
        errs = []
        if self.hidden_size % self.num_heads:
            errs.append(f"model.hidden_size={self.hidden_size} not divisible by "
                        f"model.num_heads={self.num_heads}")
        elif self.head_dim % 6:
            errs.append(f"head_dim = hidden_size/num_heads = {self.head_dim} must be a multiple "
                        "of 6 (3D RoPE splits it in three rotate-half parts)")
        if self.num_heads % self.kv_group:
            errs.append(f"model.num_heads={self.num_heads} not divisible by "
                        f"model.kv_group={self.kv_group}")
        if self.attention_backend not in attn_lib.BACKENDS + ("splash_interpret",):
            errs.append(f"model.attention_backend={self.attention_backend!r}; "
                        f"use one of {attn_lib.BACKENDS}")
        if self.remat_policy not in REMAT_POLICIES:
            errs.append(f"model.remat_policy={self.remat_policy!r}; "
                        f"use one of {sorted(REMAT_POLICIES)}")
        if not self.embed_bias_init >= 0:
            errs.append(f"model.embed_bias_init={self.embed_bias_init} must be >= 0 (a std)")
        for f in ("param_dtype", "dtype"):
            try:
                dtype_of(getattr(self, f))
            except ValueError as e:
                errs.append(f"model.{f}: {e}")
        if errs:
            raise ValueError("; ".join(errs))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] (not scaled by 1000): [...] -> [..., dim], cos first."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


@jax.custom_vjp
def _gather_segments(per_seg: jax.Array, seg: jax.Array) -> jax.Array:
    """per_seg [B, S, F], seg [B, L] (1-based, 0 = padding) -> per token [B, L, F]."""
    idx = jnp.clip(seg - 1, 0, per_seg.shape[1] - 1)
    return jnp.take_along_axis(per_seg, idx[..., None], axis=1)


def _gather_segments_fwd(per_seg, seg):
    return _gather_segments(per_seg, seg), (seg, per_seg[..., :0])  # empty: S and dtype only


def _gather_segments_bwd(res, g):
    # The gather's transpose as a one-hot matmul: autodiff's scatter-add sends every token of a
    # segment to the same row, and on GPU those colliding atomics took 230 ms a layer (H100).
    seg, like = res
    num_segments = like.shape[1]
    idx = jnp.clip(seg - 1, 0, num_segments - 1)
    onehot = (idx[..., None] == jnp.arange(num_segments)).astype(g.dtype)  # [B, L, S]
    d = jnp.einsum("bls,blf->bsf", onehot, g, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
    return d.astype(like.dtype), np.zeros(seg.shape, jax.dtypes.float0)


_gather_segments.defvjp(_gather_segments_fwd, _gather_segments_bwd)


class Stream(nnx.Module):
    """One stream's weights inside a block: q/k/v/out, QK norms, SwiGLU, adaLN modulation."""

    def __init__(self, cfg: JDiTConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs)
        pd = kw["param_dtype"]
        self.q = Dense(d, cfg.num_heads * hd, ("embed", "heads"), use_bias=False, **kw)
        self.k = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), use_bias=False, **kw)
        self.v = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), use_bias=False, **kw)
        self.o = Dense(cfg.num_heads * hd, d, ("heads", "embed"), use_bias=False, **kw)
        self.q_norm = RMSNorm(cfg.num_heads * hd, "heads", param_dtype=pd, rngs=rngs)
        self.k_norm = RMSNorm(cfg.num_kv_heads * hd, "kv_heads", param_dtype=pd, rngs=rngs)
        self.gate = Dense(d, cfg.mlp_dim, ("embed", "mlp"), use_bias=False, **kw)
        self.up = Dense(d, cfg.mlp_dim, ("embed", "mlp"), use_bias=False, **kw)
        self.down = Dense(cfg.mlp_dim, d, ("mlp", "embed"), use_bias=False, **kw)
        zero = nnx.initializers.zeros
        self.modulation = Dense(d, 4 * d, ("embed", "modulation"), kernel_init=zero, **kw)

    def qkv(self, h: jax.Array, cfg: JDiTConfig):
        b, l, _ = h.shape
        q = self.q_norm(self.q(h)).reshape(b, l, cfg.num_heads, cfg.head_dim)
        k = self.k_norm(self.k(h)).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(h).reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
        return q, k, v

    def mlp(self, h: jax.Array) -> jax.Array:
        g = constrain(self.gate(h), ("act_batch", "act_length", "act_mlp"))
        u = constrain(self.up(h), ("act_batch", "act_length", "act_mlp"))
        return self.down(jax.nn.silu(g) * u)


class Block(nnx.Module):
    def __init__(self, cfg: JDiTConfig, rngs: nnx.Rngs):
        self.cond = Stream(cfg, rngs)
        self.x = Stream(cfg, rngs)

    def __call__(self, c, x, t_c, t_x, c_seg, x_seg, rope, cfg: JDiTConfig):
        """c [B, Lc, D], x [B, Lx, D]; t_c/t_x [B, S, D] per-segment embeddings."""
        names = ("act_batch", "act_length", "act_embed")
        lc = c.shape[1]
        # adaLN per segment ([B, S, 4D], cheap), then one gather per token.
        mods = []
        for stream, t, seg in ((self.cond, t_c, c_seg), (self.x, t_x, x_seg)):
            m = stream.modulation(jax.nn.silu(t))
            mods.append(jnp.split(_gather_segments(m, seg), 4, axis=-1))
        (sa_c, ga_c, sm_c, gm_c), (sa_x, ga_x, sm_x, gm_x) = mods

        hc = rms_norm(c) * (1 + sa_c)
        hx = rms_norm(x) * (1 + sa_x)
        qc, kc, vc = self.cond.qkv(hc, cfg)
        qx, kx, vx = self.x.qkv(hx, cfg)
        q = jnp.concatenate([qc, qx], axis=1)
        k = jnp.concatenate([kc, kx], axis=1)
        v = jnp.concatenate([vc, vx], axis=1)
        cos, sin = rope
        q = constrain(attn_lib.apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads"))
        k = constrain(attn_lib.apply_rope(k, cos, sin), ("act_batch", "act_length", "act_kv_heads"))
        seg = jnp.concatenate([c_seg, x_seg], axis=1)
        o = attn_lib.attention(q, k, v, seg, backend=cfg.attention_backend)
        o = checkpoint_name(o, "attn_out")
        b = o.shape[0]
        # Constraining each branch output before the residual add pins the layout; XLA's
        # propagation alone mixed batch rows on data x fsdp x tensor meshes (CPU, jax 0.10).
        oc = constrain(self.cond.o(o[:, :lc].reshape(b, lc, -1)), names)
        ox = constrain(self.x.o(o[:, lc:].reshape(b, o.shape[1] - lc, -1)), names)
        c = constrain(c + jnp.tanh(ga_c) * rms_norm(oc), names)
        x = constrain(x + jnp.tanh(ga_x) * rms_norm(ox), names)

        mc = self.cond.mlp(rms_norm(c) * (1 + sm_c))
        mx = self.x.mlp(rms_norm(x) * (1 + sm_x))
        mc = constrain(checkpoint_name(mc, "mlp_out"), names)
        mx = constrain(checkpoint_name(mx, "mlp_out"), names)
        c = constrain(c + jnp.tanh(gm_c) * rms_norm(mc), names)
        x = constrain(x + jnp.tanh(gm_x) * rms_norm(mx), names)
        return c, x


class Embedder(nnx.Module):
    """Patch tokens -> hidden: Linear + LayerNorm."""

    def __init__(self, cfg: JDiTConfig, rngs: nnx.Rngs):
        pd, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        self.proj = Dense(cfg.token_dim, cfg.hidden_size, ("patch", "embed"),
                          param_dtype=pd, dtype=dt, rngs=rngs)
        bias = (nnx.initializers.normal(cfg.embed_bias_init) if cfg.embed_bias_init
                else nnx.initializers.zeros)
        self.norm = LayerNorm(cfg.hidden_size, "embed", param_dtype=pd, bias_init=bias,
                              rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.norm(self.proj(tokens))


class JDiT(nnx.Module):
    def __init__(self, cfg: JDiTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        d = cfg.hidden_size
        pd, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        self.cond_embedder = Embedder(cfg, rngs)
        self.x_embedder = Embedder(cfg, rngs)
        normal = nnx.initializers.normal(0.02)
        self.prompt_embed = param(rngs, normal, (d,), ("embed",), pd)
        self.answer_embed = param(rngs, normal, (d,), ("embed",), pd)
        self.t_mlp1 = Dense(cfg.freq_dim, d, ("freq", "embed"), kernel_init=normal,
                            param_dtype=pd, dtype=dt, rngs=rngs)
        self.t_mlp2 = Dense(d, d, ("embed", "embed"), kernel_init=normal,
                            param_dtype=pd, dtype=dt, rngs=rngs)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, r)

        self.blocks = make_blocks(rngs)
        zero = nnx.initializers.zeros
        self.final_mod = Dense(d, d, ("embed", "modulation"), kernel_init=zero,
                               param_dtype=pd, dtype=dt, rngs=rngs)
        self.final_proj = Dense(d, cfg.token_dim, ("embed", "patch"), kernel_init=zero,
                                param_dtype=pd, dtype=dt, rngs=rngs)

    def embed_time(self, t: jax.Array) -> jax.Array:
        """t [...] in [0, 1] -> [..., D]."""
        dt = dtype_of(self.cfg.dtype)
        h = self.t_mlp1(timestep_embedding(t, self.cfg.freq_dim).astype(dt))
        return self.t_mlp2(jax.nn.silu(h))

    def forward_packed(self, batch: packing.Packed) -> jax.Array:
        """Packed forward: returns the velocity tokens [B, Lx, p*p*C] (f32)."""
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        names = ("act_batch", "act_length", "act_embed")
        c = constrain(self.cond_embedder(batch.cond.astype(dt)), names)
        x = constrain(self.x_embedder(batch.x.astype(dt)), names)
        temb = self.embed_time(batch.t)  # [B, S, D]
        t_c = temb + self.prompt_embed[...].astype(dt)
        t_x = temb + self.answer_embed[...].astype(dt)
        rope = attn_lib.rope_tables(
            jnp.concatenate([batch.cond_pos, batch.x_pos], axis=1), cfg.head_dim
        )
        c_seg, x_seg = batch.cond_seg, batch.x_seg

        graphdef, state = nnx.split(self.blocks)

        def body(carry, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(*carry, t_c, t_x, c_seg, x_seg, rope, cfg), None

        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        if cfg.scan_layers:
            (c, x), _ = jax.lax.scan(body, (c, x), state)
        else:
            # split (not a[i]): its transpose concatenates the per-layer gradients once, where
            # indexing's transpose pads each one to the full stack and sums them.
            def unstack(a):
                return [p.reshape(a.shape[1:]) for p in jnp.split(a, cfg.depth)]

            layers = jax.tree.map(unstack, state)
            for i in range(cfg.depth):
                (c, x), _ = body((c, x), jax.tree.map(lambda parts, i=i: parts[i], layers,
                                                      is_leaf=lambda v: isinstance(v, list)))

        scale = _gather_segments(self.final_mod(jax.nn.silu(t_x)), x_seg)
        out = self.final_proj(rms_norm(x) * (1 + scale))
        return out.astype(jnp.float32)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        """x [B, Tx, h, w, C] noisy target latents, t [B], cond [B, Tc, h, w, C] -> velocity."""
        b, tx, h, w, _ = x.shape
        batch = packing.pack_latents(x, t, cond, self.cfg.patch_size)
        out = self.forward_packed(batch)
        return packing.unpatchify(out, tx, h, w, self.cfg.patch_size)


def num_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
