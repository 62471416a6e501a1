"""``python -m bench <name> [args...]``: run the benchmark module bench/<name>.py (e.g. ``ops``)."""
import runpy
import sys
from pathlib import Path


def main():
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in names:
        prog = sys.argv[0] if sys.argv[0].startswith("apex-fast") else "python -m bench"
        print(f"usage: {prog} <name> [args]; available: {', '.join(names)}")
        sys.exit(0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2)
    name = sys.argv[1]
    sys.argv = [str(here / f"{name}.py")] + sys.argv[2:]
    runpy.run_path(str(here / f"{name}.py"), run_name="__main__")


if __name__ == "__main__":
    main()
