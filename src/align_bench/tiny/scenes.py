"""Procedural captioned scenes: the data of the tiny world.

Every image is 32×32 RGB: a flat background colour and one to three flat shapes of one colour, rendered with
4× supersampled (anti-aliased) edges. Everything is deterministic from a seed.

Caption grammar (lower case, single spaces, no punctuation; ``{colour}`` ∈ COLOURS, ``{shape}`` ∈ SHAPES;
the shape colour always differs from the background colour)::

    caption := single | sized | counted
    single  := "a {colour} {shape} on a {colour} background"              (any size, one shape)
    sized   := "a {size} {colour} {shape} on a {colour} background"       size ∈ {small, large}
    counted := "{count} {colour} {shape}s on a {colour} background"       count ∈ {two, three}

e.g. ``a red circle on a blue background``, ``a large yellow square on a black background``,
``three white triangles on a green background``. The article stays "a" before every colour (``a orange …``)
so that the family ``a {colour} {shape} on a {colour} background`` is verbatim.

Scene parameters (``Scene``): background colour, shape, shape colour, count, size word, and per shape its
centre (x, y) in pixels and radius r in pixels. Radii: unqualified 3–10, small 3–4.5, large 8–10, counted
3–5 (non-overlapping). A circle has radius r, a square half-side 0.9·r, an upward triangle circumradius 1.45·r
(so the three shapes of one r have about the same area).

The analytic aesthetic score (``aesthetic_score``) is a function of the pixels, so it applies to rendered
ground truth and to generated samples alike (used as an oracle metric beside the learned ``tiny_aesthetic``)::

    fg, bg      = foreground / background masks (pixels far from the border's dominant colour)
    contrast    = |luma(mean fg colour) − luma(mean bg colour)|                     ∈ [0, 1]
    size        = clip(1 − |a − 0.3| / 0.3, 0, 1), a = fg area fraction              (peaks at 30 % cover)
    centring    = clip(1 − ‖fg centroid − image centre‖ / 16 px, 0, 1)
    aesthetic   = 10 · (0.4·contrast + 0.3·size + 0.3·centring)                       ∈ [0, 10]

So a large, centred shape of high luma contrast scores high; a small shape in a corner on a similar-luma
background scores low. The learned head sees only the tiny-CLIP embedding, so it can be hacked.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# name → sRGB in [0, 255]; chosen far apart so the nearest-palette pixel check is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: dict[str, int] = {"two": 2, "three": 3}
COUNT_WORDS = {v: k for k, v in COUNTS.items()}

RADIUS = {"any": (3.0, 10.0), "small": (3.0, 4.5), "large": (8.0, 10.0), "counted": (3.0, 5.0)}
SQUARE_HALF = 0.9  # square half-side / r
TRIANGLE_R = 1.45  # triangle circumradius / r

# (shape colour, background colour) pairs that no text-conditioned model trains on (held-out composition test; the
# caption-free VAE sees every pair):
# colour i on colour i+3 (mod 8), so every colour is held out once as shape and once as background.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (COLOURS[i], COLOURS[(i + 3) % len(COLOURS)]) for i in range(len(COLOURS))
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((a, b) for a in COLOURS for b in COLOURS if a != b)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)


@dataclass
class Scene:
    """Ground truth of one image. ``centres``/``radii`` are in pixels, one entry per shape."""

    shape: str
    colour: str
    background: str
    count: int = 1
    size: str | None = None  # None | "small" | "large"
    centres: list[tuple[float, float]] = field(default_factory=list)
    radii: list[float] = field(default_factory=list)

    def caption(self) -> str:
        return caption_of(self.shape, self.colour, self.background, self.count, self.size)

    def to_dict(self) -> dict:
        return asdict(self)


def caption_of(shape: str, colour: str, background: str, count: int = 1, size: str | None = None) -> str:
    """The grammar's caption for these parameters (see module docstring)."""
    if count > 1:
        return f"{COUNT_WORDS[count]} {colour} {shape}s on a {background} background"
    if size is not None:
        return f"a {size} {colour} {shape} on a {background} background"
    return f"a {colour} {shape} on a {background} background"


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_CAPTION_RE = re.compile(
    rf"^(?:a (?:(?P<size>small|large) )?(?P<c1>{_C}) (?P<s1>{_S})"
    rf"|(?P<count>two|three) (?P<c2>{_C}) (?P<s2>{_S})s) on a (?P<bg>{_C}) background$"
)


