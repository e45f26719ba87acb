"""Every command in the ```bash blocks of README.md and docs/*.md and in the launch wrappers' ``--help``
works as written.

The commands are read from the documents each time, so a command added later is picked up. Each one
runs in a fresh working directory holding the checkout's configs/, launch/, docker/ and benchmarks/,
with the repository on PYTHONPATH and CUDA hidden. ``plan()`` maps a command to what is run:

- a wrapper (``launch/...``, ``bash launch/...``): as written, with ``--dry-run`` added;
- ``sbatch [options] launch/slurm.sbatch ARGS``: ``bash launch/slurm.sbatch --dry-run ARGS`` inside
  the allocation those options (and the script's #SBATCH lines) describe;
- ``torchrun ... -m largebatch.train ARGS``: on one machine with at most 2 workers, as written with
  ``train.epochs=1``; more workers or nodes: ``launch/torchrun.sh ... --dry-run ARGS``;
- ``mpirun/mpiexec ... python -m largebatch.train ARGS``: ``launch/mpirun.sh ... --dry-run ARGS``;
- ``srun [options] python -m largebatch.train ARGS``: ``bash launch/slurm.sbatch --dry-run ARGS`` inside
  the allocation those options describe;
- ``python -m largebatch.train ARGS``: as written with ``train.epochs=1``;
- ``python -m largebatch.report RUN_DIR ...``: as written, after small run folders are written for
  the RUN_DIRs (the format a real run writes);
- ``python -m largebatch.<other module>``: as written;
- ``python benchmarks/<script>.py ...`` (experiments of minutes to an hour that produced the figures in
  docs/): checked like ``SYNTAX_ONLY`` commands, the script must exist;
- ``SYNTAX_ONLY`` commands: ``bash -n`` and the checks named beside each.

Paths under ``/data/`` point into a temporary data root holding a tiny image folder ``imagenet``.
Any other command fails the test until a rule covers it. Blocks of ```` ``` ```` without a language
whose lines start with ``$ `` are transcripts: the command runs as written and must print the
lines shown (a transcript's ``| tail -N``: its last N lines of output).
"""

from __future__ import annotations

import os
import glob
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from conftest import REPO, _env

README = os.path.join(REPO, "README.md")
DOCUMENTS = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
"""Where the commands are read from: the README and every page of docs/."""
WRAPPERS = ("torchrun.sh", "mpirun.sh", "slurm.sbatch")
LINKED = ("configs", "launch", "docker", "benchmarks")
"""What a command's working directory holds of the checkout (as symlinks)."""
DRY_TIMEOUT_S, RUN_TIMEOUT_S = 90, 240

SYNTAX_ONLY = {
    "pip install": "installs into the environment the tests run in; the extras it names must exist",
    "pytest": "runs the whole test suite, this test included: it must collect the suite without an error",
    "docker": "needs a Docker daemon and builds an image for minutes; the files it names must exist",
    "sudo": "runs as root: installs packages, or starts and stops Slurm's daemons (tests/test_slurm.py runs "
            "launch/slurm-single-node.sh on a real cluster); the files it names must exist",
    "export": "sets a variable in the reader's shell for the commands after it",
    "scontrol": "asks a running Slurm about a job (tests/test_slurm.py does, on a real cluster)",
}
"""Commands (by their first words) that are only checked, with the reason."""


@dataclass
class Doc:
    source: str
    """Where the command is written: README.md:LINE, docs/PAGE.md:LINE or 'launch/X --help'."""
    text: str
    """The command as written, continuation lines joined."""
    expect: list[str] | None = None
    """A transcript's output lines."""


@dataclass
class Step:
    doc: Doc
    argv: list[str]
    kind: str = "run"
    """'run', 'dry-run' (must print 'would run: ...') or 'syntax'."""
    env: dict = field(default_factory=dict)
    timeout: float = DRY_TIMEOUT_S
    fake_runs: list[str] = field(default_factory=list)
    """Run folders to write before the command (python -m largebatch.report)."""
    tail: int | None = None
    """A transcript's ``| tail -N``: only the last N lines of its standard output are compared."""


