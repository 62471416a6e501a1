"""Prompt sets shipped with the package (prompts/*.txt, *.jsonl) and their loader."""
from __future__ import annotations

import json
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"


def resolve_prompt_file(path: str | Path) -> Path:
    """A path as given, or a bare file name from the shipped prompt sets."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = PROMPTS_DIR / p.name
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    available = ", ".join(sorted(x.name for x in PROMPTS_DIR.glob("*"))) if PROMPTS_DIR.is_dir() else "none"
    raise FileNotFoundError(f"prompt file {str(path)!r} not found (shipped prompt sets: {available})")


def load_prompts(path: str | Path, field: str = "data.train_prompts") -> list[tuple[str, dict]]:
    """[(prompt, metadata)] from a .txt (one prompt per line, blank lines and #-comments skipped) or a
    .jsonl file (one {"prompt": ..., other fields = metadata} per line). Errors name ``field``."""
    try:
        p = resolve_prompt_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field}: {e}") from None
    items: list[tuple[str, dict]] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {p} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8, "
                         f"e.g. `iconv -f latin1 -t utf-8 {p.name} > fixed.txt`") from None
    if p.suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field}: {p}:{i} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ValueError(f"{field}: {p}:{i} needs a non-empty string field \"prompt\"")
            meta = {k: v for k, v in rec.items() if k != "prompt"}
            items.append((rec["prompt"].strip(), meta))
    else:
        for line in lines:
            s = line.strip()
            if s and not s.startswith("#"):
                items.append((s, {}))
    if not items:
        raise ValueError(f"{field}: prompt file {p} holds no prompts; put one prompt per line (or a jsonl \"prompt\" field)")
    return items
