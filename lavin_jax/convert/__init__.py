"""Converters from the released LaVin-DiT weights (PyTorch) to our NNX models.

``python -m lavin_jax.convert --dit PATH --vae PATH --out DIR`` writes a params checkpoint
(lavin_jax/checkpoint.py) that the trainer and sampler load.
"""

from lavin_jax.convert.jdit import load_official_jdit
from lavin_jax.convert.stvae import load_official_stvae

__all__ = ["load_official_jdit", "load_official_stvae"]
