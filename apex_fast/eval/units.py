"""Paper units of each reward (docs/SPEC.md section 2: "Report numbers as the paper does: raw
PickScore (x26), DeQA on 1..5, raw aesthetic, OCR accuracy"). The training scorers return
PickScore / 26 and DeQA / 5 so rewards share a scale; evaluation multiplies them back."""
from __future__ import annotations

from dataclasses import dataclass

# scorer name -> (factor applied to the scorer's default output, unit shown in reports)
_PAPER = {
    "pickscore": (26.0, "raw PickScore (x26)"),
    "deqa": (5.0, "DeQA score, 1..5"),
    "aesthetic": (1.0, "LAION aesthetic, ~1..10"),
    "ocr": (1.0, "OCR accuracy, 0..1"),
    "jpeg_compressibility": (1.0, "-kB at JPEG q95"),
    "jpeg_incompressibility": (1.0, "kB at JPEG q95"),
    "colorfulness": (1.0, "Hasler-Suesstrunk colorfulness"),
    "contrast": (1.0, "RMS contrast of luma"),
}


@dataclass(frozen=True)
class PaperUnit:
    factor: float  # paper value = factor * scorer output
    label: str


def paper_unit(name: str, args: dict | None = None) -> PaperUnit:
    """The unit of reward ``name`` built with ``args``. A scorer already in raw units
    (``raw: true``) keeps factor 1; the remote scorer takes the unit of the scorer it serves
    (``args.name``), assuming the server runs it with its default (non-raw) output."""
    args = dict(args or {})
    if name == "remote":
        name = str(args.get("name", "remote"))
    factor, label = _PAPER.get(name, (1.0, "scorer units"))
    if args.get("raw"):
        factor = 1.0
    return PaperUnit(factor, label)
