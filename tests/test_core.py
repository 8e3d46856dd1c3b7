"""`hvp_utils.py` is the copyable HVP core: at most 1,000 lines, importable with torch alone (none of the
run machinery's packages), its pair and multi-crop selection working there, and it never imports `hvp_run`;
a training script copied with `hvp_utils.py` and `hvp_run/` into another folder runs there."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "hvp_utils.py"

# What the run machinery needs and the core must not: made unimportable in the subprocesses below.
RUN_PACKAGES = ("accelerate", "datasets", "huggingface_hub", "safetensors", "tensorboard", "pyarrow", "hvp_run")

REFUSE_RUN_PACKAGES = textwrap.dedent(f"""\
    import importlib.abc, sys

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {RUN_PACKAGES!r}:
                raise ImportError(f"{{name}} is unimportable in this test")

    sys.meta_path.insert(0, _Refuse())
    """)


def run_without_run_packages(code, timeout=120):
    """Run `code` in a fresh Python in the repository, after REFUSE_RUN_PACKAGES; returns the
    CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-c", REFUSE_RUN_PACKAGES + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def test_the_run_packages_are_unimportable_in_the_test_subprocess():
    probe = "\n".join(f"""
try:
    import {name}
    print("imported {name}")
except ImportError:
    pass""" for name in RUN_PACKAGES)
    result = run_without_run_packages(probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", result.stdout


def test_the_core_has_at_most_1000_lines():
    lines = len(CORE.read_text().splitlines())
    assert lines <= 1000, f"hvp_utils.py has {lines} lines: the copyable core stays readable in one sitting"


def test_the_core_never_imports_the_run_machinery():
    tree = ast.parse(CORE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import: the core is a single file"
            imported.add(node.module.partition(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            raise AssertionError("imports by name hide what the core needs")
    assert "torch" in imported
    assert not imported & set(RUN_PACKAGES), imported & set(RUN_PACKAGES)


def test_pair_selection_without_the_run_packages_gives_the_brute_force_answer():
    result = run_without_run_packages(textwrap.dedent("""
        import itertools
        import torch
        import hvp_utils as hvp

        B, N, D = 5, 5, 3
        g = torch.Generator().manual_seed(0)
        out = torch.randn(B, N, D, generator=g)
        out[1] = out[1, :1].expand(N, D)  # sample 1: every pair scores the same, the first one wins

        def pair_loss(a, b):
            return (a - b).square().sum(-1)

        pair, score, scores = hvp.select_hard_pairs(out, pair_loss)
        for b in range(B):
            best = None
            for i, j in itertools.combinations(range(N), 2):
                s = float(pair_loss(out[b, i], out[b, j]))
                if best is None or s > best[0]:
                    best = (s, [i, j])
            assert pair[b].tolist() == best[1], (b, pair[b].tolist(), best)
            assert abs(float(score[b]) - best[0]) < 1e-5
        assert pair[1].tolist() == [0, 1]
        print("pairs ok")
        """))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pairs ok\n"


def test_multicrop_selection_without_the_run_packages_gives_the_brute_force_answer():
    result = run_without_run_packages(textwrap.dedent("""
        import itertools
        import torch
        import hvp_utils as hvp

        B, G, L_LOADER, L = 4, 4, 5, 2
        cost = torch.rand(B, G, G + L_LOADER, generator=torch.Generator().manual_seed(1))
        pair, chosen_locals, score = hvp.select_multicrop(cost, L)
        for b in range(B):
            best = None
            for g0, g1 in itertools.product(range(0, G, 2), range(1, G, 2)):  # (even, odd) global pairs
                for locals_ in itertools.combinations(range(G, G + L_LOADER), L):
                    s = float(cost[b, g0, g1] + cost[b, g1, g0] + sum(cost[b, g0, v] + cost[b, g1, v] for v in locals_))
                    if best is None or s > best[0]:
                        best = (s, [g0, g1], list(locals_))
            assert (pair[b].tolist(), chosen_locals[b].tolist()) == (best[1], best[2]), (b, best)
            assert abs(float(score[b]) - best[0]) < 1e-5
        print("multicrop ok")
        """))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "multicrop ok\n"


def test_a_script_copied_with_the_core_and_the_machinery_runs_elsewhere(tiny_dataset, tmp_path):
    # the second way to copy: one training script + hvp_utils.py + hvp_run/, into a folder of one's own
    import shutil
    from conftest import TINY_TRAIN, script_env
    mine = tmp_path / "my_project"
    mine.mkdir()
    for name in ("train_simsiam.py", "hvp_utils.py"):
        shutil.copy(ROOT / name, mine / name)
    shutil.copytree(ROOT / "hvp_run", mine / "hvp_run", ignore=shutil.ignore_patterns("__pycache__"))
    env = script_env()
    env["PYTHONPATH"] = ""  # nothing of this repository on the path: only the copies
    result = subprocess.run([sys.executable, "train_simsiam.py", "--dataset", str(tiny_dataset), "--output_dir", "out",
                             "--max_steps", "2", "--eval_split", "", *TINY_TRAIN], cwd=mine, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (mine / "out" / "backbone" / "model.safetensors").is_file()
    assert (mine / "out" / "metrics.jsonl").read_text().count('"loss"') == 2