# ------------------------------------------------------------------------------------------------
# Reading the commands


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out, start, parts = [], None, []
    for n, line in lines:
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1].strip())
            continue
        parts.append(line.strip())
        out.append((start, " ".join(p for p in parts if p)))
        start, parts = None, []
    if parts:
        out.append((start, " ".join(parts)))
    return out


def readme_blocks(path: str = README) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """(language, first line, [(line number, text)]) of each fenced block, indentation removed."""
    blocks, current = [], None
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            m = re.match(r"^(\s*)```(\S*)\s*$", line)
            if current is None and m:
                current = (m.group(2), n, len(m.group(1)), [])
            elif current is not None and re.match(r"^\s*```\s*$", line):
                blocks.append((current[0], current[1], current[3]))
                current = None
            elif current is not None:
                current[3].append((n, line.rstrip("\n")[current[2]:]))
    assert current is None, f"{path}: the block opened at line {current[1]} is never closed"
    return blocks


def readme_commands(path: str = README) -> list[list[Doc]]:
    """The commands of one document (the README by default), one list per block: ```bash blocks, and
    transcripts."""
    out, name = [], os.path.relpath(path, REPO)
    for lang, _, lines in readme_blocks(path):
        if lang == "bash":
            docs = [Doc(f"{name}:{n}", text) for n, text in _join_continuations(lines)
                    if text.strip() and not text.strip().startswith("#")]
        elif lang == "" and any(text.startswith("$ ") for _, text in lines):
            docs = []
            for n, text in lines:
                if text.startswith("$ "):
                    docs.append(Doc(f"{name}:{n}", text[2:], expect=[]))
                elif docs and text.strip():
                    docs[-1].expect.append(text.strip())
        else:
            continue
        if docs:
            out.append(docs)
    return out


def documented_commands() -> list[list[Doc]]:
    """The commands of every document: the README's blocks, then each docs/ page's."""
    return [docs for path in DOCUMENTS for docs in readme_commands(path)]


def help_text(script: str) -> str:
    r = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--help"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def help_commands(script: str) -> list[Doc]:
    """The examples of a wrapper's manual: lines indented 4 or more that start a command."""
    lines = help_text(script).splitlines()
    picked, i = [], 0
    while i < len(lines):
        if re.match(r"^ {4,}(launch/|bash launch/|sbatch )", lines[i]):
            picked.append((i + 1, lines[i]))
            while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                picked.append((i + 1, lines[i]))
        i += 1
    return [Doc(f"launch/{script} --help", text) for _, text in _join_continuations(picked)]


# ------------------------------------------------------------------------------------------------
# What each command becomes


def _words(doc: Doc) -> list[list[str]]:
    """The command's words, split at '&&'; comments dropped."""
    words = shlex.split(doc.text, comments=True)
    for bad in ("|", "||", ";", ">", ">>", "<", "&"):
        if bad in words:
            pytest.fail(f"{doc.source}: no rule for {bad!r} in {doc.text!r}; split it into separate commands")
    parts, current = [], []
    for w in words:
        if w == "&&":
            parts.append(current)
            current = []
        else:
            current.append(w)
    return [p for p in parts + [current] if p]


def _option(argv: list[str], *names: str, default=None):
    for i, a in enumerate(argv):
        for name in names:
            if a == name and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
    return default


def _sbatch_defaults(script: str) -> dict:
    found = {}
    with open(os.path.join(REPO, script)) as fh:
        for line in fh:
            m = re.match(r"^#SBATCH\s+--([\w-]+)=(\S+)", line)
            if m:
                found[m.group(1)] = m.group(2)
    return found


def _with_dry_run(argv: list[str], at: int) -> list[str]:
    return argv if "--dry-run" in argv else argv[:at] + ["--dry-run"] + argv[at:]


def _is_python(word: str) -> bool:
    return word in ("python", "python3")


