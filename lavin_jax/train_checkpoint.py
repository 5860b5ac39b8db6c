"""Run checkpoints: the train state, the data-iterator state and the config, saved atomically.

Layout: ``WORKDIR/checkpoints/<step>/{state,data,config}``. Orbax writes each step to a temporary
directory and renames it when complete, so a kill at any moment (also mid-save) leaves only
complete steps behind; restart resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves ``iterator.get_state()`` as JSON, one file per process."""

    def save(self, directory: epath.Path, args: DataSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.iterator.get_state()))

    def restore(self, directory: epath.Path, args: DataRestore) -> Any:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(
                f"data-iterator state {path} not found (have {found}): the checkpoint was "
                f"written by a different number of processes; resume with the same process "
                f"count, or start the data from scratch with --config.data_restore=False"
            )
        args.iterator.set_state(json.loads(path.read_text()))
        return args.iterator

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
class DataSave(ocp.args.CheckpointArgs):
    def __init__(self, iterator: Any):
        self.iterator = iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
class DataRestore(ocp.args.CheckpointArgs):
    def __init__(self, iterator: Any):
        self.iterator = iterator


class RunCheckpointer:
    """Orbax CheckpointManager for a training run in ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            options=options,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any | None, cfg: ml_collections.ConfigDict,
             *, force: bool = False) -> bool:
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(json.loads(cfg.to_json_best_effort())),
        }
        if iterator is not None:
            items["data"] = DataSave(iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items["data"] = DataRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
