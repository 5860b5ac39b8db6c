"""Data sources (TFDS builders read as random-access ArrayRecord data sources)."""
