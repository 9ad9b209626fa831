"""The world's procedural generator: 32x32 images of one subject in a scene, with a caption.

A subject's identity is (family, pattern): the family is a body shape the caption names as its class
("toy", "robot", "car"); the pattern is a private 3x3 grid of five saturated colours drawn on the body
(5**9 = 1,953,125 patterns per family, 5,859,375 identities), which no caption can name. The caption
names class, size, scene, time of day, position and a second object:
"a big toy on snow, at night, on the left, with a tree". Scene colours are all low-saturation, the
pattern colours all high-saturation, so a pattern can be read back exactly from any image
(``read_pattern``). Every image comes with the subject's foreground mask and a layout channel
(silhouette: subject 1, second object 0.5).

Training and held-out subjects are disjoint by construction: an identity is held out when the first
byte of the SHA-256 of its name is odd (``is_heldout``); a caption combination likewise (a quarter of
the combinations, by another hash), so "held-out captions" are never trained on either.
Deterministic: every draw comes from a numpy Generator seeded by the caller.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np

SIZE = 32
FAMILIES = ("toy", "robot", "car")
PALETTE = np.array([(225, 35, 35), (35, 190, 50), (45, 70, 230), (235, 205, 30), (200, 50, 210)], np.float32)
GRID = 3
N_PATTERNS = len(PALETTE) ** (GRID * GRID)

# scene -> (sky, ground) colours, all low saturation
SCENES = {
    "snow": ((190, 200, 215), (236, 236, 240)),
    "sand": ((185, 200, 215), (205, 185, 148)),
    "grass": ((165, 185, 205), (105, 125, 92)),
    "water": ((175, 190, 205), (82, 100, 125)),
    "a road": ((180, 184, 190), (96, 96, 98)),
    "a floor": ((192, 182, 168), (132, 112, 92)),
}
SCENE_NAMES = tuple(SCENES)
TIMES = ("by day", "at night")
POSITIONS = ("on the left", "in the middle", "on the right")
SIZES = ("small", "big")
OBJECTS = ("", "a tree", "a rock", "a lamp")

# Part marks (opt-in, world/README.md "Fourth part"): every cell of the body carries a darker square at the
# place inside the cell that is the cell's own place in the grid (the top-left cell is dark in its top-left
# corner, the centre cell in its centre, ...). The marks are the same for every subject of every family, so
# they say nothing about identity (the colours do); they are the world's class-generic parts (a real
# subject's eyes, ears and wheels), which let a token of a reference tell which part of the body it shows.
# Hue and saturation are unchanged (the darkening is a factor on all channels), so ``read_pattern`` reads
# marked bodies as it reads plain ones. Set by the commands' --marks; False is the shipped world.
MARKS = False
MARK_DARKENING = 0.75


@dataclasses.dataclass(frozen=True)
class Subject:
    family: int  # index into FAMILIES
    pattern: int  # 0 .. N_PATTERNS - 1

    @property
    def name(self) -> str:
        return f"{FAMILIES[self.family]}:{self.pattern:07d}"

    @property
    def cells(self) -> np.ndarray:
        """The 3x3 grid of palette indices (row-major)."""
        digits, p = [], self.pattern
        for _ in range(GRID * GRID):
            digits.append(p % len(PALETTE))
            p //= len(PALETTE)
        return np.array(digits, np.int64).reshape(GRID, GRID)

    @property
    def word(self) -> str:
        return FAMILIES[self.family]


@dataclasses.dataclass(frozen=True)
class Caption:
    family: int
    size: int
    scene: int
    time: int
    position: int
    obj: int

    @property
    def text(self) -> str:
        text = (f"a {SIZES[self.size]} {FAMILIES[self.family]} on {SCENE_NAMES[self.scene]}, "
                f"{TIMES[self.time]}, {POSITIONS[self.position]}")
        return text + (f", with {OBJECTS[self.obj]}" if self.obj else "")

    @property
    def key(self) -> tuple:
        return dataclasses.astuple(self)


def _hash_byte(text: str) -> int:
    return hashlib.sha256(text.encode()).digest()[0]


def is_heldout(subject: Subject) -> bool:
    return _hash_byte(subject.name) % 2 == 1


def caption_is_heldout(caption: Caption) -> bool:
    return _hash_byte("caption:" + caption.text) % 4 == 0


ALL_CAPTIONS = tuple(Caption(*k) for k in itertools.product(
    range(len(FAMILIES)), range(len(SIZES)), range(len(SCENES)), range(len(TIMES)), range(len(POSITIONS)),
    range(len(OBJECTS))))
TRAIN_CAPTIONS = tuple(c for c in ALL_CAPTIONS if not caption_is_heldout(c))
HELDOUT_CAPTIONS = tuple(c for c in ALL_CAPTIONS if caption_is_heldout(c))


def draw_subject(rng: np.random.Generator, heldout: bool, family: int | None = None) -> Subject:
    while True:
        s = Subject(int(rng.integers(len(FAMILIES))) if family is None else family, int(rng.integers(N_PATTERNS)))
        if is_heldout(s) == heldout:
            return s


def draw_caption(rng: np.random.Generator, family: int, heldout: bool = False) -> Caption:
    pool = [c for c in (HELDOUT_CAPTIONS if heldout else TRAIN_CAPTIONS) if c.family == family]
    return pool[int(rng.integers(len(pool)))]


def heldout_subjects(n: int, seed: int = 1234) -> list[Subject]:
    """n held-out subjects, families in turn (deterministic)."""
    rng = np.random.default_rng(seed)
    return [draw_subject(rng, True, family=i % len(FAMILIES)) for i in range(n)]


def _body_box(family: int, size: int):
    """(width, height, feet) of the patterned body in pixels; feet = height of legs / wheels below it."""
    s = (12, 18)[size]
    if family == 0:
        return s, s, 0
    if family == 1:  # robot: tall, two legs
        return (9, 12)[size], s, (3, 4)[size]
    return s, (9, 12)[size], (3, 4)[size]  # car: wide, two wheels


def _part_marks(w: int, h: int) -> np.ndarray:
    """[h, w] brightness factors of the part marks on a body of w x h pixels (see MARKS)."""
    factor = np.ones((h, w), np.float32)
    for i in range(GRID):
        for j in range(GRID):
            ya, yb = i * h // GRID, (i + 1) * h // GRID
            xa, xb = j * w // GRID, (j + 1) * w // GRID
            mh, mw = max(1, (yb - ya) // 2), max(1, (xb - xa) // 2)
            my, mx = ya + round(i * (yb - ya - mh) / 2), xa + round(j * (xb - xa - mw) / 2)
            factor[my:my + mh, mx:mx + mw] = MARK_DARKENING
    return factor


def render(subject: Subject, caption: Caption, rng: np.random.Generator):
    """(image uint8 [32,32,3], subject mask float32 [32,32], layout float32 [32,32], body box (x0,y0,w,h))."""
    assert caption.family == subject.family
    sky, ground = (np.array(c, np.float32) for c in SCENES[SCENE_NAMES[caption.scene]])
    horizon = 13 + int(rng.integers(-1, 2))
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:horizon] = sky
    img[horizon:] = ground
    if SCENE_NAMES[caption.scene] == "water":
        img[horizon + 2::4] += 18
    elif SCENE_NAMES[caption.scene] == "a road":
        img[24:26, (np.arange(SIZE) // 4) % 2 == 0] = (215, 215, 215)
    elif SCENE_NAMES[caption.scene] == "a floor":
        img[horizon:, ::6] -= 20
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    layout = np.zeros((SIZE, SIZE), np.float32)

    w, h, feet = _body_box(subject.family, caption.size)
    cx = (9, 16, 23)[caption.position] + int(rng.integers(-1, 2))
    bottom = 29 + int(rng.integers(-1, 1))
    x0 = int(np.clip(cx - w // 2, 0, SIZE - w))
    y0 = bottom - feet - h

    # second object on the other side
    if caption.obj:
        ox = 26 if caption.position == 0 else 5
        if caption.position == 1:
            ox = 4 if rng.random() < 0.5 else 27
        name = OBJECTS[caption.obj]
        if name == "a tree":
            parts = [((ox - 1, 18, 3, 11), (110, 85, 60)), ((ox - 4, 9, 9, 10), (80, 105, 80))]
        elif name == "a rock":
            parts = [((ox - 4, 23, 9, 6), (128, 126, 122))]
        else:
            parts = [((ox, 10, 1, 19), (70, 70, 74)), ((ox - 2, 8, 5, 3), (230, 228, 205))]
        for (x, y, pw, ph), colour in parts:
            xs, ys = slice(max(x, 0), max(min(x + pw, SIZE), 0)), slice(y, y + ph)
            img[ys, xs] = colour
            layout[ys, xs] = 0.5

    if caption.time == 1:  # night: the scene darkens and turns blue; the subject stays lit
        img = img * 0.42 + np.array((6, 8, 24), np.float32)

    mask = np.zeros((SIZE, SIZE), np.float32)
    cells = subject.cells
    light = 0.85 if caption.time == 1 else 1.0
    ys = np.arange(h) * GRID // h
    xs = np.arange(w) * GRID // w
    img[y0:y0 + h, x0:x0 + w] = PALETTE[cells[ys[:, None], xs[None, :]]] * light
    if MARKS:
        img[y0:y0 + h, x0:x0 + w] *= _part_marks(w, h)[..., None]
    mask[y0:y0 + h, x0:x0 + w] = 1
    if feet:
        dark = np.array((40, 40, 44), np.float32)
        lw = max(2, w // 4)
        for fx in (x0 + 1, x0 + w - 1 - lw):
            img[y0 + h:y0 + h + feet, fx:fx + lw] = dark
            mask[y0 + h:y0 + h + feet, fx:fx + lw] = 1
    layout[mask > 0] = 1.0
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img, mask, layout, (x0, y0, w, h)


PLURALS = ("toys", "robots", "cars")


def pair_caption_text(family: int, scene: int, time: int) -> str:
    """The caption of a repetition image (UNet TRAINING captions only): "two toys on snow, by day"."""
    return f"two {PLURALS[family]} on {SCENE_NAMES[scene]}, {TIMES[time]}"


PAIR_CAPTIONS = tuple((f, sc, t) for f in range(len(FAMILIES)) for sc in range(len(SCENES)) for t in range(len(TIMES)))


def render_pair(subject: Subject, scene: int, time: int, rng: np.random.Generator):
    """A repetition image: the same subject twice, side by side (sizes drawn per copy: small/small,
    small/big or big/small, so the copies fit), no second object. Natural images teach a diffusion model
    within-image correspondence through repeated things; a world of single subjects has none, so these
    renders (training captions only) give the UNet's self-attention a reason to carry appearance from one
    place to another. (image uint8 [32,32,3], subject mask float32 [32,32])."""
    sizes = [(0, 0), (0, 1), (1, 0)][int(rng.integers(3))]
    first, mask1, _, box1 = render(subject, Caption(subject.family, sizes[0], scene, time, 0, 0), rng)
    second, mask2, _, _ = render(subject, Caption(subject.family, sizes[1], scene, time, 2, 0), rng)
    # the left copy over the right render, cut at the middle between them (their boxes never overlap)
    w = _body_box(subject.family, sizes[0])[0]
    cut = min(SIZE, box1[0] + w + 1)
    image, mask = second.copy(), mask2.copy()
    image[:, :cut], mask[:, :cut] = first[:, :cut], mask1[:, :cut]
    return image, mask


def saturated(image: np.ndarray) -> np.ndarray:
    """Boolean map of the pattern's colours (high saturation, not dark) in a float [0,1] or uint8 image."""
    x = image.astype(np.float32)
    if x.max() > 1.5:
        x = x / 255.0
    mx, mn = x.max(-1), x.min(-1)
    return ((mx - mn) / np.maximum(mx, 1e-6) > 0.55) & (mx > 0.45)


