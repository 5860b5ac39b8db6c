"""The one training binary: ``python -m lavin_jax.train --config=CONFIG --workdir=DIR``.

Read top to bottom: flags -> distributed init -> config validation (before any compile) -> mesh
-> objective (flow matching for the J-DiT, VAE + discriminator for the ST-VAE) -> sharded state
-> data -> resume or init_from -> loop (step, guards, logs, checkpoints, preemption) -> final save.
The same code runs on one CPU, a GPU box or a TPU pod slice.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from clu import metric_writers, periodic_actions
from etils import epath
from ml_collections import config_flags

from lavin_jax import hostmem, sharding, train_state
from lavin_jax.objectives import get_objective
from lavin_jax.run_config import ConfigError, validate_config
from lavin_jax.train_checkpoint import RunCheckpointer

config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py:VARIANT).")
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (manual multi-process).")
FLAGS = flags.FLAGS
log = logging.getLogger("lavin_jax.train")

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def init_distributed(address: str | None, num: int | None, pid: int | None) -> None:
    """Manual flags win; on pods and clusters jax.distributed auto-detects; else one process."""
    if address or num:
        jax.distributed.initialize(coordinator_address=address, num_processes=num,
                                   process_id=pid)
    elif any(v in os.environ for v in _CLUSTER_ENV):
        jax.distributed.initialize()


class Preemption:
    """SIGTERM asks for a save-and-exit: in a one-process run at the next step; across
    processes at JAX's preemption sync point (the coordination service's own SIGTERM notifier
    tells every process, and they agree on one step). No Python handler there: it would
    replace that notifier, and a process stopping on its own to save while the others step
    on deadlocks both in their collectives. A context: on exit the previous handler is back
    (the demo runs more after its training stages, and a SIGTERM must stop that too)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: checkpointing at the next step and exiting")
        self.requested = True

    def check(self, ckpt: RunCheckpointer, step: int) -> bool:
        return self.requested or ckpt.reached_preemption(step)


