"""Launchers: Cloud TPU queued resources (tpu.py), GKE via XPK (xpk.py), SLURM (slurm.py)."""
