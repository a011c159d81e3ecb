"""Colour and shape faithfulness of images to a prompt of the procedural world, from pixels alone.

An automatic check independent of the reward model (``training.rewards.AttributeClassifier`` is
never used): nothing here is trained by gradient descent, and every reference comes from the
world's own definition (``COLOURS``, the ground's greys, the shading model) or from its exact
renders.

1. **Colour** (per pixel, no learning). The world shades an albedo ``a`` as ``s·a`` with ``s``
   between the ambient term and 1 (``render.py``); the ground is a grey checker. Each pixel is
   explained by every reference — the ten ``COLOURS`` and the ground — with its best shading
   ``s`` (a 1-parameter least-squares fit, ``s`` clamped to the reference's range); a pixel
   belongs to the best-fitting object colour when that fit is within ``max_residual`` and beats
   the ground's by ``margin`` (ambiguous greys go to the ground: a white object is found by its
   lit faces). A colour is *present* when it covers ``min_share`` of all pixels of the clip
   and ``min_object_share`` of its object pixels.
2. **Shape** (nearest neighbours over silhouettes). For each prompted object, the largest
   connected region of its colour in each frame is cropped to its bounding box, padded to a
   square and reduced to a ``grid``×``grid`` occupancy map, plus a brightness map (normalised
   by the region's brightest pixel: faces vs gradients) and the log aspect ratio. Each frame
   votes with its ``neighbours`` nearest descriptors in a bank built the same way from exact
   world renders of *train-split* scenes (label = the object's true shape); the shape with the
   most votes over the clip wins. Regions touching the image border are used only when no
   frame has a whole one.

A prompt passes *colour* when every prompted colour is present and no unprompted colour
covers ``extra_object_share`` of the object pixels, *shape* when every prompted object's
shape wins its vote (an object whose colour is absent cannot be verified and fails), and
*both* when it passes the two. ``parse_world_prompt`` reads the colour–shape bindings from a
caption of the world.

``validate_checker`` measures the check on exact renders of held-out clips; the report runs it
at the model's size every time. On the first 64 held-out clips at 84² (the default 80 bank
scenes): own captions pass colour 100%, shape 96.9% (the misses: white cylinders, whose shaded
side reads as ground, and cylinders with something stacked on them); the next clip's caption
passes colour 0%; with every shape swapped, shape passes 0%. At 42² (32 bank scenes) own
captions pass both 90.6%.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import Vist3AInputError
from ..training.world import COLOURS, SHAPES, WorldConfig, WorldDataset, sample_scene, scene_seed
from ..training.world.captions import SHAPE_WORDS
from ..training.world.render import _GROUND_DARK, _GROUND_LIGHT  # the world's checker greys

COLOUR_NAMES = tuple(COLOURS)
BANK_SEED = 1  # the bank's train-split stream (any stream works: it is never evaluated on)


@dataclass(frozen=True)
class PromptedObject:
    colour: str
    shape: str


@dataclass(frozen=True)
class CheckerSettings:
    """Thresholds of the check; the defaults were set on exact renders (see the module docstring)."""

    margin: float = 0.03  # an object colour must fit a pixel this much better than the ground (RGB distance)
    max_residual: float = 0.12  # ... and within this distance
    min_share: float = 0.001  # a present colour covers this share of all pixels of the clip
    min_object_share: float = 0.015  # ... and this share of its object pixels
    extra_object_share: float = 0.15  # an unprompted colour covering this share of object pixels fails
    min_area: float = 0.0017  # a silhouette covers at least this share of its frame (12 px at 84²)
    grid: int = 12  # silhouette descriptor resolution
    brightness_weight: float = 0.5  # weight of the brightness map against the occupancy map
    neighbours: int = 5
    bank_scenes: int = 80


# ---------------------------------------------------------------------------- prompts


_SHAPE_OF_WORD = {word: shape for shape, words in SHAPE_WORDS.items() for word in words}
_BINDING = re.compile(r"\b(" + "|".join(COLOUR_NAMES) + r")\s+(" + "|".join(_SHAPE_OF_WORD) + r")\b")


def parse_world_prompt(prompt: str) -> tuple[PromptedObject, ...]:
    """The (colour, shape) objects a caption of the world names, in order of first mention.

    Captions name every object as "<colour> <shape word>" (sizes come before the colour) and
    colours are distinct within a scene, so a colour identifies its object.
    """
    objects: dict[str, PromptedObject] = {}
    for colour, word in _BINDING.findall(prompt.lower()):
        objects.setdefault(colour, PromptedObject(colour, _SHAPE_OF_WORD[word]))
    if not objects:
        raise Vist3AInputError(f"the prompt names no coloured object of the world: {prompt!r}")
    return tuple(objects.values())


# ---------------------------------------------------------------------------- colour


class ColourModel:
    """Per-pixel colour labels under the world's shading (see the module docstring, step 1)."""

    def __init__(self, world: WorldConfig, settings: CheckerSettings) -> None:
        # objects: s from the ambient term (faces away from the light, shadows) to 1, with slack;
        # the ground, as multiples of its light grey: from a shadowed dark tile to a lit light one
        light = torch.tensor(world.light_direction, dtype=torch.float32)
        lit = world.ambient + (1 - world.ambient) * float(light[2] / light.norm())  # the ground's shading
        light_grey, dark_grey = torch.tensor(_GROUND_LIGHT), torch.tensor(_GROUND_DARK)
        shadowed_dark = world.ambient * float(dark_grey.norm() / light_grey.norm())
        self.references = torch.cat([torch.tensor([COLOURS[c] for c in COLOUR_NAMES]), light_grey[None]])  # [11, 3]
        low = torch.full((len(self.references),), 0.7 * world.ambient)
        high = torch.full((len(self.references),), 1.1)
        low[-1], high[-1] = 0.8 * shadowed_dark, 1.05 * lit
        self.low, self.high = low, high
        self.settings = settings

    def labels(self, images: Tensor,  # [N, 3, H, W] in [0, 1]
               valid: Tensor | None = None,  # [N, H, W] bool: pixels to classify (others -1)
               ) -> Tensor:  # [N, H, W] int64: index into COLOUR_NAMES, -1 ground / unexplained / invalid
        labels = torch.stack([self._frame_labels(image) for image in images])  # a frame at a time: bounded memory
        return labels if valid is None else torch.where(valid, labels, -1)

    def _frame_labels(self, image: Tensor) -> Tensor:  # [3, H, W] -> [H, W]
        pixels, refs = image.permute(1, 2, 0).reshape(-1, 3).float(), self.references
        shading = ((pixels @ refs.T) / (refs * refs).sum(1)).clamp(min=self.low, max=self.high)  # [P, 11]
        residual = (pixels[:, None, :] - shading[..., None] * refs).norm(dim=-1)
        best, colour = residual[:, :-1].min(1)
        is_object = (best < residual[:, -1] - self.settings.margin) & (best < self.settings.max_residual)
        return torch.where(is_object, colour, -1).reshape(image.shape[1:])