_TAIL = re.compile(r"\s\|\s*tail\s+-(?:n\s*)?(\d+)\s*$")


def _slurm_env(options: list[str], defaults: dict) -> dict:
    """The variables of an allocation of the shape ``options`` (sbatch's or srun's) describe."""
    nodes = int(_option(options, "--nodes", "-N", default=defaults.get("nodes", 1)))
    per_node = int(_option(options, "--ntasks-per-node", default=defaults.get("ntasks-per-node", 1)))
    env = {"SLURM_JOB_ID": "1", "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes * per_node),
           "SLURM_NTASKS_PER_NODE": str(per_node)}
    cpus = _option(options, "--cpus-per-task")
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    return env


def plan(doc: Doc, data_root: str) -> list[Step]:
    """The steps that check ``doc``; fails the test for a command no rule covers."""
    steps = []
    tail = _TAIL.search(doc.text) if doc.expect is not None else None
    if tail:  # a transcript that shows the end of its output
        doc = Doc(doc.source, doc.text[:tail.start()], doc.expect)
    for argv in _words(doc):
        argv = [data_root + a[len("/data"):] if a.startswith("/data/") else a for a in argv]
        script = next((i for i, a in enumerate(argv) if a.startswith("launch/")), None)
        if doc.expect is not None:  # a transcript runs as written
            steps.append(Step(doc, argv, timeout=RUN_TIMEOUT_S, tail=int(tail.group(1)) if tail else None))
        elif any(argv[:len(first.split())] == first.split() for first in SYNTAX_ONLY):
            steps.append(Step(doc, argv, kind="syntax"))
        elif argv[0].startswith("launch/"):
            steps.append(Step(doc, _with_dry_run(argv, 1), kind="dry-run"))
        elif argv[0] == "bash" and len(argv) > 1 and argv[1].startswith("launch/"):
            steps.append(Step(doc, _with_dry_run(argv, 2), kind="dry-run"))
        elif argv[0] == "sbatch" and script is not None:
            at = script
            env = _slurm_env(argv[1:at], _sbatch_defaults(argv[at]))
            steps.append(Step(doc, ["bash", argv[at], "--dry-run", *argv[at + 1:]], kind="dry-run", env=env))
        elif argv[0] == "srun" and "largebatch.train" in argv:
            at = argv.index("largebatch.train") - 2
            assert _is_python(argv[at]) and argv[at + 1] == "-m", f"{doc.source}: expected python -m largebatch.train"
            env = _slurm_env(argv[1:at], {})
            steps.append(Step(doc, ["bash", "launch/slurm.sbatch", "--dry-run", *argv[at + 3:]], kind="dry-run",
                              env=env))
        elif argv[0] == "torchrun" and "largebatch.train" in argv:
            at = argv.index("largebatch.train") - 1
            assert argv[at] == "-m", f"{doc.source}: expected -m largebatch.train in {doc.text!r}"
            options, trainer = argv[1:at], argv[at + 2:]
            nproc = int(_option(options, "--nproc-per-node", "--nproc_per_node", default=1))
            if "--standalone" in options and nproc <= 2:
                steps.append(Step(doc, argv + ["train.epochs=1"], timeout=RUN_TIMEOUT_S))
            else:
                steps.append(Step(doc, ["launch/torchrun.sh", *options, "--dry-run", *trainer], kind="dry-run"))
        elif argv[0] in ("mpirun", "mpiexec") and "largebatch.train" in argv:
            at = argv.index("largebatch.train") - 2
            assert _is_python(argv[at]) and argv[at + 1] == "-m", f"{doc.source}: expected python -m largebatch.train"
            steps.append(Step(doc, ["launch/mpirun.sh", *argv[1:at], "--dry-run", *argv[at + 3:]], kind="dry-run"))
        elif _is_python(argv[0]) and argv[1:3] == ["-m", "largebatch.train"]:
            steps.append(Step(doc, argv + ["train.epochs=1"], timeout=RUN_TIMEOUT_S))
        elif _is_python(argv[0]) and argv[1:3] == ["-m", "largebatch.report"]:
            rest, runs = argv[3:], []
            for i, a in enumerate(rest):
                if not a.startswith("-") and (i == 0 or not rest[i - 1].startswith("--")):
                    runs.append(a)
            steps.append(Step(doc, argv, fake_runs=runs, timeout=RUN_TIMEOUT_S))
        elif _is_python(argv[0]) and len(argv) > 2 and argv[1] == "-m" and argv[2].startswith("largebatch."):
            steps.append(Step(doc, argv, timeout=RUN_TIMEOUT_S))
        elif _is_python(argv[0]) and len(argv) > 1 and argv[1].startswith("benchmarks/") and argv[1].endswith(".py"):
            steps.append(Step(doc, argv, kind="syntax"))
        else:
            pytest.fail(f"{doc.source}: no rule for {doc.text!r}; add one to plan() in {__file__}, or its first "
                        "words to SYNTAX_ONLY with the reason")
    return steps


