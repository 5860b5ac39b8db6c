"""Train-step benchmark: the trainer's real jitted step, its throughput and the checkpoint stall.

  python -m lavin_jax.tools.bench train --config configs/lavin_dit.py:demo [--steps 10] \
      [--data synthetic|config] [--config.KEY=VALUE ...]

Runs lavin_jax/train.py's machinery, not a copy: train_state.create (sharded state),
train_state.jit_train_step (donated state), the data iterator of data/batches.py,
sharding.shard_batch per step, train.RunCheckpointer and train._save (finiteness check, then an
Orbax save, async when ``config.async_checkpointing``). ``--data synthetic`` (default) feeds
random batches of the config's shapes (``data.kind = "synthetic"``: packed rows of
``data.cond_len`` x ``data.target_len`` tokens, filled with whole equal episodes of one target
frame at the first configured resolution, the rest padding; ``--frames``-frame clips for the
ST-VAE); ``--data config`` uses the config's own data.

Figures:
- ``steps_per_s`` / ``tokens_per_s``: ``--steps`` steps dispatched back to back as the loop
  does (next batch read while the step runs), from the first dispatch to the last result.
  Tokens: real J-DiT tokens of both streams (objective.tokens_per_batch); for the ST-VAE,
  latent positions (T' x h x w per clip).
- checkpoint stall: steps paced as the loop runs them (dispatch one, wait for the one before:
  ``Runner.paced``); a save issued between two steps as the trainer does, then the steps until
  the async write finished, bracketed by ``--settle`` steps without a save before and after
  (that save's baseline: a shared host drifts; ``step_s`` is the median baseline over saves).
  ``checkpoint_stall_s`` = the extra time of the steps overlapping the write (the save call's
  own time falls into the first of them); ``checkpoint_stall_fraction`` = that / (overlapping
  steps x step_s), i.e. how much slower training runs while a save is in flight (goal <= 5%);
  ``checkpoint_stall_steps`` = stall / step_s (steps lost per save);
  ``checkpoint_stall_amortized`` = stall / (the config's checkpoint_every_steps x step_s), the
  share of all training time. Median over ``--saves``
  saves (``checkpoint_stall_fractions``: each save's), after one untimed save
  (``checkpoint_first_save_s``: it compiles the finiteness check and the snapshot copy and
  sets Orbax up).
  The same in process CPU seconds (``step_cpu_s``, ``checkpoint_stall_cpu_*``: the CPU work
  the save adds, all threads), the figure a shared, loaded host does not blur; the host's
  1-minute load average is reported with them. With the writer process (``checkpoint_writer``)
  its own CPU per save is ``checkpoint_writer_process_cpu_s`` (Linux).
- ``checkpoint_blocking_s`` / ``checkpoint_blocking_fraction``: what the loop itself waits for,
  per save and as a share of one step: the save call plus whatever of the snapshot copy still
  runs after it returned (the next step waits for it). The rest of the stall above is the
  background write competing with the step for the host's cores and memory (on TPU/GPU hosts
  the step does not run on those), or, where the loop is host-bound (tiny steps on a GPU),
  for the GIL (Orbax's per-array Python: ``state_arrays``, with ``state_bytes``).
- ``--spinner N``: the control for the in-flight figure. N rounds of a process that only spins
  on the CPU at the writer's priority, for as many steps as a save overlapped (median), timed
  as the saves: ``idle_spinner_stall_fraction`` (median), ``idle_spinner_stall_fractions``,
  ``idle_spinner_cpu_s`` (the CPU it got per round).
  It is what the scheduler alone lets a background writer cost on this host (no memory
  traffic, no I/O, no GIL).
``--init_state WORKDIR[:STEP]`` times the saves with a run's checkpointed state (same config):
a freshly initialised state compresses far better than a trained one.
A human summary comes first, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lavin_jax import hostmem, sharding, train, train_state
from lavin_jax.data.batches import make_iterator
from lavin_jax.objectives import get_objective
from lavin_jax.run_config import validate_config
from lavin_jax.tools.bench_jdit import load_config
from lavin_jax.train_checkpoint import RunCheckpointer, snapshot_copy


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    p = argparse.ArgumentParser(
        prog="bench train", description=__doc__.splitlines()[0],
        epilog="--config.KEY=VALUE overrides any config key (Python literals, else strings).")
    p.add_argument("--config", default="configs/lavin_dit.py:demo", help="FILE:VARIANT")
    p.add_argument("--data", choices=("synthetic", "config"), default="synthetic")
    p.add_argument("--steps", type=int, default=10, help="timed steps (throughput)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    p.add_argument("--settle", type=int, default=3,
                   help="steps without a save before and after each timed save (its baseline)")
    p.add_argument("--saves", type=int, default=8, help="checkpoint saves timed (median)")
    p.add_argument("--max_overlap", type=int, default=50, help="steps timed after a save, at most")
    p.add_argument("--spinner", type=int, default=0, metavar="N",
                   help="N control rounds: a process at the writer's priority that only spins "
                        "on the CPU for as many steps as a save overlapped, timed as the saves "
                        "(the floor any background writer has on this host)")
    p.add_argument("--latent_size", type=int, default=None,
                   help="synthetic J-DiT latent side (default: data.resolutions[0] / VAE 4x or 8x)")
    p.add_argument("--frames", type=int, default=1, help="synthetic ST-VAE clip frames")
    p.add_argument("--workdir", default="", help="checkpoint folder (default: a temporary one)")
    p.add_argument("--init_state", default="", metavar="WORKDIR[:STEP]",
                   help="start from a run's train state (its newest or STEP checkpoint; same "
                        "config): a trained state compresses differently from a fresh one")
    return parse_with_overrides(p, argv)


def parse_with_overrides(p: argparse.ArgumentParser, argv: list[str]
                         ) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """``p``'s flags, plus every ``--config.KEY=VALUE`` as (KEY, VALUE); anything else is a
    usage error."""
    args, rest = p.parse_known_args(argv)
    overrides = []
    for a in rest:
        if not a.startswith("--config.") or "=" not in a:
            p.error(f"unrecognized argument {a!r} (overrides are --config.KEY=VALUE)")
        key, _, value = a[len("--config."):].partition("=")
        overrides.append((key, value))
    return args, overrides


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    for key, text in overrides:
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            if name not in node:
                raise SystemExit(f"--config.{key}: the config has no block {name!r}")
            node = node[name]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(node.get(leaf), float) and isinstance(value, int):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise SystemExit(f"--config.{key}={text}: {e}") from None


def _spatial_compression(cfg: ml_collections.ConfigDict) -> int:
    """The configured ST-VAE's, else 4 for the demo variant (the demo VAE), else 8 (the release)."""
    path = str(cfg.data.get("vae_checkpoint", "") or "")
    if path and path != "toy":
        try:
            from lavin_jax import checkpoint
            from lavin_jax.models.stvae import STVAEConfig

            meta = checkpoint.load_metadata(path)["configs"]["stvae"]
            return STVAEConfig.from_config(meta).spatial_compression
        except (FileNotFoundError, KeyError, ValueError):
            pass
    return 4 if cfg.get("variant") == "demo" else 8


