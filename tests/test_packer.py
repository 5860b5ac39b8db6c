"""The two-stream packer: row planning, row layout invariants, efficiency, checkpointable state."""

import grain
import numpy as np
import pytest

from lavin_jax import packing
from lavin_jax.data import packer

P = 2  # patch
C = 4  # latent channels


def _latent_item(rng, pos, frames_c, frames_x, hw, task_id=0):
    cond = rng.standard_normal((frames_c, hw, hw, C)).astype(np.float32)
    tgt = rng.standard_normal((frames_x, hw, hw, C)).astype(np.float32)
    it = packer.episode_item(cond, tgt, P, pos=pos, task_id=task_id, index=1000 + pos,
                             n_pairs=(frames_c - 1) // 2)
    return it, cond, tgt


def _random_sizes(rng, n):
    tpf = rng.choice([16, 9], n)  # 8x8 and 6x6 latents
    cf = np.where(rng.random(n) < 0.1, 2, 2 * rng.integers(1, 9, n) + 1)
    return [(int(c * t), int(t)) for c, t in zip(cf, tpf)]


def test_plan_row_respects_capacity_and_keeps_the_oldest():
    rng = np.random.default_rng(0)
    spec = packer.RowSpec(cond_len=300, target_len=40, max_segments=5, token_dim=1)
    sizes = [s for s in _random_sizes(rng, 400) if spec.fits(*s)]
    for start in range(0, 300, 7):
        buf = sizes[start:start + 32]
        idx = packer.plan_row(buf, spec)
        assert idx[0] == 0 and len(set(idx)) == len(idx) and idx == [0] + sorted(idx[1:])
        assert len(idx) <= spec.max_segments
        assert sum(buf[j][0] for j in idx) <= spec.cond_len
        assert sum(buf[j][1] for j in idx) <= spec.target_len
    # A perfect fill that greedy largest-first misses (it takes 35 first) is found.
    spec2 = packer.RowSpec(100, 10, 4, 1)
    buf = [(40, 4), (35, 2), (30, 3), (30, 3)]
    idx = packer.plan_row(buf, spec2)
    assert sum(buf[j][0] for j in idx) == 100 and sum(buf[j][1] for j in idx) == 10


def test_rows_hold_whole_episodes_with_consistent_positions_and_ids():
    rng = np.random.default_rng(1)
    spec = packer.RowSpec(cond_len=200, target_len=40, max_segments=4, token_dim=P * P * C)
    made = [_latent_item(rng, i, fc, 1, hw, task_id=i % 3)
            for i, (fc, hw) in enumerate([(3, 4), (5, 6), (2, 4), (1, 6)])]
    items = [m[0] for m in made]
    row = packer.assemble_row(items, spec)
    assert row["cond"].shape == (200, P * P * C) and row["x"].shape == (40, P * P * C)
    assert row["t"].shape == (4,) and row["cond_pos"].dtype == np.int32
    oc = ox = 0
    for s, (it, cond, tgt) in enumerate(made, start=1):
        nc, nx = it["nc"], it["nx"]
        # Segment s occupies one contiguous run in each stream: whole episodes, in order.
        assert np.array_equal(np.flatnonzero(row["cond_seg"] == s), np.arange(oc, oc + nc))
        assert np.array_equal(np.flatnonzero(row["x_seg"] == s), np.arange(ox, ox + nx))
        tc, hw = cond.shape[0], cond.shape[1]
        got_c = packing.unpatchify(row["cond"][None, oc:oc + nc], tc, hw, hw, P)[0]
        got_x = packing.unpatchify(row["x"][None, ox:ox + nx], 1, hw, hw, P)[0]
        np.testing.assert_array_equal(got_c, cond)
        np.testing.assert_array_equal(got_x, tgt)
        # Positions restart per episode: cond frames 0..Tc-1, target frames after.
        np.testing.assert_array_equal(row["cond_pos"][oc:oc + nc],
                                      packing.grid_positions(tc, hw // P, hw // P))
        np.testing.assert_array_equal(row["x_pos"][ox:ox + nx],
                                      packing.grid_positions(1, hw // P, hw // P, tc))
        assert row["seg_task"][s - 1] == it["task_id"] and row["seg_episode"][s - 1] == it["index"]
        oc, ox = oc + nc, ox + nx
    # Padding: segment 0, zero tokens and positions, at the end of each stream.
    assert (row["cond_seg"][oc:] == 0).all() and (row["x_seg"][ox:] == 0).all()
    assert not row["cond"][oc:].any() and not row["cond_pos"][oc:].any()
    assert (row["seg_task"][len(items):] == -1).all()
    with pytest.raises(ValueError, match="overflow"):
        packer.assemble_row(items + items, packer.RowSpec(200, 40, 8, P * P * C))


def test_search_beats_pad_to_max_on_a_mixed_stream():
    rng = np.random.default_rng(2)
    sizes = _random_sizes(rng, 1500)  # 1-8 pairs, two resolutions, 10% dropout
    spec = packer.RowSpec(cond_len=288, target_len=34, max_segments=16, token_dim=1)
    rows = packer.plan_rows([s for s in sizes if spec.fits(*s)], spec, lookahead=64)
    eff = packer.efficiency(rows, spec)
    assert sum(len(r) for r in rows) == sum(spec.fits(*s) for s in sizes)  # nothing lost
    assert eff["packing_efficiency"] >= 0.97, eff
    pad = packer.pad_to_max_efficiency(sizes, 17 * 16, 16)
    assert pad < 0.6 < eff["packing_efficiency"]


def _stream(n=200, seed=3, bad_every=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            items.append({"bad": "non_finite", "pos": i})
            continue
        fc = 2 if rng.random() < 0.1 else 2 * int(rng.integers(1, 5)) + 1
        items.append(_latent_item(rng, i, fc, 1, int(rng.choice([4, 6])))[0])
    return grain.MapDataset.source(items)


def test_pack_iterator_counts_bad_records_and_restores_exactly():
    ds = _stream(bad_every=10)
    spec = packer.RowSpec(cond_len=160, target_len=16, max_segments=6, token_dim=P * P * C)
    packed = packer.PackIterDataset(ds.to_iter_dataset(), spec, lookahead=12,
                                    lookup=ds.__getitem__)
    it = iter(packed)
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [r for r in it]
    assert it.bad["non_finite"] == 20 and it.bad_records == 20
    seen = {int(e) for r in rest for e in r["seg_episode"] if e >= 0}
    it2 = iter(packed)
    it2.set_state(state)
    rest2 = list(it2)
    assert len(rest2) == len(rest) > 0
    for a, b in zip(rest, rest2):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert it2.bad_records == 20 and seen
    # Every good episode is packed exactly once across the whole stream.
    it3 = iter(packed)
    eps = [int(e) for r in it3 for e in r["seg_episode"] if e >= 0]
    assert len(eps) == len(set(eps)) == 180


def test_a_stream_of_only_unusable_records_is_a_clear_error(monkeypatch):
    """E.g. latents with the wrong channel count: every record is bad; stop, do not spin."""
    monkeypatch.setattr(packer, "MAX_BAD_RUN", 30)
    items = [{"bad": "bad_shape", "pos": i, "detail": f"episode {i}: latents (3, 8, 8, 8)"}
             for i in range(100)]
    ds = grain.MapDataset.source(items).repeat()
    spec = packer.RowSpec(cond_len=160, target_len=16, max_segments=6, token_dim=P * P * C)
    it = iter(packer.PackIterDataset(ds.to_iter_dataset(), spec, lookahead=4,
                                     lookup=ds.__getitem__))
    with pytest.raises(ValueError, match=r"last 30 records were all unusable.*bad_shape.*"
                                         r"episode 0: latents \(3, 8, 8, 8\).*in_channels"):
        next(it)
    # bad records between good ones are only counted (the test above): the run resets
    ok = _stream(bad_every=2)
    it = iter(packer.PackIterDataset(ok.to_iter_dataset(), spec, lookahead=4,
                                     lookup=ok.__getitem__))
    assert len(list(it)) > 0
