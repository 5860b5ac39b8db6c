"""Host malloc settings (lavin_jax.hostmem): reuse removes the per-step page faults."""

import json
import os
import subprocess
import sys

import pytest

from lavin_jax import hostmem
from lavin_jax.run_config import ConfigError, base_config, validate_config

# A jitted function with ~100 MB of temporaries per call (larger than glibc's 64 MB thread
# arena heaps, so with the system setting every call maps and faults them in afresh).
_PROBE = r"""
import json, resource, sys
from lavin_jax import hostmem
mode = hostmem.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.arange(5 * 2**20, dtype=jnp.float32).reshape(1280, 4096)

@jax.jit
def f(x):
    y = jnp.cumsum(jnp.sin(x), axis=0)  # materialised: 20 MB each
    return [jnp.sum(jnp.cumsum(y * k, axis=1)) for k in range(1, 5)]

for _ in range(30):  # reuse: the heap grows to its working size over the first calls
    jax.block_until_ready(f(x))
per_call = []
for _ in range(11):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
# median: the host may reclaim idle pages of the kept heap now and then (e.g. DAMON)
print(json.dumps({"mode": mode, "faults_per_call": sorted(per_call)[5]}))
"""


def _probe(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_reuse_removes_per_call_page_faults():
    system, reuse = _probe("system"), _probe("auto")
    assert system["mode"] == "system" and reuse["mode"] == "reuse"  # auto: CPUs only -> reuse
    # system: the temporaries are faulted in on every call (4 KiB pages: thousands per call)
    assert system["faults_per_call"] > 5000, system
    assert reuse["faults_per_call"] < system["faults_per_call"] / 20, (system, reuse)


def test_auto_follows_the_platforms(monkeypatch):
    assert hostmem.cpu_only("cpu") and not hostmem.cpu_only("tpu")
    assert not hostmem.cpu_only("cuda,cpu")
    # nothing named: an installed accelerator plugin means "not CPU only"
    monkeypatch.setattr(hostmem.importlib.util, "find_spec",
                        lambda name: object() if name == "libtpu" else None)
    assert not hostmem.cpu_only("")
    monkeypatch.setattr(hostmem.importlib.util, "find_spec", lambda name: None)
    assert hostmem.cpu_only("")


def test_bad_mode_is_one_clear_line():
    with pytest.raises(ValueError, match=r"config.host_malloc='fast': use one of auto, reuse"):
        hostmem.configure("fast")
    cfg = base_config()
    cfg.host_malloc = "fast"
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, 1)
    assert "config.host_malloc='fast' must be one of auto, reuse, system" in str(e.value)


def test_late_configure_warns():
    # After the backend started, XLA's threads keep their arenas: say so.
    script = ("import jax, logging; logging.basicConfig(); jax.devices(); "
              "from lavin_jax import hostmem; print(hostmem.configure('reuse'))")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
    assert r.stdout.strip().endswith("reuse")
    assert "applied after the XLA backend started" in r.stderr


def test_entry_modules_do_not_start_the_backend_on_import():
    # The entry points call hostmem.configure first thing in main(); that is only in time if
    # importing them has not started the XLA backend already.
    script = ("import importlib\n"
              "for m in ('lavin_jax.train', 'lavin_jax.demo', 'lavin_jax.tools.bench_train',\n"
              "          'lavin_jax.tools.bench_jdit', 'lavin_jax.tools.bench_stvae'):\n"
              "    importlib.import_module(m)\n"
              "from jax._src import xla_bridge\n"
              "print(xla_bridge.backends_are_initialized())")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr[-2000:]
