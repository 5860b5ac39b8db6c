"""The ST-VAE frames pipeline: shapes, mixing, bad records, exact resume, disjoint processes."""

import ml_collections
import numpy as np

from lavin_jax.data import frames


def _cfg(batch=4):
    return ml_collections.ConfigDict(dict(data=dict(
        kind="frames", global_batch=batch, image_size=16, seed=0,
        sources=[dict(name="a", weight=1.0), dict(name="b", weight=0.5)])))


def _sources():
    rng = np.random.default_rng(0)
    a = [{"image": rng.integers(0, 255, (20, 24, 3), np.uint8), "id": i} for i in range(12)]
    a.append({"label": 3})  # undecodable: no pixels
    a.append({"image": np.zeros((4, 4), np.uint8)})  # wrong shape
    b = [{"frames": rng.integers(0, 255, (5, 16, 16, 3), np.uint8)} for _ in range(6)]
    return {"a": a, "b": b}


def test_batches_shapes_mixing_and_bad_records_counted():
    it = frames.make_frames_iterator(_cfg(), process_index=0, process_count=1, sources=_sources())
    shapes = [next(it)["video"].shape for _ in range(12)]
    assert set(shapes) == {(4, 1, 16, 16, 3), (4, 5, 16, 16, 3)}
    assert shapes.count((4, 1, 16, 16, 3)) > shapes.count((4, 5, 16, 16, 3))
    batch = next(it)["video"]
    assert batch.dtype == np.float32 and batch.min() >= -1 and batch.max() <= 1
    assert it.bad_records >= 2


def test_exact_resume():
    it = frames.make_frames_iterator(_cfg(), process_index=0, process_count=1, sources=_sources())
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it)["video"] for _ in range(4)]
    fresh = frames.make_frames_iterator(_cfg(), process_index=0, process_count=1,
                                        sources=_sources())
    fresh.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(fresh)["video"], w)


def test_two_processes_read_disjoint_examples():
    cfg = _cfg(batch=2)
    cfg.data.sources = [dict(name="a", weight=1.0)]
    src = {"a": [{"image": np.full((16, 16, 3), i, np.uint8)} for i in range(8)]}
    seen = []
    for p in range(2):
        it = frames.make_frames_iterator(cfg, process_index=p, process_count=2, sources=src)
        vals = {int(round((v + 1) * 127.5)) for _ in range(4) for v in next(it)["video"][:, 0,
                                                                                      0, 0, 0]}
        seen.append(vals)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_task_renders_mixed_into_frames():
    # An entry with `tasks` yields RGB frames or a task's rendered input/target (here: depth
    # maps, gray), so the demo VAE also learns to draw task outputs.
    from test_tasks import image_example

    cfg = ml_collections.ConfigDict(dict(data=dict(
        kind="frames", global_batch=2, image_size=16, seed=0,
        sources=[dict(name="s", weight=1.0, tasks=["depth"])])))
    src = {"s": [image_example(32, 32, seed=i) for i in range(8)]}
    it = frames.make_frames_iterator(cfg, process_index=0, process_count=1, sources=src)
    batch = np.concatenate([next(it)["video"] for _ in range(8)])  # [16, 1, 16, 16, 3]
    gray = np.abs(batch[..., 0] - batch[..., 1]).max((1, 2, 3)) < 1e-6
    assert gray.any() and not gray.all() and it.bad_records == 0