# ------------------------------------------------------------------------------------------------
# Running them


def _extras() -> set[str]:
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def check_syntax(step: Step) -> str | None:
    """Why a syntax-only command is wrong, or None."""
    r = subprocess.run(["bash", "-n", "-c", shlex.join(step.argv)], capture_output=True, text=True)
    if r.returncode != 0:
        return f"bash -n: {r.stderr.strip()}"
    for word in step.argv:
        m = re.match(r"^\.\[([\w,-]+)\]$", word)
        if step.argv[:2] == ["pip", "install"] and m:
            missing = set(m.group(1).split(",")) - _extras()
            if missing:
                return f"extras {sorted(missing)} are not in pyproject.toml"
        for top in LINKED:
            if word.startswith(top + "/") and not os.path.exists(os.path.join(REPO, word)):
                return f"{word} does not exist"
    if step.argv[0] == "pytest":
        return _collects(step.argv[1:])
    return None


def _collects(args: list[str]) -> str | None:
    """Why ``pytest ARGS`` run in the checkout would not collect the suite, or None."""
    r = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-n", "0", "-p",
                        "no:cacheprovider"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    found = re.search(r"^(\d+) tests? collected", r.stdout, re.M)
    if r.returncode != 0 or not found or int(found.group(1)) < 100:
        return f"pytest {shlex.join(args)} does not collect the suite (exit {r.returncode}): {r.stdout[-500:]}"
    return None


def _command_env(extra: dict) -> dict:
    env = _env({"PYTHON": sys.executable})
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def run_steps(steps: list[Step], cwd: str) -> list[str]:
    """Run the steps of one block in order in ``cwd``; the problems found."""
    from test_observe import write_fake_run

    os.makedirs(cwd)
    for top in LINKED:
        os.symlink(os.path.join(REPO, top), os.path.join(cwd, top))
    problems = []
    for step in steps:
        where = f"{step.doc.source}: {step.doc.text}\n  ran: {shlex.join(step.argv)}"
        if step.kind == "syntax":
            why = check_syntax(step)
            if why:
                problems.append(f"{where}\n  {why}")
            continue
        for i, folder in enumerate(step.fake_runs):
            if not os.path.exists(os.path.join(cwd, folder)):
                write_fake_run(os.path.join(cwd, folder), [f"train.global_batch={64 * (i + 1)}"])
        try:
            r = subprocess.run(step.argv, cwd=cwd, env=_command_env(step.env), capture_output=True, text=True,
                               timeout=step.timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"{where}\n  still running after {step.timeout}s")
            continue
        except OSError as exc:
            problems.append(f"{where}\n  cannot start: {exc}")
            continue
        output = r.stdout + r.stderr
        if step.tail is not None:
            output = "\n".join(r.stdout.splitlines()[-step.tail:]) + "\n" + r.stderr
        if step.doc.expect is not None:
            got = [ln.strip() for ln in output.splitlines() if ln.strip()]
            if got != step.doc.expect:
                problems.append(f"{where}\n  printed {got}, {step.doc.source.split(':')[0]} shows {step.doc.expect}")
        elif r.returncode != 0 or "Traceback" in output:
            problems.append(f"{where}\n  exit status {r.returncode}:\n{output[-3000:]}")
        elif step.kind == "dry-run" and "would run: " not in r.stdout:
            problems.append(f"{where}\n  printed no 'would run:' line:\n{output[-3000:]}")
    return problems