def synthetic_data(cfg: ml_collections.ConfigDict, args: argparse.Namespace) -> None:
    """Replaces ``cfg.data`` by a synthetic block of the same batch and (nearly) row shapes."""
    d = cfg.data
    new: dict[str, Any] = dict(kind="synthetic", global_batch=int(d.global_batch),
                               seed=int(d.get("seed", 0)))
    if cfg.objective.name == "vae":
        new.update(image_size=int(d.image_size), frames=args.frames)
    else:
        res = d.get("resolutions", [256])[0]
        side = res if isinstance(res, int) else int(res[0])
        latent = args.latent_size or side // _spatial_compression(cfg)
        tpf = (latent // int(cfg.model.patch_size)) ** 2
        per_row = max(1, int(d.target_len) // tpf)  # one target frame per episode
        new.update(latent_size=latent, episodes_per_row=per_row,
                   cond_frames=max(1, int(d.cond_len) // (per_row * tpf)),
                   cond_len=int(d.cond_len), target_len=int(d.target_len))  # PadRows pads to
    cfg.data = ml_collections.ConfigDict(new)


class PadRows:
    """Pads synthetic packed rows with padding tokens (segment 0) to exactly the configured
    ``[cond_len, target_len]``, the shapes the real pipeline's rows have."""

    def __init__(self, it, cond_len: int, target_len: int):
        self.it, self.len = it, {"cond": cond_len, "x": target_len}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = dict(next(self.it))
        for stream, n in self.len.items():
            for k in (stream, f"{stream}_pos", f"{stream}_seg"):
                x = b[k]
                if x.shape[1] < n:
                    pad = [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
                    b[k] = np.pad(x, pad)
        return b

    @property
    def bad_records(self) -> int:
        return self.it.bad_records

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)


def _tokens_fn(objective, cfg):
    fn = getattr(objective, "tokens_per_batch", None)
    if fn is not None:
        return fn, "real J-DiT tokens (cond + target streams)"
    from lavin_jax.models.stvae import STVAEConfig

    shape = STVAEConfig.from_config(cfg.model).latent_shape
    key = objective.ocfg.input_key

    def latent_positions(batch):
        b, t, h, w, _ = np.shape(batch[key])
        lt, lh, lw, _ = shape(t, h, w)
        return b * lt * lh * lw

    return latent_positions, "ST-VAE latent positions (T' x h x w per clip)"


class Runner:
    """The train loop's step, factored for timing (same calls, same order)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.mesh = sharding.make_mesh(cfg)
        self.rules = cfg.sharding.rules
        self.objective = get_objective(cfg.objective.name, cfg)
        self.tr, self.state = train_state.create(
            self.objective, seed=cfg.seed, mesh=self.mesh, rules=self.rules,
            ema_decay=cfg.ema_decay, microbatches=cfg.microbatches)
        self.data = make_iterator(cfg, self.objective)
        if cfg.data.kind == "synthetic" and "target_len" in cfg.data:
            self.data = PadRows(self.data, int(cfg.data.cond_len), int(cfg.data.target_len))
        self.batch = next(self.data)
        shardings = jax.tree.map(
            lambda x: sharding.batch_sharding(self.mesh, self.rules, np.ndim(x)), self.batch)
        self.step_fn = train_state.jit_train_step(self.tr, shardings)
        self.tokens_fn, self.tokens_what = _tokens_fn(self.objective, cfg)
        self.step = 0

    def run(self) -> int:
        """One step: dispatch, then read the next batch while it runs. Returns its tokens."""
        with sharding.use_rules(self.mesh, self.rules):
            gb = sharding.shard_batch(self.batch, self.mesh, self.rules)
            self.state, self.metrics = self.step_fn(self.state, gb)
        tokens = self.tokens_fn(self.batch)
        self.step += 1
        self.batch = next(self.data)
        return tokens

    def waited(self) -> tuple[float, float]:
        """One step, waited for: (wall s, process CPU s)."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.run()
        jax.block_until_ready(self.state)
        return time.perf_counter() - t0, time.process_time() - c0

    def paced(self) -> tuple[float, float]:
        """One step as the train loop runs them: dispatch the next step, then wait for the one
        before it (one step always queued, so host-side work overlaps a running step).
        Returns (wall s, process CPU s) since the previous call returned (0 the first time)."""
        prev = self.metrics
        self.run()
        jax.block_until_ready(prev)
        now = time.perf_counter(), time.process_time()
        last, self._last = getattr(self, "_last", now), now
        return now[0] - last[0], now[1] - last[1]


def restore_state(r: Runner, spec: str) -> int:
    """Replaces ``r.state`` by the train state of a run's checkpoint (``WORKDIR[:STEP]``).
    Returns the step restored."""
    workdir, _, step = spec.rpartition(":")
    if not step.isdigit():  # no step given (or a gs:// path's colon)
        workdir, step = spec, ""
    ckpt = RunCheckpointer(workdir, async_save=False)
    try:
        n = int(step) if step else ckpt.latest_step()
        if n is None or n not in ckpt.manager.all_steps():
            raise SystemExit(f"--init_state={spec}: no checkpoint {step or ''} in "
                             f"{ckpt.directory} (have {ckpt.manager.all_steps()})")
        try:
            r.state = ckpt.restore(n, r.tr.abstract_state, None)
        except ValueError as e:  # a one-line mismatch report (pass the run's own config)
            raise SystemExit(f"--init_state={spec}: {e}") from None
    finally:
        ckpt.close()
    return n


def time_saves(r: Runner, ckpt: RunCheckpointer, saves: int, max_overlap: int,
               settle: int) -> list[dict[str, float]]:
    """Per save: its call, write and overlap times and the stall (wall and process CPU), each
    against the median of the ``settle`` steps just before and just after it (a shared host
    drifts). Steps are ``Runner.paced``: the save is issued between two steps as the trainer
    does, and its call's time falls into the next step's."""
    t0 = time.perf_counter()  # the first save compiles the finiteness check and sets Orbax up
    train._save(ckpt, r.step, r.state, r.data, r.cfg)
    ckpt.wait()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    bool(jax.device_get(train._all_finite(r.state["params"])))
    check = time.perf_counter() - t0
    copy = 0.0  # the snapshot copy's part that runs after the save call returned
    if ckpt.snapshot:  # (the next step waits for it: it donates the buffers the copy reads)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = snapshot_copy(r.state)  # on CPU hosts it mostly runs here, in the call
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t1)
        copy = statistics.median(times)
    r.paced()
    after = [r.paced() for _ in range(settle)]
    out = []
    for _ in range(saves):
        before = after
        writer_cpu = _process_cpu_s(ckpt.writer_pid)
        t0 = time.perf_counter()
        train._save(ckpt, r.step, r.state, r.data, r.cfg)
        call = time.perf_counter() - t0
        steps = []
        while not steps or (ckpt.saving() and len(steps) < max_overlap):
            steps.append(r.paced())
        written = time.perf_counter() - t0
        capped = ckpt.saving()  # the stall then misses the write's rest
        ckpt.wait()
        writer_cpu = _process_cpu_s(ckpt.writer_pid) - writer_cpu
        after = [r.paced() for _ in range(settle + 1)][1:]  # the first may hold wait()'s time
        out.append(dict(save_call_s=call, write_s=written, first_save_s=first,
                        finite_check_s=check, write_capped=capped, blocking_s=call + copy,
                        copy_after_call_s=copy, writer_process_cpu_s=writer_cpu,
                        **_stall(steps, before + after)))
    return out


def _stall(steps: list[tuple[float, float]], around: list[tuple[float, float]]
           ) -> dict[str, float]:
    """``steps`` (wall s, CPU s) against the median of the steps ``around`` them."""
    base = tuple(statistics.median(t[i] for t in around) for i in (0, 1))
    n = len(steps)
    stall = sum(w for w, _ in steps) - n * base[0]
    stall_cpu = sum(c for _, c in steps) - n * base[1]
    return dict(overlap_steps=n, base_s=base[0], base_cpu_s=base[1], stall_s=stall,
                stall_fraction=stall / (n * base[0]), stall_steps=stall / base[0],
                stall_cpu_s=stall_cpu, stall_cpu_fraction=stall_cpu / (n * base[1]))


_SPIN = ("from lavin_jax.checkpoint_writer import lower_thread_priority\n"
         "lower_thread_priority({!r}, every_thread=True)\n"
         "print(flush=True)\n"
         "while True: pass")


def time_spinner(r: Runner, rounds: int, steps: int, settle: int) -> list[dict[str, float]]:
    """The control: per round, a process that only spins on the CPU, at the writer's priority,
    while ``steps`` steps run, timed as ``time_saves`` times a save. What it costs is what
    scheduling alone lets any background writer cost (no memory traffic, no I/O, no GIL)."""
    code = _SPIN.format(r.cfg.get("checkpoint_writer_priority", "idle"))
    after = [r.paced() for _ in range(settle)]
    out = []
    for _ in range(rounds):
        before = after
        spin = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        spin.stdout.readline()  # running, at its priority
        try:
            cpu = _process_cpu_s(spin.pid)
            timed = [r.paced() for _ in range(steps)]
            cpu = _process_cpu_s(spin.pid) - cpu
        finally:
            spin.kill()
            spin.wait()
        after = [r.paced() for _ in range(settle)]
        out.append(dict(_stall(timed, before + after), spinner_cpu_s=cpu))
    return out


def _process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) another process has used so far (Linux; else 0)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> dict[str, Any]:
    args, overrides = parse_args(argv[1:])
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = load_config(args.config)
    apply_overrides(cfg, overrides)
    hostmem.configure_from(cfg)  # as train.main: before the backend starts
    if args.data == "synthetic":
        synthetic_data(cfg, args)
    validate_config(cfg, len(jax.devices()))

    t0 = time.perf_counter()
    r = Runner(cfg)
    init_step = restore_state(r, args.init_state) if args.init_state else None
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r.waited()  # compiles
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        r.waited()
    with train.frozen_heap():  # as the trainer's loop runs
        tokens = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tokens += r.run()
        jax.block_until_ready(r.state)
        dt = time.perf_counter() - t0
        loss = {k: float(v) for k, v in jax.device_get(r.metrics).items()
                if k.endswith("/loss")}

        workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
        ckpt = RunCheckpointer.from_config(workdir, cfg, max_to_keep=2)
        try:
            saves = time_saves(r, ckpt, args.saves, args.max_overlap, args.settle)
            spins = time_spinner(r, args.spinner, max(1, round(statistics.median(
                s["overlap_steps"] for s in saves))), args.settle) if args.spinner else []
        finally:
            ckpt.wait()
            ckpt.close()
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    med = lambda k: statistics.median(s[k] for s in saves)
    b = r.batch
    real_fraction = 1.0
    if "x_seg" in b:
        real_fraction = float((np.sum(b["cond_seg"] > 0) + np.sum(b["x_seg"] > 0))
                              / (b["cond_seg"].size + b["x_seg"].size))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(r.state["params"]))
    state_leaves = jax.tree.leaves(r.state)  # Orbax's per-array work scales with the count
    result = dict(
        config=args.config, overrides=[f"{k}={v}" for k, v in overrides], data_kind=args.data,
        objective=cfg.objective.name, params=n_params, global_batch=int(cfg.data.global_batch),
        batch_shapes={k: list(np.shape(v)) for k, v in b.items()},
        devices=len(jax.devices()), device=jax.devices()[0].device_kind, jax=jax.__version__,
        setup_s=round(setup_s, 2), compile_s=round(compile_s, 2), steps=args.steps,
        steps_per_s=args.steps / dt, tokens_per_s=tokens * jax.process_count() / dt,
        tokens_what=r.tokens_what, real_token_fraction=round(real_fraction, 4),
        step_s=round(med("base_s"), 4), step_cpu_s=round(med("base_cpu_s"), 4),
        loss=loss,
        async_checkpointing=bool(cfg.async_checkpointing), saves=len(saves),
        checkpoint_first_save_s=round(saves[0]["first_save_s"], 4),
        checkpoint_finite_check_s=round(saves[0]["finite_check_s"], 4),
        init_state=args.init_state or None, init_state_step=init_step,
        checkpoint_save_call_s=round(med("save_call_s"), 4),
        checkpoint_copy_after_call_s=round(saves[0]["copy_after_call_s"], 4),
        checkpoint_blocking_s=round(med("blocking_s"), 4),
        checkpoint_blocking_fraction=round(med("blocking_s") / med("base_s"), 4),
        checkpoint_write_s=round(med("write_s"), 4),
        checkpoint_overlap_steps=med("overlap_steps"),
        checkpoint_write_capped=any(s["write_capped"] for s in saves),
        checkpoint_writer=ckpt.writer,
        checkpoint_writer_priority=ckpt.writer_priority, checkpoint_snapshot=ckpt.snapshot,
        checkpoint_compression=ckpt.compression, state_arrays=len(state_leaves),
        state_bytes=sum(int(x.nbytes) for x in state_leaves),
        checkpoint_stall_s=round(med("stall_s"), 4),
        checkpoint_stall_fraction=round(med("stall_fraction"), 4),
        checkpoint_stall_fractions=[round(x["stall_fraction"], 4) for x in saves],
        checkpoint_stall_steps=round(med("stall_steps"), 3),
        checkpoint_every_steps=int(cfg.checkpoint_every_steps),
        checkpoint_stall_amortized=round(
            med("stall_steps") / int(cfg.checkpoint_every_steps), 6),
        checkpoint_stall_cpu_s=round(med("stall_cpu_s"), 4),
        checkpoint_stall_cpu_fraction=round(med("stall_cpu_fraction"), 4),
        checkpoint_writer_process_cpu_s=round(med("writer_process_cpu_s"), 4),
        host_cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2),
    )
    if spins:
        result.update(
            idle_spinner_stall_fraction=round(
                statistics.median(x["stall_fraction"] for x in spins), 4),
            idle_spinner_stall_fractions=[round(x["stall_fraction"], 4) for x in spins],
            idle_spinner_steps=spins[0]["overlap_steps"],
            idle_spinner_cpu_s=round(statistics.median(x["spinner_cpu_s"] for x in spins), 3))
    print(f"train step ({cfg.objective.name}, {args.config}, {args.data} data, "
          f"{n_params / 1e6:.2f}M params, batch {result['global_batch']}): "
          f"{result['steps_per_s']:.3f} steps/s, {result['tokens_per_s']:.0f} tokens/s, "
          f"compile {compile_s:.1f} s")
    print(f"  checkpoint: save call {result['checkpoint_save_call_s']:.3f} s, written after "
          f"{result['checkpoint_write_s']:.2f} s over {result['checkpoint_overlap_steps']} "
          f"step(s); stall {result['checkpoint_stall_s']:.3f} s = "
          f"{result['checkpoint_stall_fraction']:.1%} of the overlapping steps "
          f"({result['checkpoint_stall_steps']:.2f} steps); the loop blocked "
          f"{result['checkpoint_blocking_s']:.3f} s = {result['checkpoint_blocking_fraction']:.1%}"
          f" of a step (save call + the snapshot copy's rest), writer {ckpt.writer} at "
          f"priority {ckpt.writer_priority}, snapshot {ckpt.snapshot}, compression "
          f"{ckpt.compression}")
    if spins:
        print(f"  control: a spinning process at the writer's priority over "
              f"{result['idle_spinner_steps']} steps slows them "
              f"{result['idle_spinner_stall_fraction']:.1%} (the floor on this host)")
    if result["checkpoint_write_capped"]:
        print(f"  a write outlasted --max_overlap={args.max_overlap} steps: its remaining "
              "stall is not counted; raise --max_overlap")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv)
