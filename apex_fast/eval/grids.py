"""Labelled image grids: one row per prompt (its text wrapped at the left), one column per
checkpoint, method or seed (labelled on top), optional per-image notes (scores) under each image.
Drawn with matplotlib so every label is real text that never overlaps an image."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def to_uint8_images(images) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] (torch or numpy) or uint8 [N, H, W, 3] -> uint8 [N, H, W, 3]."""
    if hasattr(images, "detach"):
        images = images.detach().cpu()
        if images.dtype.is_floating_point:
            images = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
        images = images.numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return arr


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines = textwrap.wrap(text, width=width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 1)] + "…"
    return "\n".join(lines)


def save_labelled_grid(cells: Sequence[Sequence[np.ndarray | None]], path: str | Path, *, row_labels: Sequence[str],
                       col_labels: Sequence[str], notes: Sequence[Sequence[str]] | None = None, title: str = "",
                       row_header: str = "prompt") -> Path:
    """cells[r][c]: uint8 [H, W, 3] or None (empty); row_labels [R] (prompts), col_labels [C];
    notes[r][c]: short text under the image (e.g. scores, one or two lines). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, C = len(cells), max((len(r) for r in cells), default=0)
    if R == 0 or C == 0:
        raise ValueError("save_labelled_grid: no image to draw")
    if len(row_labels) != R or len(col_labels) != C:
        raise ValueError(f"save_labelled_grid: {len(row_labels)} row labels / {len(col_labels)} column labels "
                         f"for a {R} x {C} grid")
    side = max(int(max(im.shape[0] for row in cells for im in row if im is not None)), 1)
    cell = float(np.clip(side / 100, 1.3, 3.0))  # inches; small images are shown enlarged (nearest)
    note_lines = max((n.count("\n") + 1 for row in (notes or []) for n in row if n), default=0)
    note_h = 0.16 * note_lines + (0.06 if note_lines else 0)
    label_w, gap = (2.3 if any(row_labels) else 0.15), 0.12
    col_wrap = max(8, int(cell * 11))
    wrapped_cols = [_wrap(c, col_wrap, 2) for c in col_labels]
    header_h = 0.2 + 0.17 * max(c.count("\n") + 1 for c in wrapped_cols) if any(col_labels) else 0.05
    W = label_w + C * (cell + gap) + 0.15
    title_text = _wrap(title, max(30, int(W * 10)), 3) if title else ""
    title_h = 0.2 + 0.19 * (title_text.count("\n") + 1) if title else 0.1
    H = title_h + header_h + R * (cell + note_h + gap) + 0.1
    fig = plt.figure(figsize=(W, H))
    if title:
        fig.text(0.5, 1 - (title_h / 2) / H, title_text, ha="center", va="center", fontsize=10, fontweight="bold")
    fig.text(0.08 / W, 1 - (title_h + header_h / 2) / H, row_header, ha="left", va="center", fontsize=8,
             style="italic", color="0.35")
    for c, lab in enumerate(wrapped_cols):
        x = label_w + c * (cell + gap) + cell / 2
        fig.text(x / W, 1 - (title_h + header_h / 2) / H, lab, ha="center", va="center", fontsize=8.5,
                 fontweight="bold")
    lines_fit = max(2, int(cell / 0.15))
    for r in range(R):
        top = title_h + header_h + r * (cell + note_h + gap)
        fig.text(0.08 / W, 1 - (top + cell / 2) / H, _wrap(row_labels[r], 30, lines_fit), ha="left", va="center",
                 fontsize=7.5)
        for c in range(C):
            im = cells[r][c] if c < len(cells[r]) else None
            left = label_w + c * (cell + gap)
            ax = fig.add_axes([left / W, 1 - (top + cell) / H, cell / W, cell / H])
            ax.set_xticks([])
            ax.set_yticks([])
            if im is None:
                ax.set_axis_off()
            else:
                ax.imshow(im, interpolation="nearest")
            if notes is not None and c < len(notes[r]) and notes[r][c]:
                fig.text((left + cell / 2) / W, 1 - (top + cell + 0.04) / H, notes[r][c], ha="center", va="top",
                         fontsize=6.5, family="monospace")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100 if side <= 256 else 150)
    plt.close(fig)
    return path


def save_prompt_grid(images, prompts: Sequence[str], path: str | Path, *, title: str = "",
                     col_prefix: str = "image") -> tuple[Path, Path]:
    """Images [N] with their prompts [N] as a grid with one row per distinct prompt (first-seen order)
    and one column per image of that prompt; writes ``path`` and the prompts, numbered by row, to
    ``path`` with suffix .txt beside it. Returns both paths."""
    arr = to_uint8_images(images)
    rows: dict[str, list[np.ndarray]] = {}
    for im, p in zip(arr, prompts):
        rows.setdefault(p, []).append(im)
    C = max(len(v) for v in rows.values())
    if C == 1 and len(rows) > 4:  # one image per prompt: a compact grid, each image over its numbered prompt
        ims, cols = [v[0] for v in rows.values()], 4
        cells = [ims[i:i + cols] for i in range(0, len(ims), cols)]
        cells[-1] += [None] * (cols - len(cells[-1]))
        notes = [[_wrap(f"{i + 1}. {p}", 24, 3) for i, p in enumerate(rows)][j:j + cols] for j in range(0, len(ims), cols)]
        notes[-1] += [""] * (cols - len(notes[-1]))
        png = save_labelled_grid(cells, path, row_labels=[""] * len(cells), col_labels=[""] * cols, notes=notes,
                                 title=title, row_header="")
    else:
        cells = [v + [None] * (C - len(v)) for v in rows.values()]
        labels = [f"{i + 1}. {p}" for i, p in enumerate(rows)]
        png = save_labelled_grid(cells, path, row_labels=labels,
                                 col_labels=[f"{col_prefix} {c + 1}" for c in range(C)], title=title)
    txt = png.with_suffix(".txt")
    head = f"# {title}\n" if title else ""
    txt.write_text(head + "".join(f"{i + 1}\t{p}\n" for i, p in enumerate(rows)), encoding="utf-8")
    return png, txt

