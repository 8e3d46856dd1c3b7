"""The README's commands and CI stay in sync, the project installs from its own files, and the repository
explains itself (references point into DESIGN.md, never outside)."""
import os
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def readme_quick_start_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_quick_start_commands()
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == test_commands[0]


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def pinned(path):
    return {normalise(re.split(r"[<>=\[ ;]", line)[0])
            for line in (ROOT / path).read_text().splitlines() if line and not line.startswith("#")}


def test_every_pinned_requirement_is_locked():
    wanted = pinned("requirements.txt") | pinned("requirements-nodeps.txt")
    locked = {normalise(line.split("==")[0]) for line in (ROOT / "requirements.lock").read_text().splitlines()
              if "==" in line}
    assert wanted and wanted <= locked, wanted - locked


def test_run_installs_the_no_deps_requirements_without_their_dependencies():
    run = (ROOT / "run").read_text()
    assert "--no-deps -r requirements-nodeps.txt" in run and 'open("requirements-nodeps.txt", "rb")' in run
    assert pinned("requirements-nodeps.txt") and not pinned("requirements-nodeps.txt") & pinned("requirements.txt")


# ----------------------------------------------------------------------------------- references into DESIGN.md
# The code and the docs cite design decisions by number and the evaluation protocols by name; all of
# them live in DESIGN.md, and nothing may send a reader to a document outside the repository.

DESIGN_NUMBER = re.compile(r"\bD(?:10|[1-9])\b")
# documents outside the repository (spelt in pieces so that this file does not match itself)
OUTSIDE = re.compile("|".join([re.escape(p) for p in ("spec" + " B.", "HVP_" + "SPEC", "../" + "shared", "/work" + "/",
                                                      "project " + "specification")] + [r"\bits B\.\d"]))


def repository_files():
    """Every .py and .md file of the repository (not the environment, run outputs or caches)."""
    skip = {"outputs", "runs", "__pycache__", "node_modules"}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        for name in sorted(files):
            if name.endswith((".py", ".md")):
                yield Path(folder) / name


def dangling_references(path):
    """Lines of `path` that cite a design decision without DESIGN.md nearby, or point outside the repository."""
    text = path.read_text()
    problems = []

    def where(offset):
        line = text.count("\n", 0, offset) + 1
        return f"{path.relative_to(ROOT)}:{line}: {text.splitlines()[line - 1].strip()}"
    if path != ROOT / "DESIGN.md":
        for m in DESIGN_NUMBER.finditer(text):
            if "DESIGN.md" not in text[max(0, m.start() - 200):m.end() + 80]:
                problems.append(where(m.start()))
    problems += [where(m.start()) for m in OUTSIDE.finditer(text)]
    return problems


def test_design_md_has_a_heading_for_every_decision_and_the_cited_sections():
    headings = re.findall(r"^#+ (.*)$", (ROOT / "DESIGN.md").read_text(), re.M)
    for n in range(1, 11):
        assert sum(h.startswith(f"D{n}. ") for h in headings) == 1, n
    assert {"Evaluation protocols", "Upstream bugs not reproduced"} <= set(headings)


def test_every_decision_reference_points_into_design_md_and_nothing_outside_the_repository():
    problems = [p for path in repository_files() for p in dangling_references(path)]
    assert not problems, "\n".join(problems)
