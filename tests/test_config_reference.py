"""docs/configuration.md's reference is generated from the schema's docstrings and kept in step with them."""

from __future__ import annotations

import os
import re

from conftest import REPO, run_module
from largebatch.config import describe_keys, valid_keys
from largebatch.config.keydocs import key_docs
from largebatch.config.reference import BEGIN, COMMAND, END, PAGE, markdown, render

PAGE_PATH = os.path.join(REPO, PAGE)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def test_the_page_is_what_the_generator_writes():
    page = _read(PAGE_PATH)
    assert page == render(page), (f"{PAGE} differs from the config schema's docstrings; regenerate it from the "
                                  f"repository root with: {COMMAND}")


def test_every_key_is_described_once_with_its_docstring_and_default():
    text = markdown()
    docs = key_docs()
    assert [d.key for d in docs] == valid_keys()
    joined = re.sub(r"\n  ", " ", text)  # the wrapped lines of each item, joined
    for d in docs:
        assert d.doc, f"{d.key} has no docstring in largebatch/config/schema.py"
        items = [ln for ln in joined.splitlines() if ln.startswith(f"- `{d.key}` = ")]
        assert len(items) == 1, (d.key, items)
        assert items[0].endswith(d.doc.replace("<", "\\<")), (d.key, items[0])
        resolved = f" ({d.resolved})" if d.resolved else ""
        assert f"{d.key} = {d.default!r}{resolved}\n    {d.doc}" in describe_keys()  # what --help-config prints
    assert "- `train.global_batch` = `128`: Images per optimizer step" in joined
    assert "- `optim.base_lr` = `null` (per optimizer, at base_batch 256: sgd 0.2, lars/larc 0.9375," in joined
    assert "- `optim.scaling` = `null` (per optimizer: sgd/lars/larc linear, lamb sqrt): How" in joined
    assert "- `schedule.milestones` = `[30, 60, 80]`:" in joined and "- `run.cost_per_node_hour` = `null`:" in joined
    assert re.findall(r"^### `(\w+)`$", text, flags=re.M) == ["run", "data", "model", "train", "optim", "schedule",
                                                             "comm", "checkpoint", "log", "adaptive"]


def test_the_command_rewrites_a_stale_page_and_check_reports_it(tmp_path):
    page = _read(PAGE_PATH)
    before, after = page[:page.index(BEGIN)], page[page.index(END):]
    stale = before + BEGIN + "\n- `train.global_batch` = `64`: an old text\n" + after
    path = tmp_path / "configuration.md"
    path.write_text(stale, encoding="utf-8")

    r = run_module("largebatch.config.reference", "--check", str(path))
    assert r.returncode == 1, r
    assert f"run: {COMMAND} {path}" in r.stderr
    assert path.read_text(encoding="utf-8") == stale  # --check changes nothing

    r = run_module("largebatch.config.reference", str(path))
    assert r.returncode == 0, r
    assert "rewritten" in r.stdout
    assert path.read_text(encoding="utf-8") == page  # the hand-written parts kept, the reference regenerated
    assert os.listdir(tmp_path) == ["configuration.md"]  # no temporary file left beside it

    r = run_module("largebatch.config.reference", "--check", str(path))
    assert r.returncode == 0 and "up to date" in r.stdout, r


def test_a_page_without_the_markers_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n", encoding="utf-8")
    r = run_module("largebatch.config.reference", str(path))
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [f"largebatch: error: {path} has no '{BEGIN}' line followed by a "
                                             f"'{END}' line; add both where the reference goes"]
    assert path.read_text(encoding="utf-8") == "# Notes\n"

    r = run_module("largebatch.config.reference", str(tmp_path / "missing.md"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert r.stderr.startswith(f"largebatch: error: cannot read {tmp_path / 'missing.md'}"), r
