"""The configuration reference, generated from the schema: every key, its default and its docstring.

    python -m largebatch.config.reference            # rewrite the reference in docs/configuration.md
    python -m largebatch.config.reference --check    # exit 1 if that file is out of date

The key texts are the field docstrings of :mod:`largebatch.config.schema`, the same text
``python -m largebatch.train --help-config`` prints, so the schema is their only source. The
reference fills the part of the page between :data:`BEGIN` and :data:`END`; the rest of the page is
written by hand. The file is replaced atomically, and only when its text changes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from typing import Any

import yaml

from largebatch.config.keydocs import key_docs
from largebatch.errors import UsageError, run_cli
from largebatch.fileio import write_bytes_atomic

PAGE = os.path.join("docs", "configuration.md")
"""The page holding the reference, relative to the repository root."""
COMMAND = "python -m largebatch.config.reference"
"""The command that regenerates the reference (run from the repository root)."""
BEGIN = f"<!-- BEGIN GENERATED: {COMMAND} -->"
END = "<!-- END GENERATED -->"
_BLOCK_MARK = re.compile(r"^(  )(\d+)?([-+*>#.)])(?=\s|$)")
"""A wrapped line that Markdown would read as the start of a list, quote or heading."""


def _yaml(value: Any) -> str:
    """``value`` as a YAML file would write it: null, true, [30, 60, 80], runs/default."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-len("...")].strip() if text.endswith("\n...") else text


def markdown() -> str:
    """The reference: one heading per section, one list item per key (its default and meaning)."""
    lines, section = [], None
    for item in key_docs():
        head = item.key.split(".")[0]
        if head != section:
            section = head
            lines += ["", f"### `{head}`", ""]
        resolved = f" ({item.resolved})" if item.resolved else ""
        text = f"- `{item.key}` = `{_yaml(item.default)}`{resolved}: {item.doc.replace('<', chr(92) + '<')}"
        wrapped = textwrap.wrap(text, width=100, subsequent_indent="  ", break_long_words=False,
                                break_on_hyphens=False)
        lines += [_BLOCK_MARK.sub(lambda m: m.group(1) + (m.group(2) or "") + "\\" + m.group(3), line)
                  for line in wrapped]
    return "\n".join(lines[1:]) + "\n"


def render(page: str, where: str = PAGE) -> str:
    """``page`` with the part between :data:`BEGIN` and :data:`END` replaced by :func:`markdown`."""
    start, stop = page.find(BEGIN), page.find(END)
    if start < 0 or stop < start:
        raise UsageError(f"{where} has no '{BEGIN}' line followed by a '{END}' line; add both where the reference "
                         "goes")
    return page[:start + len(BEGIN)] + "\n\n" + markdown() + "\n" + page[stop:]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); run from the repository root or pass the page's "
                         "path") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("page", nargs="?", default=PAGE, help=f"the page to update (default: {PAGE})")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    page = _read(args.page)
    wanted = render(page, args.page)
    if wanted == page:
        print(f"{args.page}: the configuration reference is up to date")
        return 0
    if args.check:
        print(f"{args.page}: the configuration reference differs from the schema; run: {COMMAND} {args.page}",
              file=sys.stderr)
        return 1
    write_bytes_atomic(wanted.encode("utf-8"), args.page)
    print(f"{args.page}: the configuration reference was rewritten from the schema")
    return 0


if __name__ == "__main__":
    run_cli(main)
