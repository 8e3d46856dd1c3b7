"""The README's commands and CI stay in sync, and the project installs from its own files."""
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
