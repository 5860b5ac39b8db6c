"""Host malloc settings: on CPU runs, freed memory is kept and reused, not returned to the OS.

Why: XLA:CPU allocates each execution's temporaries (a train step's: hundreds of MB) with
malloc from its own threads. glibc gives a non-main thread a fresh ``mmap`` for any block larger
than its 64 MB arena heaps and ``munmap``s it on free, so every step page-faults and zeroes all
of it again: about 112k faults per step (0.25 CPU-s for 400 MB) on the 18.6M bench shape, 11-27%
of the step on a 2-core host (BENCHMARKS.md). ``reuse`` puts every thread on the main arena and
raises glibc's mmap and trim thresholds, so the blocks are reused from the second step on (no
faults); the process then keeps its peak heap instead of handing it back.

The price: every thread shares one arena (lock), which costs elsewhere: the CFG sampling loop
ran 10-25% slower with it, and the background checkpoint write interferes more with the step.
So the training entry points (train, demo, bench train) apply ``config.host_malloc``; sampling
and eval tools leave glibc as it is. It must run before the XLA backend starts (its threads
pick their malloc arena once, at their first allocation): :func:`configure` comes first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import platform

log = logging.getLogger(__name__)

MODES = ("auto", "reuse", "system")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_INT_MAX = 2**31 - 1  # mallopt takes an int
_applied: str | None = None


def cpu_only(platforms: str | None = None) -> bool:
    """Whether jax will run on the host's CPUs only: ``platforms`` (default: jax's
    ``jax_platforms``, i.e. ``JAX_PLATFORMS``) names only ``cpu``, or, when nothing is named, no
    accelerator plugin (libtpu, jax_plugins) is installed. Decided without starting a backend."""
    if platforms is None:
        import jax

        platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} <= {"cpu"}
    return not any(importlib.util.find_spec(m) for m in ("libtpu", "jax_plugins"))


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not started
        return False


def add_flag(parser, default: str = "system") -> None:
    """``--host_malloc`` on a benchmark's argparse parser (tools without a run config)."""
    parser.add_argument("--host_malloc", default=default, choices=MODES,
                        help="host malloc setting, as config.host_malloc (lavin_jax.hostmem)")


def configure_from(cfg) -> str:
    """:func:`configure` with a run config's ``host_malloc`` (for train and bench train); an
    invalid value changes nothing here: validate_config reports it, one line."""
    mode = cfg.get("host_malloc", "auto")
    return configure(mode) if mode in MODES else "system"


def configure(mode: str | None = "auto") -> str:
    """Applies ``mode`` ("auto": ``reuse`` when :func:`cpu_only`, else ``system``; ``reuse``;
    ``system``: glibc's defaults, nothing changed) -> the mode in effect. Idempotent; a no-op
    (``system``) where the C library is not glibc. Call before the XLA backend starts."""
    global _applied
    mode = mode or "auto"
    if mode not in MODES:
        raise ValueError(f"config.host_malloc={mode!r}: use one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "reuse" if cpu_only() else "system"
    if mode == "system" or _applied == "reuse":
        return _applied or mode
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("host_malloc=reuse needs glibc; using the system allocator as it is")
        return "system"
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    ok = all(libc.mallopt(opt, value) == 1 for opt, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _INT_MAX), (_M_TRIM_THRESHOLD, _INT_MAX)))
    if not ok:
        log.warning("host_malloc=reuse: glibc refused a mallopt setting; allocator unchanged")
        return "system"
    if _backend_started():
        log.warning("host_malloc=reuse applied after the XLA backend started: its threads keep "
                    "their own malloc arenas (page faults every step); configure it first")
    _applied = "reuse"
    return "reuse"