def colour_shares(labels: Tensor) -> tuple[Tensor, Tensor]:  # [N, H, W] -> (share of pixels, of object pixels) [10]
    counts = torch.bincount(labels[labels >= 0], minlength=len(COLOUR_NAMES)).float()
    return counts / labels.numel(), counts / counts.sum().clamp_min(1)


# ---------------------------------------------------------------------------- silhouettes


def largest_components(mask: Tensor) -> Tensor:  # [N, H, W] bool -> [N, H, W] bool
    """Each frame's largest 8-connected region (labels spread by 3×3 max pooling until stable,
    inside the bounding box of the whole mask)."""
    out = torch.zeros_like(mask)
    if not mask.any():
        return out
    rows, cols = mask.any(2).any(0).nonzero()[:, 0], mask.any(1).any(0).nonzero()[:, 0]
    box = (slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    inside = mask[box]
    ids = torch.arange(1, inside[0].numel() + 1, dtype=torch.float32).reshape(inside.shape[1:]) * inside
    while True:
        spread = F.max_pool2d(ids[:, None], 3, 1, 1)[:, 0] * inside
        if torch.equal(spread, ids):
            break
        ids = spread
    largest = torch.zeros_like(inside)
    for i in range(len(inside)):
        if inside[i].any():
            values, counts = ids[i][inside[i]].unique(return_counts=True)
            largest[i] = ids[i] == values[counts.argmax()]
    out[box] = largest
    return out


def _to_grid(crop: Tensor, grid: int) -> Tensor:  # [s, s] -> [grid * grid]
    mode = "area" if crop.shape[0] >= grid else "bilinear"
    return F.interpolate(crop[None, None], size=(grid, grid), mode=mode).flatten()


def silhouette_descriptor(mask: Tensor,  # [H, W] bool, non-empty
                          image: Tensor,  # [3, H, W] in [0, 1]
                          settings: CheckerSettings) -> Tensor:  # [2 grid² + 1]
    ys, xs = mask.nonzero(as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = y1 - y0, x1 - x0
    side = max(h, w)
    oy, ox = (side - h) // 2, (side - w) // 2
    region = mask[y0:y1, x0:x1].float()
    brightness = image.mean(0)[y0:y1, x0:x1] * region
    occupancy, shading = torch.zeros(side, side), torch.zeros(side, side)
    occupancy[oy:oy + h, ox:ox + w] = region
    shading[oy:oy + h, ox:ox + w] = brightness / brightness.max().clamp_min(1e-3)
    return torch.cat([_to_grid(occupancy, settings.grid), settings.brightness_weight * _to_grid(shading, settings.grid),
                      torch.tensor([math.log(h / w)])])


def _touches_border(mask: Tensor) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def object_descriptors(labels: Tensor,  # [N, H, W] colour labels
                       images: Tensor,  # [N, 3, H, W]
                       colour: str, settings: CheckerSettings) -> Tensor:  # [F, D] (F = 0: not seen)
    """Silhouette descriptors of the largest region of ``colour`` in every frame where it is big
    enough; frames where it touches the border only when no frame has a whole one."""
    regions = largest_components(labels == COLOUR_NAMES.index(colour))
    min_area = max(4, round(settings.min_area * labels.shape[-1] * labels.shape[-2]))
    usable = [f for f in range(len(regions)) if regions[f].sum() >= min_area]
    whole = [f for f in usable if not _touches_border(regions[f])]
    frames = whole or usable
    if not frames:
        return torch.zeros(0, 2 * settings.grid ** 2 + 1)
    return torch.stack([silhouette_descriptor(regions[f], images[f], settings) for f in frames])


@dataclass
class SilhouetteBank:
    descriptors: Tensor  # [M, D]
    shapes: Tensor  # [M] int64 index into SHAPES

    def votes(self, queries: Tensor, neighbours: int) -> Tensor:  # [F, D] -> [len(SHAPES)] summed votes
        if len(queries) == 0:
            return torch.zeros(len(SHAPES))
        k = min(neighbours, len(self.descriptors))
        nearest = torch.cdist(queries, self.descriptors).topk(k, largest=False).indices
        return F.one_hot(self.shapes[nearest], len(SHAPES)).sum((0, 1)).float()


# ---------------------------------------------------------------------------- the checker


@dataclass
class CheckResult:
    colour: bool
    shape: bool
    objects: list[dict]  # per prompted object: colour, shape, present, share, predicted shape, votes
    extra_colours: list[str]  # unprompted colours above extra_object_share

    @property
    def both(self) -> bool:
        return self.colour and self.shape

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "both": self.both, "objects": self.objects,
                "extra_colours": self.extra_colours}


class ClipColours:
    """One clip's colour labels and shares, and its silhouettes per colour (computed once, on
    demand), so that several prompts can be judged against the same images."""

    def __init__(self, images: Tensor, labels: Tensor, settings: CheckerSettings) -> None:
        self.images, self.labels, self.settings = images, labels, settings
        self.share, self.object_share = colour_shares(labels)
        self.present = (self.share >= settings.min_share) & (self.object_share >= settings.min_object_share)
        self._descriptors: dict[str, Tensor] = {}

    def descriptors(self, colour: str) -> Tensor:  # [F, D]
        if colour not in self._descriptors:
            self._descriptors[colour] = object_descriptors(self.labels, self.images, colour, self.settings)
        return self._descriptors[colour]


class AttributeChecker:
    """``check(images, objects)``: does a clip show the prompted colours and shapes?

    Works at one image size (the silhouette bank's); build with ``AttributeChecker.build``.
    """

    def __init__(self, bank: SilhouetteBank, size: tuple[int, int], world: WorldConfig,
                 settings: CheckerSettings) -> None:
        self.bank, self.size, self.world, self.settings = bank, size, world, settings
        self.colours = ColourModel(world, settings)

    @classmethod
    def build(cls, size: int | tuple[int, int], *, world: WorldConfig | None = None,
              settings: CheckerSettings | None = None) -> AttributeChecker:
        """A checker whose bank holds ``settings.bank_scenes`` train-split scenes rendered at ``size``."""
        height, width = (size, size) if isinstance(size, int) else size
        world, settings = world or WorldConfig(), settings or CheckerSettings()
        colours = ColourModel(world, settings)
        dataset = WorldDataset("train", seed=BANK_SEED, height=height, width=width, config=world)
        descriptors, shapes = [], []
        for index in range(settings.bank_scenes):
            sample = dataset.sample(index)
            images = (sample["video"].transpose(0, 1) + 1) / 2
            labels = colours.labels(images)
            for obj in sample["scene"]["objects"]:
                found = object_descriptors(labels, images, obj["colour"], settings)
                descriptors.append(found)
                shapes += [SHAPES.index(obj["shape"])] * len(found)
        bank = SilhouetteBank(torch.cat(descriptors), torch.tensor(shapes, dtype=torch.int64))
        if len(bank.descriptors) == 0:
            raise Vist3AInputError(f"no silhouettes found at {height}x{width}: the images are too small")
        return cls(bank, (height, width), world, settings)

    def analyse(self, images: Tensor,  # [N, 3, H, W] in [0, 1], the checker's size
                valid: Tensor | None = None,  # [N, H, W] bool: pixels that show the scene
                ) -> ClipColours:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.size:
            raise Vist3AInputError(f"images must be [N, 3, {self.size[0]}, {self.size[1]}] (the checker's size), "
                                   f"got {list(images.shape)}")
        if valid is not None and valid.shape != (images.shape[0], *images.shape[2:]):
            raise Vist3AInputError(f"valid must be [N, H, W] = {[images.shape[0], *images.shape[2:]]}, "
                                   f"got {list(valid.shape)}")
        images = images.float()
        return ClipColours(images, self.colours.labels(images, valid), self.settings)

    def judge(self, clip: ClipColours, objects: tuple[PromptedObject, ...] | list[PromptedObject]) -> CheckResult:
        """Colour and shape verdicts of one analysed clip against the prompted objects."""
        s = self.settings
        prompted = {o.colour for o in objects}
        extra = [c for i, c in enumerate(COLOUR_NAMES) if c not in prompted and clip.present[i]
                 and clip.object_share[i] >= s.extra_object_share]
        rows = []
        for obj in objects:
            i = COLOUR_NAMES.index(obj.colour)
            row = {"colour": obj.colour, "shape": obj.shape, "present": bool(clip.present[i]),
                   "share": round(float(clip.share[i]), 5), "object_share": round(float(clip.object_share[i]), 4),
                   "predicted_shape": None, "votes": None}
            if row["present"]:
                votes = self.bank.votes(clip.descriptors(obj.colour), s.neighbours)
                if votes.sum() > 0:
                    row["predicted_shape"] = SHAPES[int(votes.argmax())]
                    row["votes"] = dict(zip(SHAPES, (int(v) for v in votes)))
            rows.append(row)
        colour_ok = all(r["present"] for r in rows) and not extra
        shape_ok = all(r["predicted_shape"] == r["shape"] for r in rows)
        return CheckResult(colour_ok, shape_ok, rows, extra)

    def check(self, images: Tensor, objects, valid: Tensor | None = None) -> CheckResult:
        """``judge(analyse(images, valid), objects)``."""
        return self.judge(self.analyse(images, valid), objects)


def pass_rates(results: list[CheckResult]) -> dict:
    """Shares of ``results`` that pass colour, shape and both (None when there are none)."""
    n = len(results)
    rates = {key: sum(getattr(r, key) for r in results) / n if n else None for key in ("colour", "shape", "both")}
    return {**rates, "num_prompts": n}


# ---------------------------------------------------------------------------- validation


def validate_checker(checker: AttributeChecker, indices: list[int], *, seed: int = 0) -> dict:
    """The checker on exact held-out renders: with their own captions (should pass) and with
    wrong prompts — the next clip's caption, and each object's shape replaced by another
    (should fail). Pass rates per case and the checker's settings."""
    height, width = checker.size
    dataset = WorldDataset("heldout", seed=seed, height=height, width=width, config=checker.world)
    captions = [sample_scene(scene_seed(seed, i), "heldout", checker.world).caption for i in indices]
    cases = {"ground_truth": [], "wrong_prompt": [], "wrong_shapes": []}
    for k, index in enumerate(indices):
        clip = checker.analyse((dataset.sample(index)["video"].transpose(0, 1) + 1) / 2)
        objects = parse_world_prompt(captions[k])
        cases["ground_truth"].append(checker.judge(clip, objects))
        if len(indices) > 1:
            cases["wrong_prompt"].append(checker.judge(clip, parse_world_prompt(captions[(k + 1) % len(indices)])))
        swapped = [PromptedObject(o.colour, SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)]) for o in objects]
        cases["wrong_shapes"].append(checker.judge(clip, swapped))
    return {**{name: pass_rates(results) for name, results in cases.items()},
            "size": list(checker.size), "bank_descriptors": len(checker.bank.descriptors),
            "settings": asdict(checker.settings)}


__all__ = ["COLOUR_NAMES", "AttributeChecker", "CheckResult", "CheckerSettings", "ClipColours", "ColourModel",
           "PromptedObject", "SilhouetteBank", "largest_components", "parse_world_prompt", "pass_rates",
           "silhouette_descriptor", "validate_checker"]