def all_units() -> list[tuple[str, list[Doc]]]:
    """(name, commands) for each block of the README and docs/*.md and each wrapper example."""
    units = [(f"{docs[0].source}", docs) for docs in documented_commands()]
    for script in WRAPPERS:
        units += [(f"{d.source} #{i + 1}", [d]) for i, d in enumerate(help_commands(script))]
    return units


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """/data/ of the documents: a tiny image folder at imagenet/ (train/ and val/, 2 classes)."""
    from PIL import Image
    import numpy as np

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c in ("n01", "n02"):
            folder = root / "imagenet" / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, data_root) -> dict[str, list[str]]:
    """The problems of every selected unit, the units run side by side (a block's commands in
    order). A wrapper example that maps to the same dry run as another is run once."""
    selected = {item.callspec.params["unit"] for item in request.session.items
                if getattr(item, "module", None) is sys.modules[__name__] and hasattr(item, "callspec")
                and "unit" in item.callspec.params}
    work = tmp_path_factory.mktemp("work")
    units, seen, jobs = [u for u in all_units() if u[0] in selected], set(), []
    for n, (name, docs) in enumerate(units):
        steps = [s for d in docs for s in plan(d, data_root)]
        if len(docs) == 1 and all(s.kind == "dry-run" for s in steps):
            key = tuple((tuple(s.argv), tuple(sorted(s.env.items()))) for s in steps)
            if key in seen:
                jobs.append((name, [], str(work / str(n))))
                continue
            seen.add(key)
        jobs.append((name, steps, str(work / str(n))))
    with ThreadPoolExecutor(max_workers=3) as pool:
        found = list(pool.map(lambda job: run_steps(job[1], job[2]), jobs))
    return {name: problems for (name, _, _), problems in zip(jobs, found)}


UNITS = [name for name, _ in all_units()]


@pytest.mark.parametrize("unit", UNITS)
def test_documented_command_works(outcomes, unit):
    problems = outcomes[unit]
    assert not problems, "\n\n".join(problems)


def test_the_commands_are_found():
    names = {d.text.split(" ")[0] for docs in documented_commands() for d in docs}
    assert {"pip", "python", "torchrun", "launch/torchrun.sh", "launch/mpirun.sh", "sbatch", "bash", "mpirun",
            "docker"} <= names
    texts = [d.text for docs in documented_commands() for d in docs]
    assert any("--rdzv-endpoint HOST:29500 --dry-run" in t for t in texts)  # a continued line is joined
    assert any(d.expect for docs in documented_commands() for d in docs)  # the transcript
    for script in WRAPPERS:
        docs = help_commands(script)
        assert len(docs) >= 3, (script, docs)
        assert all("[" not in d.text for d in docs)  # examples, not the USAGE synopsis
        assert all(not d.text.endswith("\\") for d in docs)