def parse_caption(caption: str) -> dict | None:
    """Inverse of ``caption_of``: {"shape","colour","background","count","size"} or None if off-grammar."""
    m = _CAPTION_RE.match(" ".join(caption.lower().split()))
    if m is None:
        return None
    if m["count"]:
        return {"shape": m["s2"], "colour": m["c2"], "background": m["bg"], "count": COUNTS[m["count"]],
                "size": None}
    return {"shape": m["s1"], "colour": m["c1"], "background": m["bg"], "count": 1, "size": m["size"]}


# ---------------------------------------------------------------------------------------------------------------
# Sampling scene parameters
# ---------------------------------------------------------------------------------------------------------------

def _extent(shape: str, r: float) -> tuple[float, float, float, float]:
    """Bounding box of a shape centred at 0 as (left, right, top, bottom) offsets (y grows downwards)."""
    if shape == "circle":
        return r, r, r, r
    if shape == "square":
        h = SQUARE_HALF * r
        return h, h, h, h
    R = TRIANGLE_R * r  # upward equilateral triangle, centroid at 0: apex at −R, base at +R/2
    return R * np.sqrt(3) / 2, R * np.sqrt(3) / 2, R, R / 2


def _place(rng: np.random.Generator, shape: str, r: float, margin: float = 0.5) -> tuple[float, float]:
    left, right, top, bottom = _extent(shape, r)
    x = rng.uniform(left + margin, IMAGE_SIZE - right - margin)
    y = rng.uniform(top + margin, IMAGE_SIZE - bottom - margin)
    return float(x), float(y)


def sample_scene(rng: np.random.Generator, pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS,
                 family_probs: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> Scene:
    """Draw one scene: family (single / sized / counted), colour pair from ``pairs``, shape, geometry."""
    colour, background = pairs[rng.integers(len(pairs))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    family = rng.choice(3, p=np.asarray(family_probs) / np.sum(family_probs))
    if family == 2:
        count = int(rng.integers(2, 4))
        return _place_many(rng, Scene(shape, colour, background, count=count))
    size = None if family == 0 else SIZES[rng.integers(len(SIZES))]
    r = float(rng.uniform(*RADIUS["any" if size is None else size]))
    return Scene(shape, colour, background, 1, size, [_place(rng, shape, r)], [r])


def _place_many(rng: np.random.Generator, scene: Scene, tries: int = 200) -> Scene:
    """Non-overlapping placement by rejection (centres at least (r_i + r_j)·1.6 apart)."""
    for _ in range(tries):
        radii = [float(rng.uniform(*RADIUS["counted"])) for _ in range(scene.count)]
        centres = [_place(rng, scene.shape, r) for r in radii]
        ok = all(np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]) > 1.6 * (radii[i] + radii[j])
                 for i in range(scene.count) for j in range(i))
        if ok:
            scene.centres, scene.radii = centres, radii
            return scene
    raise RuntimeError("could not place shapes")  # pragma: no cover - never at these sizes


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A random scene that matches a grammar caption (ground truth for reward tests and CLIP zero-shot)."""
    p = parse_caption(caption)
    if p is None:
        raise ValueError(f"caption off the tiny grammar: {caption!r}")
    scene = Scene(p["shape"], p["colour"], p["background"], p["count"], p["size"])
    if scene.count > 1:
        return _place_many(rng, scene)
    r = float(rng.uniform(*RADIUS["any" if scene.size is None else scene.size]))
    scene.centres, scene.radii = [_place(rng, scene.shape, r)], [r]
    return scene


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------

_N = IMAGE_SIZE * SUPERSAMPLE
_GRID = (np.arange(_N) + 0.5) / SUPERSAMPLE  # sub-pixel centres in pixel units
_GX, _GY = np.meshgrid(_GRID, _GRID)  # (N, N) each, x to the right, y downwards


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(N, N) bool coverage of one shape on the supersampled grid."""
    dx, dy = _GX - cx, _GY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = SQUARE_HALF * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    R = TRIANGLE_R * r
    # inside the base (y ≤ R/2) and on the inner side of both slanted edges through the apex (0, −R)
    s = np.sqrt(3.0)
    return (dy <= R / 2) & (s * dx - dy <= R) & (-s * dx - dy <= R)