def _host(tree: Any) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains until ``cfg.total_steps``; resumes from the newest checkpoint in ``workdir``.

    Returns {"step", "metrics" (the last logged step's), "history" [(step, scalars) of every
    logged step], "state"}.
    """
    validate_config(cfg, len(jax.devices()), jax.process_count())
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg)
    rules = cfg.sharding.rules
    objective = get_objective(cfg.objective.name, cfg)
    tr, state = train_state.create(
        objective, seed=cfg.seed, mesh=mesh, rules=rules, ema_decay=cfg.ema_decay,
        microbatches=cfg.microbatches,
    )

    from lavin_jax.data.batches import make_iterator  # data deps load only when training

    data = make_iterator(cfg, objective)
    ckpt = RunCheckpointer.from_config(workdir, cfg)
    log.info("checkpoints: %s (writer %s at priority %s, snapshot %s, compression %s)",
             ckpt.directory, ckpt.writer, ckpt.writer_priority,
             {True: "on", False: "off", None: "auto"}[ckpt.snapshot_mode], ckpt.compression)
    latest = ckpt.latest_step()
    if latest is not None:
        log.info("resuming from %s step %d", ckpt.directory, latest)
        restore_data = cfg.get("data_restore", True)
        if not restore_data:
            log.warning("config.data_restore=False: the data iterator starts from its beginning")
        state = ckpt.restore(latest, tr.abstract_state, data if restore_data else None)
    elif cfg.get("init_from"):
        state = _init_from(cfg.init_from, tr, state)

    # The iterator is advanced only after a possible save, so its saved state always means
    # "exactly `step` batches consumed" (bit-exact resume).
    batch = next(data)
    batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, rules, np.ndim(x)),
                                   batch)
    step_fn = train_state.jit_train_step(tr, batch_shardings)
    # Synchronous: TensorFlow summary ops in a writer thread racing JAX dispatch aborted the
    # process on CPU (seen under load); a log write every N steps costs little.
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    writer.write_hparams({k: v for k, v in cfg.items() if isinstance(v, (int, float, str))})
    step = int(jax.device_get(state["step"]))
    hooks = [periodic_actions.ReportProgress(num_train_steps=cfg.total_steps, writer=writer)]
    if cfg.profile_steps > 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(
            logdir=workdir, first_profile=cfg.profile_first_step,
            num_profile_steps=cfg.profile_steps))
    from lavin_jax.eval_periodic import PeriodicEval  # None unless a J-DiT run can be decoded

    periodic_eval = PeriodicEval.create(cfg, workdir, writer)
    tokens_fn = getattr(objective, "tokens_per_batch", None)
    t_last, steps_last, tokens_acc, metrics, history = time.time(), step, 0, {}, []

    with sharding.use_rules(mesh, rules), frozen_heap(), Preemption() as preemption:
        while step < cfg.total_steps:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                global_batch = sharding.shard_batch(batch, mesh, rules)
                state, metrics = step_fn(state, global_batch)
                tokens_acc += tokens_fn(batch) if tokens_fn else 0
            step += 1
            for h in hooks:
                h(step)
            if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
                host = _host(metrics)
                dt = time.time() - t_last
                host["steps_per_s"] = (step - steps_last) / dt
                host["tokens_per_s"] = tokens_acc / dt * jax.process_count()
                host["bad_records"] = float(getattr(data, "bad_records", 0))
                writer.write_scalars(step, host)
                history.append((step, host))
                t_last, steps_last, tokens_acc = time.time(), step, 0
                streak = int(jax.device_get(state["streak"]))
                if streak >= cfg.max_nonfinite_streak:
                    raise FloatingPointError(
                        f"{streak} non-finite steps in a row at step {step}: halting (last good "
                        f"checkpoint kept in {ckpt.directory}); lower the lr or check the data")
            visualize = getattr(objective, "visualize", None)
            if visualize and cfg.sample_every_steps and step % cfg.sample_every_steps == 0:
                _write_samples(visualize, tr, state, batch, writer, workdir_path, step)
            if periodic_eval is not None:
                periodic_eval(step, tr, state)  # every cfg.eval_every_steps
            stop = preemption.check(ckpt, step)
            if step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps or stop:
                _save(ckpt, step, state, data, cfg)
            if stop:
                log.warning("preempted at step %d: checkpoint written, exiting", step)
                break
            if step < cfg.total_steps:
                batch = next(data)
    ckpt.wait()
    ckpt.close()
    writer.flush()
    return {"step": step, "metrics": _host(metrics) if metrics else {}, "history": history,
            "state": state}


_all_finite = jax.jit(train_state.all_finite)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Inside: every object alive on entry (modules, model, compiled steps: ~0.6M) is out of the
    cyclic GC's sight. A full collection over them took ~0.35 s with the GIL held, every few
    checkpoint saves (their Python garbage triggers it), stalling the loop; what the loop
    allocates is still collected, and on exit everything is collectable again."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _save(ckpt: RunCheckpointer, step: int, state, data, cfg) -> None:
    # The finiteness flag is dispatched, not waited for: the checkpointer reads it before
    # writing, so a non-finite state is never checkpointed.
    ckpt.save(step, state, data, cfg, force=True, finite=_all_finite(state["params"]))


def _init_from(path: str, tr: train_state.Trainable, state: dict) -> dict:
    """Parameters only (fine-tuning, converted official weights): optimizer state stays fresh.

    Group ``g`` loads the checkpoint item ``objective.checkpoint_name(g)`` (else ``g``); groups
    whose item is absent keep their init (e.g. the VAE's discriminator), but at least one must
    match, and shapes must match exactly. The EMA starts from the loaded parameters.
    """
    from lavin_jax import checkpoint as params_ckpt

    step, meta = params_ckpt._open(path, None)
    obj = tr.objective
    names = {g: obj.checkpoint_name(g) if hasattr(obj, "checkpoint_name") else g
             for g in obj.groups}
    found = {g: n for g, n in names.items() if n in meta["items"]}
    if not found:
        raise ValueError(f"config.init_from={path!r} holds {meta['items']}, none of the items "
                         f"this objective's groups load ({names}); point it at a params "
                         f"checkpoint of this model, or set config.init_from=''")
    mngr = params_ckpt._manager(path, list(found.values()), read_only=True)
    saved = mngr.item_metadata(step)
    mngr.close()
    problems = [f"{n}: {p}" for g, n in found.items()
                for p in params_ckpt.tree_mismatches(tr.abstract_state["params"][g],
                                                     saved[n].tree)]
    if problems:
        raise ValueError(f"config.init_from={path!r} does not fit the configured model "
                         f"(check config.model): " + "; ".join(problems[:10]))
    abstract = {n: tr.abstract_state["params"][g] for g, n in found.items()}
    loaded, _ = params_ckpt.load_params(path, abstract, step=step)  # restored sharded
    params = dict(state["params"])
    for g, n in found.items():
        params[g] = loaded[n]
        log.info("init_from %s: loaded %s into group %s", path, n, g)
    ema = {g: jax.tree.map(lambda x: x.copy(), params[g]) for g in state["ema"]}
    return {**state, "params": params, "ema": ema}


def _write_samples(visualize, tr, state, batch, writer, workdir, step) -> None:
    params = dict(state["params"])
    # The EMA once its initial weights have decayed below e^-3 (~5%) of it; before that the
    # current params show more (EMA 0.999 needs 3000 steps).
    if tr.ema_groups and step * (1.0 - tr.ema_decay) >= 3.0:
        params.update(state["ema"])
    image = np.asarray(visualize(tr.modules(state, params), batch, step))
    writer.write_images(step, {"samples": image[None]})
    if jax.process_index() == 0:
        from PIL import Image

        (workdir / "samples").mkdir(exist_ok=True)
        Image.fromarray(image).save(os.fspath(workdir / "samples" / f"step_{step:08d}.png"))


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO)
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    hostmem.configure_from(FLAGS.config)  # before the backend starts
    init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        result = train(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:  # its lines are the message; a traceback adds nothing
        raise SystemExit(f"lavin_jax.train: {e}") from None
    log.info("done at step %d: %s", result["step"], result["metrics"])


if __name__ == "__main__":
    app.run(main)
