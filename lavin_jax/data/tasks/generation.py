"""Conditional generation: a dense task with input and target swapped.

depth->image, normal->image and pose->image show the depth / normal / pose drawing and ask
for the photo (depth->video, normal->video in video.py do the same for clips). The drawing is
exactly the base task's target (same options, same choices). Decode is the identity (float
image in [0, 1]); the baseline "copies the input", i.e. returns the drawing itself as the image.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lavin_jax.data.tasks import Task, register
from lavin_jax.data.tasks.depth import DepthTask
from lavin_jax.data.tasks.drawing import single, unit_image
from lavin_jax.data.tasks.normals import NormalsTask
from lavin_jax.data.tasks.pose import PoseTask


class Swapped(Task):
    """``base``'s rendering with inputs and targets exchanged; options go to the base task."""

    base: ClassVar[type[Task]]
    metrics = ("fid", "psnr")
    higher_is_better = False

    @classmethod
    def default_options(cls):
        return cls.base.default_options()

    def __init__(self, **options):
        super().__init__(**options)
        self._base = self.base(**options)
        self.requires, self.is_video = self._base.requires, self._base.is_video
        self.frames = self._base.frames[::-1]

    def choose(self, example, rng):
        return self._base.choose(example, rng)

    def draw(self, example, choice):
        inputs, targets = self._base.draw(example, choice)
        return targets, inputs

    def truth(self, example, choice=None):
        """The photo(s), float32 [(T,)H,W,3] in [0, 1]."""
        c = self.default_choice(example, choice)
        return single(self.draw(example, c)[1] / np.float32(255), self.is_video)

    def decode(self, pred, ctx=None):
        return unit_image(pred, self.is_video)

    def baseline(self, example, choice=None):
        """The condition drawing itself, as an image."""
        c = self.default_choice(example, choice)
        return single(self.draw(example, c)[0] / np.float32(255), self.is_video)


@register
class DepthToImageTask(Swapped):
    name = "depth_to_image"
    base = DepthTask


@register
class NormalToImageTask(Swapped):
    name = "normal_to_image"
    base = NormalsTask


@register
class PoseToImageTask(Swapped):
    name = "pose_to_image"
    base = PoseTask
