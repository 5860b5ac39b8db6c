"""The official template-folder format: context pairs `<id>_input.png` / `<id>_target.png`.

A folder holds one task's example pairs (the released ``template/depth_estimation`` etc.). Ids
are the file names without the ``_input.png`` / ``_target.png`` suffix (so they may contain
underscores); other files are ignored. :func:`read_template` checks the whole folder up front:
every id needs both files and every image must be readable, else a ValueError names the file.
Images load as uint8 RGB [H, W, 3], resized with bicubic antialiased filtering (the release
resizes the same way) when a size is given.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

INPUT, TARGET = "_input.png", "_target.png"


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    input: pathlib.Path
    target: pathlib.Path


def check_image(path: str | pathlib.Path, what: str = "image") -> None:
    """Raises ValueError naming ``path`` if it is missing or not a readable image."""
    from PIL import Image

    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {p} does not exist")
    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
        raise ValueError(f"{what} {p} is not a readable image ({type(e).__name__}: {e})") from e


def load_image(path: str | pathlib.Path, size: tuple[int, int] | None = None,
               what: str = "image") -> np.ndarray:
    """uint8 RGB [H, W, 3]; resized to ``size`` = (height, width) when given."""
    from PIL import Image

    p = pathlib.Path(path)
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return np.asarray(im, np.uint8).copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {p} does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{what} {p} is not a readable image ({type(e).__name__}: {e})") from e


def read_template(folder: str | pathlib.Path) -> list[Pair]:
    """The folder's pairs sorted by id, after checking that every file pairs up and opens."""
    d = pathlib.Path(folder)
    if not d.is_dir():
        raise ValueError(f"template folder {d} does not exist (want <id>_input.png / "
                         "<id>_target.png pairs)")
    inputs = {p.name[: -len(INPUT)]: p for p in d.iterdir() if p.name.endswith(INPUT)}
    targets = {p.name[: -len(TARGET)]: p for p in d.iterdir() if p.name.endswith(TARGET)}
    for ids, have, want in ((inputs, "input", TARGET), (targets, "target", INPUT)):
        other = targets if have == "input" else inputs
        lonely = sorted(set(ids) - set(other))
        if lonely:
            raise ValueError(f"template folder {d}: {ids[lonely[0]].name} has no matching "
                             f"{lonely[0]}{want} ({len(lonely)} unpaired {have} file(s))")
    if not inputs:
        raise ValueError(f"template folder {d} has no <id>_input.png / <id>_target.png pairs")
    pairs = [Pair(i, inputs[i], targets[i]) for i in sorted(inputs)]
    for p in pairs:
        check_image(p.input, "template input")
        check_image(p.target, "template target")
    return pairs
