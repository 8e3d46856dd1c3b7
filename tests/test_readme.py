"""The README's code does what the README says: the examples of "Use HVP in your own training loop" run as
written with `hvp_utils.py` alone and train on the hardest views, the SLURM job gives every node its own
rank, and the "plain DINO" command configures no selection."""
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hvp_run
import train_dino
from test_core import run_without_run_packages

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OWN_LOOP_SECTION = "## Use HVP in your own training loop"


def own_loop_examples():
    """{name: code} of the section's python blocks, each marked `<!-- example: name -->`."""
    start = README.index(OWN_LOOP_SECTION)
    end = README.find("\n## ", start + 1)
    section = README[start:end if end >= 0 else None]
    examples = dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```\n", section, re.S))
    assert section.count("```python") == len(examples), "every python block of the section is a marked example"
    return examples


def run_example(name, check):
    """Run the README example `name` as written, in a fresh Python where the run machinery's packages
    and hvp_run are unimportable, then `check` (code that reads the example's variables from `ns`).
    Returns the example's printed lines."""
    code = textwrap.dedent(f"""
        ns = {{"__name__": "__main__"}}
        exec(compile({own_loop_examples()[name]!r}, "README.md example {name}", "exec"), ns)
        print("CHECKS")
        """) + textwrap.dedent(check)
    result = run_without_run_packages(code, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    printed, _, checks = result.stdout.partition("CHECKS\n")
    assert checks == "checked\n", result.stdout
    return printed.splitlines()


def test_the_own_loop_section_has_a_pair_and_a_multicrop_example():
    assert sorted(own_loop_examples()) == ["multicrop", "pairs"]


def test_the_pair_example_trains_on_the_hardest_pair_of_each_image():
    printed = run_example("pairs", """
        import itertools
        import torch
        views, p, z, pair, x1, x2, pair_loss = (ns[k] for k in ("views", "p", "z", "pair", "x1", "x2", "pair_loss"))
        B, N = views.shape[:2]
        assert N > 2, "with 2 views there is nothing to select"
        for b in range(B):  # the last step: brute force over the pairs in the reference's loop order
            best = None
            for i, j in itertools.combinations(range(N), 2):
                score = float(pair_loss((p[b, i], z[b, i]), (p[b, j], z[b, j])))
                if best is None or score > best[0]:
                    best = (score, i, j)
            _, i, j = best
            assert pair[b].tolist() == [i, j], (b, pair[b].tolist(), best)
            assert torch.equal(x1[b], views[b, i]) and torch.equal(x2[b], views[b, j]), b
        assert (pair != torch.tensor([0, 1])).any(), "some image's hardest pair is not the plain one"
        print("checked")
        """)
    scores = [re.search(r"trained pair (-?[\d.]+) vs the plain pair \(0, 1\) (-?[\d.]+)", line).groups()
              for line in printed]
    assert scores, printed
    assert all(float(hard) >= float(plain) for hard, plain in scores), printed
    assert any(float(hard) > float(plain) for hard, plain in scores), printed


def test_the_multicrop_example_trains_on_the_highest_scoring_tuple():
    printed = run_example("multicrop", """
        import itertools
        import torch
        cost, pair, chosen_locals, G, L = (ns[k] for k in ("cost", "pair", "chosen_locals", "G", "L"))
        global_views, local_views, x_globals, x_locals = (
            ns[k] for k in ("global_views", "local_views", "x_globals", "x_locals"))
        B, _, V = cost.shape
        for b in range(B):  # the last step: brute force over (even, odd) global pairs x local subsets
            best = None
            for g0, g1 in itertools.product(range(0, G, 2), range(1, G, 2)):
                for subset in itertools.combinations(range(G, V), L):
                    score = float(cost[b, g0, g1] + cost[b, g1, g0]
                                  + sum(cost[b, g0, v] + cost[b, g1, v] for v in subset))
                    if best is None or score > best[0]:
                        best = (score, [g0, g1], list(subset))
            assert (pair[b].tolist(), chosen_locals[b].tolist()) == (best[1], best[2]), (b, best)
            assert torch.equal(x_globals[b], global_views[b, pair[b]]), b
            assert torch.equal(x_locals[b], local_views[b, chosen_locals[b] - G]), b
        plain = torch.arange(G, G + L)
        assert ((pair != torch.tensor([0, 1])).any(1) | (chosen_locals != plain).any(1)).any(), "all plain tuples"
        print("checked")
        """)
    steps = [re.search(r"loss ([\d.]+), score of the chosen tuple ([\d.]+)", line).groups() for line in printed]
    assert steps, printed
    for loss, score in steps:  # the step's loss is the selection score of the tuple it trained on
        assert float(loss) == pytest.approx(float(score), abs=2e-5), printed


# ----------------------------------------------------------------------------------- the SLURM job

def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_the_slurm_job_gives_each_node_its_own_machine_rank(tmp_path):
    """Rendered for two nodes: a fake `srun` runs the job step once per node with that node's
    SLURM_NODEID, a fake `accelerate` prints the arguments it was started with."""
    (job,) = [block for block in bash_blocks() if "#SBATCH" in block]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n'
                'for node in 0 1; do SLURM_NODEID=$node "$@" || exit 1; done\n',
        "accelerate": f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                      "'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n",
        "scontrol": "#!/bin/sh\n"
                    "case \"$1\" in show) printf 'node-a\\nnode-b\\n' ;; *) echo \"scontrol $*\" >&2 ;; esac\n",
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(job)
    # the batch script itself runs on the first node
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NODEID="0", SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="node-[a-b]")
    result = subprocess.run(["bash", "job.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    launches = [json.loads(line) for line in result.stdout.splitlines()]

    def flag(argv, name):
        return argv[argv.index(name) + 1]
    assert len(launches) == 2, result.stdout
    assert [flag(argv, "--machine_rank") for argv in launches] == ["0", "1"]
    assert {flag(argv, "--main_process_ip") for argv in launches} == {"node-a"}
    assert {flag(argv, "--num_machines") for argv in launches} == {"2"}


# ----------------------------------------------------------------------------------- plain DINO

def plain_dino_arguments():
    """The arguments after train_dino.py of the README command commented `# plain DINO`."""
    commands = [command for block in bash_blocks() for command in block.replace("\\\n", " ").splitlines()]
    (command,) = [c for c in commands if c.rstrip().endswith("# plain DINO")]
    words = shlex.split(command.split("#")[0])
    return words[words.index("train_dino.py") + 1:]


@pytest.mark.parametrize("dataset", ["as written", "the shipped dataset (its CPU preset)"])
def test_the_plain_dino_command_configures_no_selection(dataset):
    argv = plain_dino_arguments()
    if dataset != "as written" and "--dataset" in argv:
        i = argv.index("--dataset")
        argv = argv[:i] + argv[i + 2:]
    cfg, _ = hvp_run.parse_config(train_dino.Config, argv, presets=train_dino.PRESETS, recipes=train_dino.RECIPES)
    train_dino.check_config(cfg)
    assert cfg.global_views == 2, "2 globals: no global pair to choose"
    assert cfg.local_views == cfg.local_crops_number, "every candidate local is trained: no local selection"