def read_pattern(image: np.ndarray):
    """Read the 3x3 pattern of the subject in an image: palette indices [3,3], or None if no subject is seen.

    The body is the bounding box of the largest band of saturated pixels (rows/columns with at least 2
    saturated pixels); each cell's colour is the palette colour nearest to the mean of its saturated
    pixels (a cell without any reads -1).
    """
    x = image.astype(np.float32)
    if x.max() <= 1.5:
        x = x * 255.0
    sat = saturated(x)
    rows, cols = np.nonzero(sat.sum(1) >= 2)[0], np.nonzero(sat.sum(0) >= 2)[0]
    if len(rows) < 3 or len(cols) < 3:
        return None
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    out = np.full((GRID, GRID), -1, np.int64)
    for i in range(GRID):
        for j in range(GRID):
            ya, yb = y0 + (y1 - y0) * i // GRID, y0 + (y1 - y0) * (i + 1) // GRID
            xa, xb = x0 + (x1 - x0) * j // GRID, x0 + (x1 - x0) * (j + 1) // GRID
            cell, cs = x[ya:yb, xa:xb], sat[ya:yb, xa:xb]
            if cs.sum() == 0:
                continue
            mean = cell[cs].mean(0)
            # compare hue (colour normalised by brightness), so night's dimming does not matter
            d = ((PALETTE / PALETTE.max(1, keepdims=True) - mean / max(mean.max(), 1e-6)) ** 2).sum(1)
            out[i, j] = int(d.argmin())
    return out


