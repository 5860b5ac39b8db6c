"""The episode pipeline: specs, rendering, packed batches, exact resume, process sharding, the
latent cache and its corrupt records. Tiny: 32/24 px scenes rendered in memory, the ToyEncoder
(the demo VAE's geometry: 4x space, 2 temporal halvings, 8 channels)."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from configs.lavin_dit import get_config
from lavin_jax import encode
from lavin_jax.data import episodes, packer, pipeline, render
from lavin_jax.data.tasks import get_task

IMG, CLIP = "synthetic_scenes/64", "synthetic_scenes/clips5_64"


@pytest.fixture(scope="module")
def sources():
    return {IMG: [render.render_example(s, 32) for s in range(6)],
            CLIP: [render.render_clip(s, 32, 5) for s in range(2)]}


def small_config(mode="render", **over):
    cfg = get_config("demo")
    cfg.model.in_channels = 8  # the ToyEncoder's (and the tiny VAEs') latent channels
    d = cfg.data
    d.mode = mode
    d.tasks = {"depth": 1.0, "colorization": 1.0, "foreground": 1.0, "video_depth": 0.5}
    d.pairs = [1.0, 1.0, 1.0, 1.0]
    d.resolutions, d.resolution_weights = [32, 24], [1.0, 1.0]
    d.cond_len, d.target_len, d.max_segments, d.lookahead = 320, 48, 8, 16
    d.global_batch, d.prefetch, d.read_threads = 2, 0, 1
    cfg.flow.context_dropout = 0.25
    with d.ignore_type():  # e.g. cache_dir str -> [(dir, weight)]
        for k, v in over.items():  # assignment replaces (ConfigDict.update would merge dicts)
            setattr(d, k, v)
    return cfg


def make_it(cfg, sources, **kw):
    return pipeline.make_train_iterator(cfg, encoder=encode.ToyEncoder(), sources=sources,
                                        process_index=kw.pop("pi", 0),
                                        process_count=kw.pop("pc", 1), **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_episode_specs_are_deterministic_and_follow_the_config(sources):
    cfg = small_config()
    sampler, _, tasks = pipeline.episode_sources(cfg, sources)
    specs = [sampler.spec(i) for i in range(300)]
    assert specs == [sampler.spec(i) for i in range(300)]  # a pure function of (seed, index)
    assert {s.n_pairs for s in specs} == {1, 2, 3, 4}
    assert {s.resolution for s in specs} == {(32, 32), (24, 24)}
    assert {s.task for s in specs} == {"colorization", "depth", "foreground", "video_depth"}
    for s in specs:
        assert len(s.examples) == s.n_pairs + 1 and tasks[s.task_id].name == s.task
        assert s.source == (CLIP if s.task == "video_depth" else IMG)
    cfg.data.seed = 1
    other = pipeline.episode_sources(cfg, sources)[0]
    assert [other.spec(i) for i in range(20)] != specs[:20]


def test_render_episode_frames_and_a_shared_foreground_class(sources):
    cfg = small_config()
    sampler, srcs, tasks = pipeline.episode_sources(cfg, sources)
    spec = next(s for s in map(sampler.spec, range(100)) if s.task == "video_depth")
    r = pipeline.render_spec(spec, tasks, srcs)
    assert len(r["items"]) == 2 * (spec.n_pairs + 1)
    assert all(it.shape == (5, *spec.resolution, 3) and it.dtype == np.uint8 for it in r["items"])
    task = get_task("foreground")
    spec = next(s for s in map(sampler.spec, range(100)) if s.task == "foreground"
                and s.n_pairs >= 2)
    r = pipeline.render_spec(spec, tasks, srcs)
    cls = task.choose(srcs[IMG][spec.examples[-1]], np.random.default_rng(spec.seed))["cls"]
    for e in r["examples"]:  # every example used shows the query's class (spares replace others)
        assert (srcs[IMG][e]["semantic"] == cls).any()
    assert episodes.resize_frames(np.zeros((1, 40, 30, 3), np.uint8), (24, 24)).shape == (
        1, 24, 24, 3)


def test_render_mode_batches_are_packed_rows(sources):
    cfg = small_config()
    it = make_it(cfg, sources)
    batches = take(it, 4)
    b = batches[0]
    assert b["cond"].shape == (2, 320, 32) and b["x"].shape == (2, 48, 32)
    assert b["cond_pos"].shape == (2, 320, 3) and b["t"].shape == (2, 8)
    dropped = 0
    for b in batches:
        for r in range(2):
            segs = [s for s in np.unique(b["cond_seg"][r]) if s > 0]
            assert segs == list(range(1, len(segs) + 1))
            assert set(np.unique(b["x_seg"][r])) - {0} == set(segs)
            for s in segs:
                cpos = b["cond_pos"][r][b["cond_seg"][r] == s]
                xpos = b["x_pos"][r][b["x_seg"][r] == s]
                tc = cpos[:, 0].max() + 1
                assert xpos[:, 0].min() == tc  # target frames follow the cond frames
                if b["seg_task"][r, s - 1] != 3 and tc == 2:  # an image null context
                    dropped += 1
    assert dropped > 0  # context dropout (p=0.25) happened
    assert it.stats()["packing_efficiency"] > 0.5
    it.close()


def test_exact_resume(sources):
    cfg = small_config()
    it = make_it(cfg, sources)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the trainer's checkpoint stores
    expect = take(it, 3)
    it.close()
    fresh = make_it(cfg, sources)
    fresh.set_state(state)
    assert_same(take(fresh, 3), expect)
    fresh.close()
    with pytest.raises(ValueError, match="different pipeline"):
        make_it(small_config(seed=5), sources).set_state(state)


@pytest.mark.slow
def test_exact_resume_with_worker_processes_and_prefetch(sources):
    cfg = small_config(workers=2, prefetch=2)
    it = make_it(cfg, sources)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    expect = take(it, 3)
    it.close()
    fresh = make_it(cfg, sources)
    fresh.set_state(state)
    assert_same(take(fresh, 3), expect)
    fresh.close()


def _episodes(batches):
    return [int(e) for b in batches for e in b["seg_episode"].ravel() if e >= 0]


def test_two_processes_read_disjoint_episodes(sources):
    cfg = small_config()
    a = _episodes(take(make_it(cfg, sources, pi=0, pc=2), 3))
    b = _episodes(take(make_it(cfg, sources, pi=1, pc=2), 3))
    assert a and b and not set(a) & set(b)
    assert {e % 2 for e in a} == {0} and {e % 2 for e in b} == {1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, sources):
    d = tmp_path_factory.mktemp("latents")
    cfg = small_config()
    encode.write_cache(cfg, d, encode.ToyEncoder(), 24, process_index=0, process_count=2,
                       sources=sources)
    encode.write_cache(cfg, d, encode.ToyEncoder(), 24, process_index=1, process_count=2,
                       sources=sources)
    return d


def test_cache_holds_the_episode_latents(cache, sources):
    cfg = small_config("cache", cache_dir=str(cache))
    sampler, srcs, tasks = pipeline.episode_sources(cfg, sources)
    assert len(encode.cache_files(cache)) == 2
    stream = pipeline.cache_stream(cfg, 0, 1)
    items = [stream[i] for i in range(24)]
    assert sorted(it["index"] for it in items) == list(range(24))  # one epoch = every episode
    for it in items[:4]:  # the cached latents are the encoder's (stored as float16)
        z = encode.encode_items(encode.ToyEncoder(), [
            pipeline.render_spec(sampler.spec(it["index"]), tasks, srcs)["items"]])[0]
        ep = encode.latent_episode([np.asarray(v, np.float16).astype(np.float32) for v in z])
        want = packer.episode_item(ep["cond"], ep["target"], 2)
        np.testing.assert_array_equal(it["x"], want["x"])
        if it["nc"] == want["nc"]:  # not context-dropped
            np.testing.assert_array_equal(it["cond"], want["cond"])
    # Two processes read disjoint halves of the cache.
    a = {pipeline.cache_stream(cfg, 0, 2)[i]["index"] for i in range(12)}
    b = {pipeline.cache_stream(cfg, 1, 2)[i]["index"] for i in range(12)}
    assert len(a) == len(b) == 12 and not a & b


def test_corrupt_records_are_skipped_and_counted(cache, tmp_path, sources):
    for f in encode.cache_files(cache):  # the good shards, plus one shard of bad records
        (tmp_path / f.rsplit("/", 1)[1]).symlink_to(f)
    spec = pipeline.episode_sources(small_config(), sources)[0].spec(0)
    nan = encode.to_record(spec, [0], {"cond": np.full((3, 8, 8, 8), np.nan),
                                       "target": np.zeros((1, 8, 8, 8)), "query_frames": 1})
    wrong = {**serialization.msgpack_restore(nan), "cond": np.zeros((3, 8, 8, 5), np.float16)}
    w = ArrayRecordWriter(str(tmp_path / "latents-00009-of-00009.array_record"), "group_size:1")
    for rec in (b"\x00not a msgpack record", nan, serialization.msgpack_serialize(wrong)):
        w.write(rec)
    w.close()
    cfg = small_config("cache", cache_dir=str(tmp_path))
    stream = pipeline.cache_stream(cfg, 0, 1)
    reasons = sorted(stream[i]["bad"] for i in range(27) if "bad" in stream[i])
    assert reasons == ["bad_shape", "non_finite", "undecodable"]
    it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
    take(it, 12)  # reads more than one epoch (27 records)
    st = it.stats()
    assert st["episodes"] >= 24 and it.bad_records >= 3
    assert min(st["bad_undecodable"], st["bad_non_finite"], st["bad_bad_shape"]) >= 1
    it.close()


def test_batches_feed_the_flow_loss_on_a_mesh(sources):
    import jax
    from flax import nnx

    from lavin_jax import flow, packing, sharding
    from lavin_jax.models.jdit import JDiT, JDiTConfig

    cfg = small_config(global_batch=8)
    it = make_it(cfg, sources)
    batch = next(it)
    it.close()
    mesh = sharding.make_mesh(cfg)
    glob = sharding.shard_batch(batch, mesh, cfg.sharding.rules)
    assert glob["cond"].shape == (8, 320, 32) and len(glob["cond"].sharding.device_set) == 8
    # The demo model consumes the batch (abstractly: shapes and dtypes, no compute).
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: JDiT(JDiTConfig.from_config(cfg.model), rngs=nnx.Rngs(0))))
    packed = packing.Packed(**{k: batch[k] for k in packing.Packed._fields})
    loss = jax.eval_shape(lambda st, b: flow.packed_loss(nnx.merge(graphdef, st), b,
                                                         jax.random.key(0))[0], state, packed)
    assert loss.shape == () and loss.dtype == np.float32


def test_online_mode_rows_encode_to_the_render_mode_rows(sources):
    import jax
    import jax.numpy as jnp

    from lavin_jax.data import online

    toy = encode.ToyEncoder()

    def encode_fn(x):  # the ToyEncoder in jnp, as the train step would run the VAE
        n, _, h, w, _ = x.shape
        y = (x.astype(jnp.float32) / 127.5 - 1.0).reshape(n, 1, h // 4, 4, w // 4, 4, 3)
        return jnp.tanh(y.mean((3, 5)) @ toy.proj)

    over = dict(tasks={"depth": 1.0, "colorization": 1.0, "foreground": 1.0})
    dense = take(make_it(small_config(**over), sources), 3)
    it = make_it(small_config("online", **over), sources)
    raw = take(it, 3)
    assert raw[0]["pix_0"].shape == (2, 368 // 16, 32, 32, 3)
    assert raw[0]["pix_1"].shape == (2, 368 // 9, 24, 24, 3)
    state = it.get_state()
    to_packed = jax.jit(lambda b: online.to_packed(b, encode_fn, 2))
    for a, b in zip(dense, raw):
        got = to_packed({k: v for k, v in b.items() if k not in ("seg_task", "seg_episode")})
        for k in ("cond_pos", "x_pos", "cond_seg", "x_seg"):
            np.testing.assert_array_equal(a[k], np.asarray(getattr(got, k)), err_msg=k)
        np.testing.assert_allclose(np.asarray(got.cond), a["cond"], atol=2e-6)
        np.testing.assert_allclose(np.asarray(got.x), a["x"], atol=2e-6)
    expect = take(it, 2)
    fresh = make_it(small_config("online", **over), sources)
    fresh.set_state(state)
    assert_same(take(fresh, 2), expect)
    with pytest.raises(ValueError, match="image tasks only"):
        make_it(small_config("online"), sources)


def test_caches_mix_by_weight_and_rows_must_fit(cache, tmp_path, sources):
    other = small_config(seed=7)
    encode.write_cache(other, tmp_path, encode.ToyEncoder(), 8, sources=sources)

    def keys(cfg, n):
        s = pipeline.cache_stream(cfg, 0, 1)
        return [(s[i]["index"], float(s[i]["x"].sum())) for i in range(n)]

    a = set(keys(small_config("cache", cache_dir=str(cache)), 24))
    b = set(keys(small_config("cache", cache_dir=str(tmp_path)), 8))
    mixed = keys(small_config("cache", cache_dir=[(str(cache), 3.0), (str(tmp_path), 1.0)]), 40)
    assert all(k in a or k in b for k in mixed)
    assert sum(k in b for k in mixed) == 10  # a quarter of the stream from the second cache
    with pytest.raises(ValueError, match="largest episode"):
        make_it(small_config(cond_len=100), sources)


def test_online_mode_trains_through_the_flow_objective(sources, tmp_path):
    """Online rows + a real (tiny) frozen ST-VAE checkpoint -> a finite flow loss and grads."""
    import dataclasses

    import jax
    from flax import nnx

    from lavin_jax import checkpoint
    from lavin_jax.models.stvae import STVAE, STVAEConfig
    from lavin_jax.objectives.flow import FlowObjective

    vcfg = STVAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=8,
                       norm_num_groups=4, spatial_norm_groups=4)
    with nnx.use_eager_sharding(False):
        vae = STVAE(vcfg, rngs=nnx.Rngs(0))
    checkpoint.save_params(tmp_path / "vae", {"stvae": nnx.to_pure_dict(nnx.state(vae, nnx.Param))},
                           {"configs": {"stvae": dataclasses.asdict(vcfg)}})
    cfg = small_config("online", tasks={"depth": 1.0, "colorization": 1.0})
    cfg.data.vae_checkpoint = str(tmp_path / "vae")
    cfg.model.update(hidden_size=48, depth=1, num_heads=4, kv_group=2)
    objective = FlowObjective(cfg)
    batch = next(make_it(cfg, sources))
    with nnx.use_eager_sharding(False):
        modules = objective.build(nnx.Rngs(0))

    def loss(model):
        return objective.loss("model", {"model": model}, batch, jax.random.key(0), 0, {})[0]

    value, grads = nnx.value_and_grad(loss)(modules["model"])
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
