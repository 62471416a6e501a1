"""The tiny testbed's world: prompts naming a coloured shape, its position, the background colour and
optionally a quoted word, and the procedural images that show them.

`scripts/pretrain_tiny_sd3.py` pretrains the embedded tiny SD3 (``load_pipeline("tiny")``) on
``render(scene)`` / ``scene.prompt`` pairs streamed from a seeded generator; the prompt-alignment
reward (`apex_fast.rewards.alignment`) and the measurement script parse the same vocabulary back out
of a prompt. Words are drawn with DejaVu Sans Bold, the font matplotlib ships (a base dependency), so
the data is the same on every machine. A `Layout` fixes the word list, font size and positions
(`LAYOUTS`; `LAYOUT` is the default, the other kept so that earlier pretraining stages re-run exactly).

    a red circle on the left on a blue background
    a white triangle on a purple background with the word "SUN"
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "orange": (250, 140, 20),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# phrase -> shape centre as fractions of the image side (x, y); with a word the shape sits in the top half
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the center": (0.5, 0.5),
}
WORD_POSITIONS = ("on the left", "on the right", "in the center")
FONT_FILE = "DejaVuSans-Bold.ttf"


@dataclass(frozen=True)
class Layout:
    """How a scene with a word is drawn: the word list, the font size (fraction of the side), the word's
    centre height and the shape's centre height and radius above it."""

    words: tuple[str, ...]
    font: float
    word_y: float
    shape_y: float
    shape_radius: float


LAYOUTS: dict[str, Layout] = {
    # the first testbed: 4-letter words at 0.22 of the side - a letter is about one 8 x 8 px token of the
    # 64 px tiny SD3, too fine for it to draw legibly (OCR at the base model ~0.01); the shipped
    # asset's tokenizer and VAE were trained on it
    "small-words": Layout(("OPEN", "STOP", "SALE", "CAFE", "TAXI", "HOT", "MOON", "FISH",
                           "BOOK", "RAIN", "STAR", "GOLD", "LOVE", "JAZZ", "WIND", "ZOO"),
                          font=0.22, word_y=0.77, shape_y=0.3, shape_radius=0.17),
    # the default: 3-letter words at 0.32 of the side (a letter ~16 x 16 px, 2 x 2 tokens), the shape smaller
    "big-words": Layout(("HOT", "ZOO", "SUN", "CAT", "DOG", "FOX", "BOX", "KEY",
                         "SKY", "OWL", "JAM", "MAP", "BUS", "ART", "JOY", "PIE"),
                        font=0.32, word_y=0.74, shape_y=0.28, shape_radius=0.15),
}
LAYOUT = "big-words"
WORDS = LAYOUTS[LAYOUT].words
WORD_Y = LAYOUTS[LAYOUT].word_y  # word centre height
WORD_SHAPE_Y = LAYOUTS[LAYOUT].shape_y  # shape centre height when a word is drawn below it


def layout(name: str | None = None) -> Layout:
    """The named layout (None: the default, `LAYOUT`); an unknown name fails with the known ones."""
    if name is None:
        name = LAYOUT
    if name not in LAYOUTS:
        raise ValueError(f"testbed layout {name!r} unknown; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    position: str | None = None  # a POSITIONS key, or None (near the centre)
    word: str | None = None

    @property
    def prompt(self) -> str:
        where = f" {self.position}" if self.position else ""
        article = "an" if self.background[0] in "aeiou" else "a"
        text = f' with the word "{self.word}"' if self.word else ""
        a_obj = "an" if self.color[0] in "aeiou" else "a"
        return f"{a_obj} {self.color} {self.shape}{where} on {article} {self.background} background{text}"


_PROMPT = re.compile(
    r"^an? (?P<color>\w+) (?P<shape>\w+)(?: (?P<position>on the left|on the right|at the top|at the bottom|in the center))?"
    r" on an? (?P<background>\w+) background(?: with the word \"(?P<word>[^\"]*)\")?$"
)


def parse_prompt(prompt: str) -> Scene | None:
    """Inverse of `Scene.prompt`; None when the prompt is not a testbed prompt."""
    m = _PROMPT.match(prompt.strip())
    if m is None or m["color"] not in COLORS or m["background"] not in COLORS or m["shape"] not in SHAPES:
        return None
    return Scene(m["color"], m["shape"], m["background"], m["position"], m["word"])


def random_scene(rng: np.random.Generator, p_word: float = 0.5, p_position: float = 0.6,
                 layout_name: str | None = None) -> Scene:
    words = layout(layout_name).words
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    background = [c for c in names if c != color][rng.integers(len(names) - 1)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    word = words[rng.integers(len(words))] if rng.random() < p_word else None
    choices = WORD_POSITIONS if word else tuple(POSITIONS)
    position = choices[rng.integers(len(choices))] if rng.random() < p_position else None
    return Scene(color, shape, background, position, word)


def text_color(background: str) -> tuple[int, int, int]:
    """Words are black on light backgrounds and white on dark ones."""
    r, g, b = COLORS[background]
    return COLORS["black"] if 0.299 * r + 0.587 * g + 0.114 * b > 140 else COLORS["white"]


@lru_cache(maxsize=None)
def font_path() -> str:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"testbed font {path} missing: reinstall matplotlib (it ships the DejaVu fonts)")
    return str(path)


@lru_cache(maxsize=None)
def _font(px: int):
    from PIL import ImageFont

    return ImageFont.truetype(font_path(), px)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def render(scene: Scene, rng: np.random.Generator, size: int = 64, supersample: int = 2,
           layout_name: str | None = None) -> np.ndarray:
    """uint8 RGB [size, size, 3] image of `scene`, with small random jitter of colours, position and size."""
    from PIL import Image, ImageDraw

    lay = layout(layout_name)
    s = size * supersample
    img = Image.new("RGB", (s, s), _jitter(rng, COLORS[scene.background], 12))
    draw = ImageDraw.Draw(img)
    if scene.word:
        cx = POSITIONS[scene.position][0] if scene.position else 0.5
        cy, radius = lay.shape_y, lay.shape_radius
    else:
        cx, cy = POSITIONS[scene.position] if scene.position else (0.5, 0.5)
        radius = 0.2
    cx = (cx + rng.uniform(-0.04, 0.04)) * s
    cy = (cy + rng.uniform(-0.04, 0.04)) * s
    r = radius * rng.uniform(0.85, 1.15) * s
    fill = _jitter(rng, COLORS[scene.color], 12)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        h = r * 0.9
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # upright triangle with the same bounding box as the square
        h = r * 1.05
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    if scene.word:
        font = _font(int(round(lay.font * s)))
        x = (0.5 + rng.uniform(-0.03, 0.03)) * s
        y = (lay.word_y + rng.uniform(-0.02, 0.02)) * s
        draw.text((x, y), scene.word, fill=text_color(scene.background), font=font, anchor="mm")
    if supersample > 1:
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def prompt_set(seed: int, n: int, *, word: bool = True, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct prompts (with a quoted word when `word`), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        p = random_scene(rng, p_word=1.0 if word else 0.0).prompt
        if p not in out and p not in exclude:
            out.append(p)
    return out


__all__ = ["COLORS", "SHAPES", "POSITIONS", "WORDS", "LAYOUT", "LAYOUTS", "Layout", "layout", "Scene", "parse_prompt",
           "random_scene", "render", "text_color", "font_path", "prompt_set"]