def pattern_accuracy(image: np.ndarray, subject: Subject) -> float:
    """Fraction of the 9 cells whose colour read from the image is the subject's (chance: 0.2)."""
    read = read_pattern(image)
    if read is None:
        return 0.0
    return float((read == subject.cells).mean())


def dataset(n: int, seed: int, heldout: bool = False, heldout_captions: bool = False):
    """n renders of random subjects of one split in random captions: dict of numpy arrays + lists."""
    rng = np.random.default_rng(seed)
    images, masks, layouts, subjects, captions = [], [], [], [], []
    for _ in range(n):
        s = draw_subject(rng, heldout)
        c = draw_caption(rng, s.family, heldout_captions)
        img, m, lay, _ = render(s, c, rng)
        images.append(img), masks.append(m), layouts.append(lay), subjects.append(s), captions.append(c)
    return {"images": np.stack(images), "masks": np.stack(masks), "layouts": np.stack(layouts),
            "subjects": subjects, "captions": captions}


def pair_dataset(n: int, seed: int):
    """n repetition renders (``render_pair``) of random training subjects: images, masks, caption texts."""
    rng = np.random.default_rng(seed)
    images, masks, texts = [], [], []
    for _ in range(n):
        s = draw_subject(rng, False)
        scene, time = int(rng.integers(len(SCENES))), int(rng.integers(len(TIMES)))
        img, m = render_pair(s, scene, time, rng)
        images.append(img), masks.append(m), texts.append(pair_caption_text(s.family, scene, time))
    return {"images": np.stack(images), "masks": np.stack(masks), "texts": texts}
