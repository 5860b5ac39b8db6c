"""Will a config fit a TPU slice? Compile the real train step for a topology on this CPU machine.

  python -m lavin_jax.aot --config=configs/lavin_dit.py:3.4b --topology=v5p-128 \
      [--num_slices=N] [--resolution=512 --pairs=8 --global_batch=640] [--config.x=y ...]

Needs libtpu (``pip install -r requirements-tpu.txt``); no TPU. The TPU compiler (libtpu) builds
the exact sharded executable the trainer would run, from abstract arrays only:

- per-chip memory from ``compiled.memory_analysis()``: arguments + outputs - aliased (the donated
  state) + temporaries + code, against the chip's HBM;
- FLOPs per step from XLA's cost analysis of the same step. XLA counts a loop body once, so the
  step is lowered unrolled at depth 1 and 2 (exactly linear in depth) and extrapolated, with
  remat off (model FLOPs, what MFU divides) and with the configured remat (executed FLOPs);
- predicted step time = model FLOPs / (chips x peak bf16 FLOP/s x MFU).

Batch shapes: packed rows of ``data.cond_len`` + ``data.target_len`` tokens by default (what the
trainer runs), or one episode per row from ``--resolution`` and ``--pairs``: 2 x pairs + 1 (the
query) frames of (px / vae_stride / patch)^2 tokens as condition and one target frame (256 px,
8 pairs, patch 2: 17 x 256 = 4352 + 256 tokens; 512 px: 17 x 1024 = 17408 + 1024).
A human summary comes first; the last line is one JSON object. Exit status 1 when it does not fit.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices; nothing runs here

import jax  # noqa: E402
import ml_collections  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    chip_config: str  # libtpu chip config: megacore = one device per chip
    dims: int  # torus dimensions
    cores_in_name: int  # the slice name counts TensorCores (v4/v5p: 2 per chip) or chips


CHIPS = {
    "v4": Chip(32 * GiB, 275e12, "megacore", 3, 2),
    "v5e": Chip(16 * GiB, 197e12, "default", 2, 1),
    "v5p": Chip(95 * GiB, 459e12, "megacore", 3, 2),
    "v6e": Chip(32 * GiB, 918e12, "default", 2, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-128"
    generation: str  # key of CHIPS
    shape: tuple[int, ...]  # chips per dimension of one slice
    num_slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name of one slice (``v5p-128``, ``v5litepod-16``)."""
        gen = {"v5e": "v5litepod"}.get(self.generation, self.generation)
        return f"{gen}-{self.chips_per_slice * self.chip.cores_in_name}"