def test_the_rules():
    root = "/tmp/data"

    def one(text):
        (step,) = plan(Doc("x", text), root)
        return step

    s = one("torchrun --nnodes 16 --nproc-per-node 8 --rdzv-endpoint H:1 -m largebatch.train --config c.yaml a.b=1")
    assert s.kind == "dry-run" and s.argv == ["launch/torchrun.sh", "--nnodes", "16", "--nproc-per-node", "8",
                                              "--rdzv-endpoint", "H:1", "--dry-run", "--config", "c.yaml", "a.b=1"]
    s = one("torchrun --standalone --nproc-per-node 2 -m largebatch.train  # two")
    assert s.kind == "run" and s.argv[-1] == "train.epochs=1"
    s = one("mpirun -np 8 python -m largebatch.train comm.backend=mpi")
    assert s.argv == ["launch/mpirun.sh", "-np", "8", "--dry-run", "comm.backend=mpi"]
    s = one("sbatch --nodes 4 --cpus-per-task 8 launch/slurm.sbatch --config c.yaml")
    assert s.argv == ["bash", "launch/slurm.sbatch", "--dry-run", "--config", "c.yaml"]
    assert s.env["SLURM_NTASKS"] == str(4 * int(_sbatch_defaults("launch/slurm.sbatch")["ntasks-per-node"]))
    assert s.env["SLURM_CPUS_PER_TASK"] == "8"
    s = one("python -m largebatch.data.pack /data/imagenet /data/x.lbpack")
    assert s.argv[3:] == ["/tmp/data/imagenet", "/tmp/data/x.lbpack"]
    s = one("python -m largebatch.report runs/a runs/b --out report/")
    assert s.fake_runs == ["runs/a", "runs/b"]
    assert [st.kind for st in plan(Doc("x", 'pip install -e ".[dev]" && pytest'), root)] == ["syntax", "syntax"]
    with pytest.raises(pytest.fail.Exception, match="no rule"):
        plan(Doc("x", "make install"), root)
    with pytest.raises(pytest.fail.Exception, match="no rule"):
        plan(Doc("x", "python -m largebatch.train | tee log"), root)
    assert check_syntax(one('pip install -e ".[dev,nosuch]"')) == "extras ['nosuch'] are not in pyproject.toml"
    assert "does not exist" in check_syntax(one("docker build -f docker/Dockerfile.nope ."))
    assert check_syntax(one('pip install -e ".[dev,mpi]"')) is None
    assert one("sudo launch/slurm-single-node.sh start /tmp/slurm").kind == "syntax"
    assert "does not exist" in check_syntax(one("sudo launch/nosuch.sh start /tmp/slurm"))


def test_the_docs_pages_are_read():
    sources = {d.source.split(":")[0] for docs in documented_commands() for d in docs}
    assert {"README.md", "docs/hpc.md", "docs/data.md", "docs/configuration.md", "docs/large-batch.md",
            "docs/observing.md", "docs/simulator.md", "docs/batch_scaling.md"} <= sources
    assert len(DOCUMENTS) > 1 and all(p.endswith(".md") for p in DOCUMENTS)
    assert [docs[0].source for docs in readme_commands()] == [docs[0].source for docs in documented_commands()
                                                              if docs[0].source.startswith("README.md:")]


def test_the_rules_for_srun_benchmark_scripts_and_tails():
    root = "/tmp/data"
    (s,) = plan(Doc("x", "srun --nodes 2 --ntasks-per-node 4 python -m largebatch.train a.b=1  # eight"), root)
    assert s.kind == "dry-run" and s.argv == ["bash", "launch/slurm.sbatch", "--dry-run", "a.b=1"]
    assert (s.env["SLURM_NNODES"], s.env["SLURM_NTASKS"], s.env["SLURM_NTASKS_PER_NODE"]) == ("2", "8", "4")
    (s,) = plan(Doc("x", "python benchmarks/batch_scaling.py --seeds 0 1 2"), root)
    assert s.kind == "syntax" and check_syntax(s) is None
    (s,) = plan(Doc("x", "python benchmarks/nosuch.py"), root)
    assert check_syntax(s) == "benchmarks/nosuch.py does not exist"
    (s,) = plan(Doc("x", "python -m largebatch.simulate --validate | tail -3", expect=["a"]), root)
    assert s.tail == 3 and s.argv == ["python", "-m", "largebatch.simulate", "--validate"]
    with pytest.raises(pytest.fail.Exception, match="no rule"):
        plan(Doc("x", "python -m largebatch.simulate --validate | tail -3"), root)  # only a transcript's tail
