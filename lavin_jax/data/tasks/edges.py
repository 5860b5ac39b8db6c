"""Edge detection: white edges on black (the source's {0, 255} edge map, as gray RGB).

Decoding returns a soft edge map, float32 [H,W] = gray level / 255 (edge metrics sweep a
threshold); on clean targets it is exactly 0/1, so ``decode > 0.5`` gives back the edge mask.
"""

from __future__ import annotations

import numpy as np

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.drawing import gray_rgb, image_of, per_frame, pred_frames, single


@register
class EdgesTask(Task):
    name = "edges"
    requires = ("image", "edges")
    metrics = ("ods_f", "ois_f")

    def draw(self, example, choice):
        return image_of(example), gray_rgb((per_frame(example, "edges") > 127) * 255.0)

    def truth(self, example, choice=None):
        """bool [H,W] edge mask."""
        return single(per_frame(example, "edges") > 127, self.is_video)

    def decode(self, pred, ctx=None):
        """float32 [H,W] edge strength in [0, 1]."""
        return single(pred_frames(pred).mean(-1) / 255.0, self.is_video)

    def baseline(self, example, choice=None):
        """No edges."""
        return np.zeros(np.asarray(example["edges"]).shape, np.float32)