def _standard_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Slice shape Cloud TPU uses for a power-of-two chip count (v5p-128 = 64 chips = 4x4x4)."""
    if chips == 1:
        return (1,) * dims
    shape = [2, 2] + [1] * (dims - 2)
    if chips < math.prod(shape) or chips & (chips - 1):
        raise ValueError(f"{chips} chips: give the shape explicitly, e.g. --topology=v5p:4x4x12")
    while math.prod(shape) < chips:
        low = min(shape)
        i = max(j for j, s in enumerate(shape) if s == low)  # the last of the smallest doubles
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """``v5p-128`` (TensorCores for v4/v5p, chips for v5e/v6e, as Cloud TPU names slices),
    ``v5litepod-16``, or an explicit chip grid ``v6e:4x8`` / ``v5p:4x4x12``."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    gen = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS:
        raise ValueError(f"--topology={name!r}: use e.g. v5p-128, v6e-256, v5e-16, v4-64 or "
                         f"v5p:4x4x8 (generations {sorted(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(2):
        n = int(m.group(2))
        if n % chip.cores_in_name:
            raise ValueError(f"--topology={name!r}: {gen} slices count TensorCores (2 per chip)")
        shape = _standard_shape(n // chip.cores_in_name, chip.dims)
    else:
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"--topology={name!r}: {gen} has a {chip.dims}-D chip grid")
    if num_slices < 1:
        raise ValueError(f"--num_slices={num_slices} must be >= 1")
    return Topology(name, gen, shape, num_slices)


def topology_devices(topo: Topology) -> list[Any]:
    """Compile-only devices of the slice(s), from libtpu's topology description."""
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise SystemExit("lavin_jax.aot: libtpu is not installed; run "
                         "`pip install -r requirements-tpu.txt` (CPU machines are fine)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a Cloud TPU VM: skip metadata
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no device to lock
    # What a TPU VM's metadata would say; without them libtpu logs alarming (harmless) errors.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    single = topo.chips_per_slice == 1
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=(1, 1, 1) if single else (2, 2, 1), num_slices=topo.num_slices)
    return list(desc.devices)


# ------------------------------------------------------------------------------------------
# Batch shapes.


@dataclasses.dataclass(frozen=True)
class Rows:
    """The packed batch: ``rows`` of ``cond_len`` + ``target_len`` tokens, ``segments`` each."""

    rows: int
    cond_len: int
    target_len: int
    segments: int


def episode_rows(cfg, resolution: int, pairs: int, rows: int, vae_stride: int = 8,
                 frames: int = 1) -> Rows:
    """One episode per row: 2*pairs + 1 condition frames (pairs, then the query) and ``frames``
    target frames of (resolution / vae_stride / patch)^2 tokens each."""
    side = resolution // vae_stride // int(cfg.model.patch_size)
    if side * vae_stride * int(cfg.model.patch_size) != resolution:
        raise ValueError(f"--resolution={resolution} is not a multiple of vae_stride x patch")
    tok = side * side
    return Rows(rows, (2 * pairs + 1) * tok, frames * tok, 1)


def batch_struct(cfg, rows: Rows) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape/dtype of every batch leaf (the pipeline's own empty row, with the batch axis)."""
    from lavin_jax.data import packer

    spec = packer.RowSpec(rows.cond_len, rows.target_len, rows.segments,
                          int(cfg.model.patch_size) ** 2 * int(cfg.model.in_channels))
    return {k: jax.ShapeDtypeStruct((rows.rows, *v.shape), v.dtype)
            for k, v in packer.empty_row(spec).items()}


# ------------------------------------------------------------------------------------------
# Compile and measure.


def _lower(cfg, mesh, batch: dict[str, jax.ShapeDtypeStruct]):
    """The trainer's jitted step lowered for ``mesh`` from abstract state and batch."""
    from lavin_jax import sharding, train_state
    from lavin_jax.objectives import get_objective

    rules = cfg.sharding.rules
    objective = get_objective(cfg.objective.name, cfg)
    tr = train_state.abstract(objective, seed=cfg.seed, mesh=mesh, rules=rules,
                              ema_decay=cfg.ema_decay, microbatches=cfg.microbatches)
    shardings = {k: sharding.batch_sharding(mesh, rules, len(v.shape)) for k, v in batch.items()}
    args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in batch.items()}
    with sharding.use_rules(mesh, rules):
        return train_state.jit_train_step(tr, shardings).lower(tr.abstract_state, args)


def step_flops(cfg, rows: Rows, remat: str | None = None) -> float:
    """Global FLOPs of one train step from XLA's cost analysis (see the module docstring).

    Lowered on one CPU device with the XLA attention (same math as the kernels, which cost
    analysis cannot see into); microbatches count as one batch of all rows (the optimizer update,
    a few FLOPs per parameter, is then counted once per microbatch: negligible).
    """
    from lavin_jax import sharding

    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, context=1))
        cfg.num_slices = 1
        if remat is not None:
            cfg.model.remat_policy = remat
        cfg.model.attention_backend = "xla"
    micro = int(cfg.get("microbatches", 1))
    cfg.microbatches = 1
    sub = dataclasses.replace(rows, rows=max(1, rows.rows // micro))
    mesh = sharding.make_mesh(cfg, jax.devices("cpu")[:1])
    batch = batch_struct(cfg, sub)
    depth = int(cfg.model.get("depth", 0))

    def flops(d: int | None) -> float:
        c = copy.deepcopy(cfg)
        if d is not None:
            with c.unlocked():
                c.model.depth, c.model.scan_layers = d, False
        return float(_lower(c, mesh, batch).cost_analysis()["flops"])

    if depth > 2:  # a layer stack (J-DiT): scanned in the real step
        f1, f2 = flops(1), flops(2)
        total = f1 + (depth - 1) * (f2 - f1)
    else:
        total = flops(None)
    return total * rows.rows / sub.rows


def fit_report(mem: dict[str, int], topo: Topology, model_flops: float, mfu: float
               ) -> dict[str, Any]:
    """The fit verdict and step-time prediction from per-device memory stats and FLOPs."""
    per_chip = (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                + mem["temp_bytes"] + mem["code_bytes"])
    peak = topo.chip.peak_flops
    return {
        "fits": per_chip <= topo.chip.hbm_bytes,
        "per_chip_bytes": int(per_chip),
        "hbm_bytes": int(topo.chip.hbm_bytes),
        "hbm_fraction": round(per_chip / topo.chip.hbm_bytes, 4),
        **{k: int(v) for k, v in mem.items()},
        "flops_per_step": model_flops,
        "chips": topo.chips,
        "peak_flops_per_chip": peak,
        "mfu": mfu,
        "step_time_s": model_flops / (topo.chips * peak * mfu),
    }


# The TPU compiler's refusals: "the total memory required for HLO temporaries (130.56G) exceeds
# available HBM (15.75G)" (libtpu 0.0.42) or "Used 120.50G of 95.74G hbm" (older).
_OOM = (re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", re.I),
        re.compile(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", re.I))


def _oom_bytes(message: str) -> int | None:
    """Per-chip bytes the TPU compiler says the program needs, from its out-of-memory error."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern in _OOM:
        m = pattern.search(message)
        if m:
            return int(float(m.group(1)) * scale[m.group(2).upper()])
    return None


def _without_data_paths(cfg):
    """``cfg`` for validation before renting: the latent cache and the init checkpoint need not
    exist yet (the step compiled from cache rows is the same whatever the cache holds)."""
    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.init_from = ""
        if "data" in cfg and cfg.data.get("mode", "cache") == "cache":
            cfg.data.mode, cfg.data.vae_checkpoint = "render", "toy"  # = cache rows, no files
    return cfg


def check(cfg, topo: Topology, rows: Rows, mfu: float = 0.4, flops: bool = True,
          log=print) -> dict[str, Any]:
    """Compiles ``cfg``'s train step for ``topo``; returns the report (see :func:`fit_report`)."""
    from lavin_jax import sharding
    from lavin_jax.run_config import validate_config

    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.num_slices = topo.num_slices
        if "data" in cfg:
            cfg.data.global_batch = rows.rows
    validate_config(_without_data_paths(cfg), topo.chips)
    devices = topology_devices(topo)
    mesh = sharding.make_mesh(cfg, devices)
    shape = dict(mesh.shape)
    log(f"lavin_jax.aot: {topo.name} x{topo.num_slices} = {topo.chips} chips "
        f"({topo.libtpu_name}, {devices[0].device_kind}); mesh {shape}")
    shards = sharding.num_batch_shards(mesh, cfg.sharding.rules)
    log(f"batch: {rows.rows} rows x (Lc {rows.cond_len} + Lx {rows.target_len}) tokens, "
        f"{rows.segments} segment(s)/row, {rows.rows // shards} rows per batch shard "
        f"(split over {shape['context']} along the length); model {cfg.model.get('hidden_size')}x"
        f"{cfg.model.get('depth')} remat={cfg.model.get('remat_policy')} "
        f"attention={cfg.model.get('attention_backend')} microbatches={cfg.microbatches}")
    t0 = time.time()
    model_flops = step_flops(cfg, rows, remat="none") if flops else 0.0
    exec_flops = (step_flops(cfg, rows) if flops and cfg.model.get("remat_policy", "none")
                  != "none" else model_flops)
    t1 = time.time()
    lowered = _lower(cfg, mesh, batch_struct(cfg, rows))
    try:
        compiled = lowered.compile()
        stats = compiled.memory_analysis()
        mem = {"argument_bytes": stats.argument_size_in_bytes,
               "output_bytes": stats.output_size_in_bytes,
               "alias_bytes": stats.alias_size_in_bytes,
               "temp_bytes": stats.temp_size_in_bytes,
               "code_bytes": stats.generated_code_size_in_bytes}
        error = None
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs over HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        used = _oom_bytes(str(e))
        mem = {"argument_bytes": 0, "output_bytes": 0, "alias_bytes": 0,
               "temp_bytes": used or 0, "code_bytes": 0}
        error = str(e).splitlines()[0][:500]
    report = fit_report(mem, topo, model_flops, mfu)
    if error:
        report.update(fits=False, compile_error=error)
    m = cfg.model
    report.update(
        topology=topo.name, num_slices=topo.num_slices, mesh=shape,
        batch=dataclasses.asdict(rows), executed_flops_per_step=exec_flops,
        model={k: m.get(k) for k in ("hidden_size", "depth", "remat_policy",
                                     "attention_backend", "dtype")},
        microbatches=int(cfg.get("microbatches", 1)),
        flops_s=round(t1 - t0, 1), compile_s=round(time.time() - t1, 1))
    _summary(report, topo, log)
    return report


def _summary(r: dict[str, Any], topo: Topology, log) -> None:
    g = lambda b: f"{b / GiB:.2f} GiB"
    if r.get("compile_error"):
        log(f"the TPU compiler refused it: {r['compile_error']}")
    log(f"per chip: arguments {g(r['argument_bytes'])} + outputs {g(r['output_bytes'])} - "
        f"aliased {g(r['alias_bytes'])} + temporaries {g(r['temp_bytes'])} + code "
        f"{g(r['code_bytes'])} = {g(r['per_chip_bytes'])} of {g(r['hbm_bytes'])} HBM "
        f"({100 * r['hbm_fraction']:.0f}%): {'FITS' if r['fits'] else 'DOES NOT FIT'}")
    if not r["flops_per_step"]:
        log("FLOPs/step: not counted (--skip_flops)")
        return
    log(f"FLOPs/step: {r['flops_per_step']:.3e} model, {r['executed_flops_per_step']:.3e} "
        f"executed (remat recompute); predicted step {r['step_time_s']:.4g} s at MFU "
        f"{r['mfu']} ({topo.chips} x {r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16)")


def main(argv: list[str]) -> None:
    from absl import flags

    from lavin_jax.run_config import ConfigError

    f = flags.FLAGS
    cfg = f.config
    try:
        topo = parse_topology(f.topology, f.num_slices)
    except ValueError as e:
        raise SystemExit(f"lavin_jax.aot: {e}") from None
    d = cfg.get("data") or {}
    batch = f.global_batch or int(d.get("global_batch", 1))
    if f.resolution:
        rows = episode_rows(cfg, f.resolution, f.pairs, batch, f.vae_stride, f.target_frames)
    else:
        if "cond_len" not in d:
            raise SystemExit("lavin_jax.aot: the config has no data.cond_len/target_len; "
                             "pass --resolution and --pairs")
        rows = Rows(batch, int(d.cond_len), int(d.target_len), int(d.max_segments))
    try:
        report = check(cfg, topo, rows, mfu=f.mfu, flops=not f.skip_flops)
    except ConfigError as e:  # e.g. a mesh that does not match the slice: before compiling
        raise SystemExit(f"lavin_jax.aot: {topo.name} x{topo.num_slices}: {e}") from None
    print(json.dumps(report, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    sys.exit(0 if report["fits"] else 1)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py:VARIANT).")
    flags.DEFINE_string("topology", None, "TPU slice: v5p-128, v6e-256, v5e-16, v5p:4x4x8.")
    flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN).")
    flags.DEFINE_integer("resolution", 0, "Pixels; 0 = the config's packed rows (data.*_len).")
    flags.DEFINE_integer("pairs", 8, "Context pairs per episode (with --resolution).")
    flags.DEFINE_integer("target_frames", 1, "Target frames per episode (with --resolution).")
    flags.DEFINE_integer("vae_stride", 8, "VAE spatial downsampling (with --resolution).")
    flags.DEFINE_integer("global_batch", 0, "Rows per step; 0 = config.data.global_batch.")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
    flags.DEFINE_bool("skip_flops", False, "Memory only (skip the FLOP-count lowerings).")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