def coverage(scene: Scene) -> np.ndarray:
    """(32, 32) float32 in [0, 1]: fraction of each pixel covered by the scene's shapes."""
    m = np.zeros((_N, _N), dtype=bool)
    for (cx, cy), r in zip(scene.centres, scene.radii):
        m |= _mask(scene.shape, cx, cy, r)
    return m.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene) -> np.ndarray:
    """(32, 32, 3) uint8 image of a scene (anti-aliased edges)."""
    a = coverage(scene)[..., None]
    fg = np.asarray(PALETTE[scene.colour], np.float32)
    bg = np.asarray(PALETTE[scene.background], np.float32)
    return np.round(a * fg + (1 - a) * bg).astype(np.uint8)


def render_seed(seed: int, **kwargs) -> tuple[np.ndarray, Scene]:
    """Deterministic (image (32,32,3) uint8, scene) from an integer seed."""
    scene = sample_scene(np.random.default_rng(seed), **kwargs)
    return render(scene), scene


def render_batch(rng: np.random.Generator, n: int, **kwargs) -> tuple[torch.Tensor, list[Scene]]:
    """n scenes → (images (n, 3, 32, 32) float in [0, 1], scenes)."""
    scenes = [sample_scene(rng, **kwargs) for _ in range(n)]
    imgs = np.stack([render(s) for s in scenes])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, scenes


def render_captions(captions: list[str], rng: np.random.Generator) -> tuple[torch.Tensor, list[Scene]]:
    """Ground-truth renders for grammar captions → ((n, 3, 32, 32) in [0, 1], scenes)."""
    scenes = [scene_from_caption(c, rng) for c in captions]
    imgs = np.stack([render(s) for s in scenes])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, scenes


# ---------------------------------------------------------------------------------------------------------------
# Pixel-level measurements (oracle metrics): work on renders and on generated samples alike
# ---------------------------------------------------------------------------------------------------------------

PALETTE_T = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255.0  # (K, 3)
LUMA = torch.tensor([0.299, 0.587, 0.114])
FG_DIST = 0.3  # RGB distance (in [0,1] units) from the background colour beyond which a pixel is foreground
MIN_FG_PIXELS = 8


def nearest_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0,1] → (B, H, W) long: index into COLOURS of each pixel's nearest palette colour."""
    pal = PALETTE_T.to(images.device)
    d = ((images.unsqueeze(1) - pal[None, :, :, None, None]) ** 2).sum(2)  # (B, K, H, W)
    return d.argmin(1)


