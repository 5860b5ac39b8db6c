"""Converters from the released LaVin-DiT weights (PyTorch) to our NNX models.

``python -m lavin_jax.convert --dit PATH --vae PATH --out DIR`` writes a params checkpoint
(lavin_jax/checkpoint.py) that the trainer and sampler load.
"""

from lavin_jax.convert.jdit import load_official_jdit

__all__ = ["load_official_jdit", "load_official_stvae"]


def __getattr__(name: str):
    # The ST-VAE converter is imported on first use (it pulls in the VAE model code).
    if name == "load_official_stvae":
        from lavin_jax.convert.stvae import load_official_stvae

        return load_official_stvae
    raise AttributeError(f"module 'lavin_jax.convert' has no attribute {name!r}")
