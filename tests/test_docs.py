"""The course's method reference ``docs/methods.md`` exists and every link into it resolves.

Notebooks and READMEs cite ``docs/methods.md#<anchor>``; each anchor must be a heading of the page,
slugged by GitHub's rules (lower case; punctuation other than ``-`` and ``_`` dropped; spaces become
``-``; a repeated slug gets ``-1``, ``-2``...). The specification under ``../shared`` is not shipped to
the course's users, so notebooks and READMEs must not refer to it, and notebook sources must not hold
absolute paths of this machine.
"""
import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "methods.md"
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
READMES = sorted({*ROOT.glob("README*.md"), *(p for p in ROOT.glob("*/README*.md")
                                              if not p.relative_to(ROOT).parts[0].startswith(".")),
                  *(p for p in (ROOT / "docs").glob("*.md") if p != ROOT / "docs" / "methods.md"),
                  *(ROOT / "benchmarks").glob("*.md")})

# `docs/methods.md#anchor` (also `../docs/methods.md#anchor`) anywhere in the text
ANCHOR_REF = re.compile(r"methods\.md#([^\s)\]>\"'`,;]+)")
# Markdown link targets pointing at methods.md: [text](path/methods.md#anchor "title")
LINK_TARGET = re.compile(r"\]\(\s*<?([^)\s>]*methods\.md)(?:#[^)\s>]*)?>?(?:\s+\"[^\"]*\")?\s*\)")
SHARED = re.compile(r"\.\./shared\b")
# a machine's own paths (/home/..., /work/...); /proc/self/ is Linux's interface to the running process,
# the same on every machine (notebook 07 reads its memory and I/O counters there)
ABS_PATH = re.compile(r"(?<![\w.~:/])/(?!proc/self/)(?:[A-Za-z0-9_.+-]+/){2,}")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def github_slug(text: str) -> str:
    """GitHub's heading anchor: inline markup reduced to its text, lower case, punctuation except
    ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links/images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w is Unicode-aware: letters, digits, '_'
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    """Anchors of all ATX headings outside fenced code blocks, with GitHub's duplicate suffixes."""
    anchors, seen, in_fence = set(), {}, None
    for line in markdown.splitlines():
        fence = FENCE.match(line)
        if fence:
            if in_fence is None:
                in_fence = fence.group(1)
            elif fence.group(1) == in_fence:
                in_fence = None
            continue
        if in_fence is not None:
            continue
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def notebook_sources(path: Path) -> list[tuple[int, str]]:
    """(cell index, source) of every cell; outputs are not checked (they record the run's paths)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [(i, "".join(c.get("source", []))) for i, c in enumerate(nb["cells"])]


def texts(path: Path) -> list[tuple[str, str]]:
    """(where, text) pieces of a notebook (per cell) or a Markdown file (whole)."""
    if path.suffix == ".ipynb":
        return [(f"{path.name} cell {i}", s) for i, s in notebook_sources(path)]
    return [(path.name, path.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def anchors() -> set[str]:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing"
    return heading_anchors(DOC.read_text(encoding="utf-8"))


def test_slug_rules():
    assert github_slug("11. ZipIt!") == "11-zipit"
    assert github_slug("PCB: official `PCB_merge` mode") == "pcb-official-pcb_merge-mode"
    assert github_slug("9. Git Re-Basin weight matching") == "9-git-re-basin-weight-matching"
    assert heading_anchors("# A\n## A\n```\n# B\n```\n") == {"a", "a-1"}


def test_methods_doc_exists_and_has_sections(anchors):
    expected = ["0-conventions", "1-averaging", "2-task-arithmetic", "3-ties-merging", "4-dare",
                "5-pcb-merging", "6-fr-merging", "7-free-merging", "8-permutation-alignment",
                "9-git-re-basin-weight-matching", "10-activation-matching", "11-zipit",
                "12-bn-reset-and-repair", "13-mudsc", "14-reported-numbers", "15-open-questions",
                "how-to-read-this", "contents", "references"]
    missing = [a for a in expected if a not in anchors]
    assert not missing, f"docs/methods.md lacks the section anchors {missing}"


def test_methods_doc_stands_alone(anchors):
    """The page is read without ../shared: no reference to it, no absolute path, and its own
    in-page links resolve."""
    text = DOC.read_text(encoding="utf-8")
    assert not SHARED.search(text), "docs/methods.md refers to ../shared"
    assert "METHODS.md" not in text, "docs/methods.md refers to the unshipped METHODS.md"
    bad = ABS_PATH.findall(text)
    assert not bad, f"docs/methods.md holds absolute paths {bad}"
    broken = sorted({unquote(a) for a in re.findall(r"\]\(#([^)\s]+)\)", text)} - anchors)
    assert not broken, f"docs/methods.md links to missing anchors {broken}"


@pytest.mark.parametrize("path", NOTEBOOKS + READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_to_methods_resolve(path, anchors):
    broken = []
    for where, text in texts(path):
        for m in ANCHOR_REF.finditer(text):
            anchor = unquote(m.group(1)).rstrip(".")
            if anchor not in anchors:
                broken.append(f"{where}: #{anchor}")
        for m in LINK_TARGET.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+://", target):
                continue
            if (path.parent / target).resolve() != DOC.resolve():
                broken.append(f"{where}: link target {target!r} (relative to {path.parent.name}/) "
                              f"is not docs/methods.md")
    assert not broken, "links into docs/methods.md that do not resolve:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", NOTEBOOKS + READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_shared(path):
    hits = [f"{where}: {text[max(0, m.start() - 40):m.end() + 30]!r}"
            for where, text in texts(path) for m in SHARED.finditer(text)]
    assert not hits, ("refers to ../shared, which the course's users do not have "
                      "(cite docs/methods.md instead):\n" + "\n".join(hits))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_absolute_paths_in_notebook_sources(path):
    hits = [f"cell {i}: {s[max(0, m.start() - 40):m.end() + 30]!r}"
            for i, s in notebook_sources(path) for m in ABS_PATH.finditer(s)]
    assert not hits, "absolute paths in cell sources:\n" + "\n".join(hits)


# `python -m mergelib.sweep run NOTEBOOK ... --grid NAME=...` / `-p NAME VALUE` and run_sweep([...], grid={...})
SWEEP_CLI = re.compile(r"mergelib\.sweep run (\S+\.ipynb)((?:\\\n|[^\n])*)")
SWEEP_API = re.compile(r"run_sweep\(\[\"([^\"]+\.ipynb)\"\][^)]*?(?:params=\{([^}]*)\})?[^)]*?grid=\{([^}]*)\}", re.S)


def test_sweep_examples_use_parameters_the_notebooks_define():
    """The README's sweep examples name only parameters that their notebook's `parameters` cell defines
    (a sweep over an undefined one stops before it starts)."""
    from mergelib.sweep import notebook_parameters

    text = (ROOT / "README.md").read_text()
    found = []
    for m in SWEEP_CLI.finditer(text):
        args = m.group(2).replace("\\\n", " ")
        names = re.findall(r"--grid (\w+)=", args) + re.findall(r"-p (\w+) ", args)
        found.append((m.group(1), names))
    for m in SWEEP_API.finditer(text):
        names = re.findall(r"\"(\w+)\":", (m.group(2) or "") + m.group(3))
        found.append((m.group(1), names))
    assert len(found) >= 3, found  # the CLI examples and the Python API one
    for nb, names in found:
        defined = notebook_parameters(ROOT / nb)
        assert names and set(names) <= defined, (nb, sorted(set(names) - defined))


# `ml.name`, `mergelib.module.name` in prose: notebooks' and lab copies' Markdown cells (their code cells
# run), READMEs and docs
LIBRARY_REF = re.compile(r"(?<![\w./-])(?:ml|mergelib)\.((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)")
LAB_COPIES = sorted((ROOT / "lab").glob("*.ipynb"))


def _resolves(dotted: str) -> bool:
    """Whether ``mergelib.<dotted>`` names something: attributes, or submodules imported on the way."""
    import importlib

    obj, name = importlib.import_module("mergelib"), "mergelib"
    for part in dotted.split("."):
        name += "." + part
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(name)
        except ImportError:
            return False
    return True


def test_library_names_in_the_prose_exist():
    """Every ``ml.x`` / ``mergelib.x.y`` the prose tells a reader to use exists (a notebook once sent
    readers to ``ml.dare_seed``, which was only ``ml.competition.dare_seed``)."""
    pieces = [(where, text) for path in READMES + [DOC] for where, text in texts(path)]
    for path in NOTEBOOKS + LAB_COPIES:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        pieces += [(f"{path.parent.name}/{path.name} cell {i}", "".join(c["source"]))
                   for i, c in enumerate(cells) if c["cell_type"] == "markdown"]
    refs = [(where, m.group(1).rstrip(".")) for where, text in pieces for m in LIBRARY_REF.finditer(text)]
    assert len(refs) > 50, len(refs)  # the pattern finds the references
    missing = sorted({f"{where}: {name}" for where, name in refs if not _resolves(name)})
    assert not missing, "names of mergelib that do not exist:\n" + "\n".join(missing)


def test_committed_sweep_results_hold_no_machine_paths():
    """The committed sweep (``results/``) names its notebook relative to the checkout. ``mergelib.sweep``
    records absolute paths (a run's provenance on the machine that ran it, also on dask workers); before
    committing a sweep, strip the checkout's prefix from its ``params.json`` and executed notebooks."""
    files = [p for p in (ROOT / "results").rglob("*") if p.suffix in (".json", ".ipynb", ".csv", ".md")]
    assert files
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in files
            for m in re.finditer(r"\"/(?:home|work|tmp|Users|root)/[^\"]*\"", p.read_text(encoding="utf-8"))]
    assert not hits, ("absolute paths of the machine that ran the sweep (strip the checkout's prefix, e.g. "
                      "sed -i 's#\"$PWD/#\"#g' on these files):\n" + "\n".join(hits[:10]))