def _border(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., H, W) → (B, ..., 4·(H−1)) the outermost ring of pixels."""
    return torch.cat([x[..., 0, :-1], x[..., :-1, -1], x[..., -1, 1:], x[..., 1:, 0]], dim=-1)


def segment(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background colour index (B,) = mode of the border's nearest colours; foreground mask (B, H, W) bool =
    pixels farther than FG_DIST from the *measured* background colour (mean of the border pixels of that class)."""
    images = images.float().clamp(0, 1)
    lab = nearest_colour(images)  # (B, H, W)
    bg = _border(lab).mode(dim=-1).values  # (B,)
    ring = _border(images)  # (B, 3, P)
    is_bg = (_border(lab) == bg[:, None]).float()  # (B, P)
    bg_rgb = (ring * is_bg[:, None]).sum(-1) / is_bg.sum(-1, keepdim=True).clamp_min(1)  # (B, 3)
    fg = ((images - bg_rgb[:, :, None, None]) ** 2).sum(1).sqrt() > FG_DIST
    return bg, fg


def measure_colours(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,3,H,W) → (shape colour index (B,) long, −1 if fewer than MIN_FG_PIXELS foreground; background (B,))."""
    bg, fg = segment(images)
    lab = nearest_colour(images.float().clamp(0, 1))
    out = torch.full_like(bg, -1)
    for i in range(images.shape[0]):
        sel = lab[i][fg[i]]
        sel = sel[sel != bg[i]]
        if sel.numel() >= MIN_FG_PIXELS:
            out[i] = sel.mode().values
    return out, bg


def colour_correct(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(B,) float 1/0: measured shape colour and background colour both equal the prompt's (0 off-grammar)."""
    fgc, bgc = measure_colours(images)
    out = torch.zeros(len(prompts))
    for i, p in enumerate(prompts):
        q = parse_caption(p)
        if q is not None:
            out[i] = float(COLOURS[bgc[i]] == q["background"] and fgc[i] >= 0 and COLOURS[fgc[i]] == q["colour"])
    return out.to(images.device)


def aesthetic_score(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] → (B,) analytic aesthetic in [0, 10] (formula in the module docstring)."""
    images = images.float().clamp(0, 1)
    B, _, H, W = images.shape
    _, fg = segment(images)
    fgf = fg.float()  # (B, H, W)
    n_fg = fgf.sum((1, 2))
    n_bg = H * W - n_fg
    luma = (images * LUMA.to(images.device)[None, :, None, None]).sum(1)  # (B, H, W)
    l_fg = (luma * fgf).sum((1, 2)) / n_fg.clamp_min(1)
    l_bg = (luma * (1 - fgf)).sum((1, 2)) / n_bg.clamp_min(1)
    contrast = torch.where(n_fg > 0, (l_fg - l_bg).abs(), torch.zeros_like(l_fg))
    area = n_fg / (H * W)
    size = (1 - (area - 0.3).abs() / 0.3).clamp(0, 1)
    ys = torch.arange(H, device=images.device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=images.device, dtype=torch.float32) + 0.5
    cy = (fgf.sum(2) * ys).sum(1) / n_fg.clamp_min(1)
    cx = (fgf.sum(1) * xs).sum(1) / n_fg.clamp_min(1)
    dist = torch.hypot(cx - W / 2, cy - H / 2)
    centring = torch.where(n_fg > 0, (1 - dist / (H / 2)).clamp(0, 1), torch.zeros_like(dist))
    return 10 * (0.4 * contrast + 0.3 * size + 0.3 * centring)


def all_single_captions(pairs=None) -> list[str]:
    """The family ``a {colour} {shape} on a {colour} background`` over ``pairs`` (default: every ordered pair)."""
    if pairs is None:
        pairs = ALL_PAIRS
    return [caption_of(s, a, b) for (a, b) in pairs for s in SHAPES]


def all_captions(pairs=None) -> list[str]:
    """Every caption of the grammar over ``pairs`` (single, sized, counted)."""
    if pairs is None:
        pairs = ALL_PAIRS
    out = []
    for (a, b) in pairs:
        for s in SHAPES:
            out.append(caption_of(s, a, b))
            out += [caption_of(s, a, b, size=z) for z in SIZES]
            out += [caption_of(s, a, b, count=n) for n in (2, 3)]
    return out
