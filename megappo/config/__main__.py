"""``python -m megappo.config --markdown [--check docs/config.md]``: the config reference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megappo.config.reference import render_markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megappo.config", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the config reference as Markdown")
    parser.add_argument("--check", metavar="FILE", help="with --markdown: exit 1 if FILE differs from the reference")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.error("nothing to do: pass --markdown")
    text = render_markdown()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    if current != text:
        print(
            f"{path} is {'missing' if current is None else 'stale'}: regenerate it with "
            f"`python -m megappo.config --markdown > {path}` (or `make docs`)",
            file=sys.stderr,
        )
        return 1
    print(f"{path} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
