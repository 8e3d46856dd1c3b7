"""Wheels for the GPU machine, downloaded here (where PyPI is reachable) into an ignored folder that
the device tool carries with the working tree; then the size check and the command to run there.

    python bench/gpu_wheels.py                 # download, check the size, print the GPU command
    python bench/gpu_wheels.py --check_only    # only the size check and the command

bench/gpu_check.py needs none of them. The GPU machine (python3 3.12, torch 2.11, torchvision 0.26,
timm, accelerate, huggingface-hub, safetensors, pyarrow, pillow, ...) lacks only `datasets` among
what the project imports, and the training scripts do not import `datasets` when --dataset is a
parquet file (the check's data), so the check runs without it. Carry these wheels to run with
the real `datasets` instead: gpu_check.py installs whatever *.whl is in --wheels (default
.gpu_wheels/) with `pip install --no-index --no-deps --target <private folder>` when something is
missing there, and its report lists what it installed.

Default packages: `datasets` and the two dependencies of it that the GPU machine lacks (dill,
multiprocess), at the versions requirements.lock pins; pure-Python wheels, well under 1 MiB.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64          # what the device tool carries: the working tree plus the carried paths
WARN_MIB = 48           # "well under" the limit
DEFAULT_PACKAGES = ("datasets", "dill", "multiprocess")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pinned(names):
    """name==version for each name, from requirements.lock (the versions this repository is tested with)."""
    lock = (REPO / "requirements.lock").read_text()
    out = []
    for name in names:
        m = re.search(rf"^{re.escape(name)}==([^\s;#]+)", lock, re.MULTILINE | re.IGNORECASE)
        out.append(f"{name}=={m.group(1)}" if m else name)
    return out


def tree_bytes():
    """Bytes of what travels without being named: tracked files plus untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    total = 0
    for name in listed:
        path = REPO / name.decode(errors="replace")
        if name and path.is_file():
            total += path.stat().st_size
    return total


def is_ignored(path):
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".gpu_wheels", help="folder for the wheels, relative to the repository")
    parser.add_argument("--packages", nargs="+", default=None,
                        help="requirements to download (default: datasets, dill, multiprocess as requirements.lock pins)")
    parser.add_argument("--python_version", default="3.12")
    parser.add_argument("--check_only", action="store_true", help="no download: the size check and the command")
    args = parser.parse_args(argv)
    dest = REPO / args.dest
    packages = args.packages or pinned(DEFAULT_PACKAGES)
    if not args.check_only:
        dest.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   args.python_version, "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
                   "--dest", str(dest), "--disable-pip-version-check", *packages]
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    wheels = sorted(dest.glob("*.whl")) if dest.exists() else []
    names = [w.name.split("-")[0].lower().replace("_", "-") for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    total = (tree + wheel_bytes) / 2**20
    print(f"wheels in {args.dest}: {len(wheels)}, {wheel_bytes / 2**20:.2f} MiB: " + ", ".join(w.name for w in wheels))
    print(f"working tree that travels (tracked + untracked, not ignored): {tree / 2**20:.1f} MiB; "
          f"with the wheels {total:.1f} MiB of the {LIMIT_MIB} MiB the device tool carries")
    problems = []
    if twice:
        problems.append(f"more than one version of {', '.join(twice)} in {args.dest}: pip --no-deps would install both")
    if total > WARN_MIB:
        problems.append(f"{total:.1f} MiB is not well under {LIMIT_MIB} MiB")
    if dest.exists() and not is_ignored(dest):
        problems.append(f"{args.dest} is not ignored by git: it would travel twice (add it to .gitignore)")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print("\nOn the GPU machine (device tool: command below, carry " + (f'["{args.dest}"]' if wheels else "nothing")
          + ", timeout_s 540):\n")
    wheels_flag = f" --wheels {args.dest}" if wheels else ""
    print(f'PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --output_dir "$OUT"{wheels_flag}')
    print("\nA second run for what the budget skipped, e.g.:\n")
    print(f'PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --output_dir "$OUT"{wheels_flag} --budget_s 240 '
          "--parts benches bench_data train_fp16_plain")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
