"""In-training evaluation: lavin_jax/evaluate.py's evaluators every ``eval_every_steps``.

The training loop (lavin_jax/train.py) builds ``PeriodicEval.create(cfg, workdir, writer)``
(None when off) and calls it after every step with the train state; on steps that are
multiples of ``cfg.eval_every_steps`` it evaluates the J-DiT (the EMA params when the run keeps
them, once the EMA has forgotten its initial weights) on a small fixed subset:

- ``cfg.eval.tasks`` ([] or missing = the training tasks, config.data.tasks);
- the eval settings of lavin_jax/evaluate.py (config.eval over config.sample) overridden by
  ``cfg.eval.in_training`` (e.g. {num_examples: 8, num_steps: 10}); the episodes are the same
  at every step, so the curves compare like with like;
- ``cfg.eval.in_training.task_identification`` (bool): also the task identification accuracy.

Scalars go to the run's metric writer as ``eval/<task>/<metric>`` and
``eval/<task>/baseline/<metric>`` (+ ``eval/task_identification/accuracy``); reports to
WORKDIR/eval/<task>/step_<N>.json (+ .png). The ST-VAE that encodes the episodes and decodes
the predictions is config.data.vae_checkpoint: without one (or "toy") the hook logs a note and
stays off. A failing evaluation is logged and training goes on.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from lavin_jax import evaluate, flow, sample, sharding

log = logging.getLogger(__name__)


def _host_params(module):
    """``module`` with parameters sharded over several processes gathered to every host (the
    eval predicts on local devices only)."""
    from flax import nnx
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(one, state))


def eval_module(tr, state: dict[str, Any], step: int) -> tuple[Any, str]:
    """(the J-DiT of the train state, "ema" | "params"): the EMA params when the run keeps them
    and its initial (random) weights have decayed below e^-3 of it, else the current params
    (an EMA of decay 0.999 still holds 37% of the initial weights at step 1000)."""
    ema = dict(state.get("ema") or {})
    decay = float(getattr(tr, "ema_decay", 0.0))
    use_ema = "model" in ema and step * (1.0 - decay) >= 3.0
    params = {**state["params"], **ema} if use_ema else state["params"]
    module = tr.modules(state, params)["model"]
    if jax.process_count() > 1:
        module = _host_params(module)
    return module, "ema" if use_ema else "params"


class PeriodicEval:
    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, writer=None):
        self.cfg, self.workdir, self.writer = cfg, str(workdir), writer
        self.every = int(cfg.get("eval_every_steps") or 0)
        over = dict((cfg.get("eval") or {}).get("in_training") or {})
        self.with_ti = bool(over.pop("task_identification", False))
        self.tasks = evaluate.default_tasks(cfg)
        for t in self.tasks:
            evaluate.held_out(cfg, t)  # a task both trained and held out is a config error
        # config errors fail here, before training
        self.settings = s = evaluate.eval_settings(cfg, over)
        flow.time_grid(int(s["num_steps"]), s["grid"], float(s["shift"]))
        self.vae_path = str(cfg.data.get("vae_checkpoint", "") or "")
        self._vae = self._predict = None
        self._sources: dict[str, Any] = {}

    @classmethod
    def create(cls, cfg: ml_collections.ConfigDict, workdir: str, writer=None
               ) -> PeriodicEval | None:
        """The hook, or None (logged) when the run has no eval: not a J-DiT run,
        eval_every_steps <= 0, or no ST-VAE checkpoint to decode with."""
        if (cfg.get("model") or {}).get("name") != "jdit" or int(
                cfg.get("eval_every_steps") or 0) <= 0:
            return None
        vae = str((cfg.get("data") or {}).get("vae_checkpoint", "") or "")
        if not vae or vae == "toy" or not epath.Path(vae).exists():
            log.warning("in-training eval off: config.data.vae_checkpoint=%r is not an ST-VAE "
                        "checkpoint to decode predictions with (run lavin_jax.evaluate later)",
                        vae)
            return None
        return cls(cfg, workdir, writer)

    def __call__(self, step: int, tr, state: dict[str, Any]) -> dict[str, float] | None:
        """Evaluates when ``step`` is a multiple of eval_every_steps -> the scalars written."""
        if self.every <= 0 or step % self.every:
            return None
        try:
            jdit, which = eval_module(tr, state, step)
            return self.run(step, jdit, which)
        except Exception:  # an eval bug must not end a long training run
            log.exception("in-training eval at step %d failed; training goes on", step)
            return None

    def _predictor(self, jdit):
        from lavin_jax import checkpoint

        if self._vae is None:
            self._vae = checkpoint.load_model(self.vae_path, "stvae")
        if self._predict is None:
            self._predict = evaluate.Predictor(jdit, self._vae, self.settings)
        else:  # keep the compiled VAE codec; swap in the new params
            p = self._predict
            p.jdit = jdit if p.sharding is None else sample.replicate(jdit, p.sharding.mesh)
        return self._predict

    def run(self, step: int, jdit, which: str = "params", **kw) -> dict[str, float]:
        """Evaluates ``jdit`` now; ``kw`` goes to lavin_jax.evaluate.evaluate (tests)."""
        predict = kw.pop("predict", None) or self._predictor(jdit)
        for t in self.tasks:
            e = evaluate.task_entry(self.cfg, t)
            if e.source not in self._sources and "sources" not in kw:
                self._sources[e.source] = evaluate.open_source(self.cfg, e.source,
                                                               self.settings["split"])
        kw.setdefault("sources", self._sources)
        common = dict(jdit=jdit, vae=self._vae, step=step, settings=self.settings,
                      provenance={"params": which, "in_training": True}, predict=predict, **kw)
        # The train loop's sharding rules name the training mesh; the eval runs on its own
        # local-device mesh, so model constraints are switched off (a 1-device mesh is a no-op).
        with sharding.use_rules(jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]),
                                                  ("batch",)), ()):
            reps = evaluate.evaluate(self.cfg, self.workdir, self.tasks, **common)
            ti = None
            if self.with_ti:
                from lavin_jax import eval_incontext

                ti = eval_incontext.task_identification(self.cfg, self.workdir, **common)
        scalars = {}
        for t, r in reps.items():
            scalars.update({f"eval/{t}/{m}": v for m, v in r["metrics"].items() if v is not None})
            scalars.update({f"eval/{t}/baseline/{m}": v for m, v in r["baseline"].items()
                            if v is not None})
        if ti is not None:
            scalars["eval/task_identification/accuracy"] = ti["accuracy"]
        if self.writer is not None and jax.process_index() == 0:
            self.writer.write_scalars(step, scalars)
        log.info("in-training eval at step %d: %d scalars", step, len(scalars))
        return scalars
