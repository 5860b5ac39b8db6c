"""String registry of data sources, imported on first use (listing names imports nothing).

An entry is "module:attr" or "module:attr/key" (the key of a mapping attribute). It resolves to
one of two kinds, both handled by lavin_jax.data.prepare:
- a TFDS builder class (e.g. SyntheticScenes): prepare/load by config, read with
  `builder.as_data_source(split)`;
- a source object with `prepare(data_dir, manual_dir=None)` and `open(data_dir, split)` (the
  TfdsSource adapters of real datasets in lavin_jax/data/sources/adapters.py).

Canonical example keys shared by the sources (a source provides a subset): "image" uint8
[H,W,3]; "depth" float32 [H,W] metres; "valid" uint8 [H,W]; "normals" float32 [H,W,3] camera
frame (x right, y down, z forward); "semantic" uint8 [H,W] (0 = background); "instance" int32
[H,W] (0 = background, i = row i-1 of "boxes"); "boxes" float32 [N,4] (ymin, xmin, ymax, xmax
in [0,1]); "box_classes" int32 [N]; "keypoints" float32 [N,K,3] (y, x in [0,1], visible);
"edges" uint8 [H,W] in {0,255}. Clips: "frames" uint8 [T,H,W,3] and per-frame maps [T,H,W,...],
"flow" float32 [T,H,W,2] (dy, dx). Full synthetic schema: lavin_jax/data/render.py.
"""

from __future__ import annotations

import importlib
from typing import Any

_ADAPTERS = "lavin_jax.data.sources.adapters:SOURCES"
SOURCES: dict[str, str] = {
    "synthetic_scenes": "lavin_jax.data.sources.synthetic_scenes:SyntheticScenes",
    **{
        n: f"{_ADAPTERS}/{n}"
        for n in (
            "photos",
            "photos_stereo",
            "nyu_depth_v2",
            "coco_panoptic",
            "voc",
            "voc_segmentation",
            "imagenet2012",
        )
    },
}


def get_source(name: str) -> Any:
    """The builder class or source object registered under `name`."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(SOURCES))}")
    target, _, key = SOURCES[name].partition("/")
    module, attr = target.split(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj[key] if key else obj
