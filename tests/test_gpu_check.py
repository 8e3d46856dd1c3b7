"""bench/gpu_check.py keeps working while no GPU is at hand: its --dry_run runs every part on the CPU
at tiny sizes, as the GPU machine would see it (no `datasets` package, no wheels carried), and must
write a report and a JSON summary with every section and finite numbers. The parts only a GPU
runs (the fp16 overflow verdict, the budget's skips, the carried wheels) are checked on their own."""
import json
import math
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, script_env

sys.path.insert(0, str(REPO))
from bench import gpu_check  # noqa: E402

SECTIONS = ("## Machine", "## Imports", "## Synthetic dataset", "## Training scripts", "## HVP / plain",
            "## fp16 overflow injection", "## DINO crops: device vs worker", "## Data pipeline: loader workers",
            "## Step benches", "## Data pipeline: bench_data.py", "## Detection: eval/detection.py",
            "## Parts, skipped and failed")


def finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run (1-2 CPU-minutes), read by one test (test_dry_run_of_the_gpu_check): a fixture shared
    by several tests ran once per xdist worker that drew one of them."""
    root = tmp_path_factory.mktemp("gpu_check")
    broken = root / "no_datasets" / "datasets"  # the GPU machine has no `datasets`: make it fail to import here
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("simulated: datasets is not installed")\n')
    (root / "no_wheels").mkdir()
    out = root / "report"
    env = script_env()
    env["PYTHONPATH"] = f"{broken.parent}:{env['PYTHONPATH']}"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry_run", "--output_dir", str(out),
                             "--wheels", str(root / "no_wheels")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


def check_report_has_every_section_and_every_part_ran(dry_run):
    out, summary, report = dry_run
    for heading in SECTIONS:
        assert heading in report, heading
    assert summary["mode"] == "dry_run" and summary["finished"]
    assert {name: p["status"] for name, p in summary["parts"].items()} == {
        name: "ok" for name in ("environment", "dataset", *gpu_check.PARTS)}
    # the CUDA-only parts say what replaced them
    assert "fp16" in summary["parts"]["train_fp16"]["note"] and "dry run" in summary["parts"]["train_fp16_plain"]["note"]
    assert "datasets" in summary["imports"]["missing_before"]
    assert summary["imports"]["datasets"].startswith("stand-in")
    assert not summary["skipped"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "report.md", "summary.json"]


def check_training_numbers_are_finite(dry_run):
    _, summary, _ = dry_run
    runs = {r["name"]: r for r in summary["train"]}
    expected = {f"{s}-{k}-no" for s in gpu_check.SCRIPTS for k in ("hvp", "plain")}
    assert expected | {"simsiam-hvp-no-inject", "dino-hvp-no-worker"} == set(runs)
    for name, r in runs.items():
        if r["inject"]:
            continue
        assert r["exit"] == 0 and r["losses_finite"], (name, r.get("error"))
        assert r["steps_logged"] == summary["settings"]["steps"], name
        for key in ("images_per_s", "step_ms", "compute_ms", "train_ms", "peak_rss_mib", "startup_s", "wall_s"):
            assert finite_positive(r[key]), (name, key, r[key])
    assert 0 <= runs["simsiam-hvp-no"]["knn"]["knn_top1"] <= 100  # the first run also ends with k-NN (knn.json)
    assert len(summary["ratios"]) == 4
    for q in summary["ratios"]:
        assert all(finite_positive(q[k]) for k in ("step_time", "compute", "peak_memory")), q
    assert finite_positive(summary["dino_crops"]["device_over_worker"])


def check_overflow_control_and_benches(dry_run):
    _, summary, _ = dry_run
    [control] = summary["overflow"]
    # fp32 has no GradScaler: the injected step is applied, the check must see non-finite parameters
    assert control["control"] and control["ok"] and control["grads_nonfinite"] and not control["skipped"]
    assert len(summary["loader"]["results"]) == 4
    assert all(finite_positive(r["images_per_s"]) for r in summary["loader"]["results"])
    assert set(summary["benches"]) == set(gpu_check.SCRIPTS)
    for name, b in summary["benches"].items():
        assert all(finite_positive(v) for v in b["step_ratio"].values()), name
    bench_data = summary["bench_data"]
    assert "Worker CPU per image" in bench_data["table"] and "Loader (wall clock)" in bench_data["table"]
    loader = bench_data["results"]["loader"]  # --workers 1 2 x --crops worker device
    assert len(loader) == 4 and all(finite_positive(r["loader_views_per_s"]) for r in loader.values()), loader


def check_fine_tunes_a_resnet_and_a_vit_for_detection_and_scores_them(dry_run):
    _, summary, report = dry_run
    det = summary["detection"]
    assert {label: r["protocol"] for label, r in det.items()} == {"resnet18": "resnet", "vit_tiny": "vit"}
    for r in det.values():
        assert all(v == -1 or 0 <= v <= 100 for v in (r["box_ap"], r["mask_ap"]))  # COCOeval's numbers (-1: none)
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) and finite_positive(r["wall_s"])
    assert "| resnet18 | resnet |" in report and "| vit_tiny | vit |" in report


@pytest.mark.heavy
def test_dry_run_of_the_gpu_check(dry_run):
    check_report_has_every_section_and_every_part_ran(dry_run)
    check_training_numbers_are_finite(dry_run)
    check_overflow_control_and_benches(dry_run)
    check_fine_tunes_a_resnet_and_a_vit_for_detection_and_scores_them(dry_run)


def fp16_run(**overflow):
    o = {"step": 3, "scaler": True, "grads_nonfinite": True, "scale_before": 65536.0, "scale_after": 32768.0,
         "skipped": True, "params_unchanged": True, "params_finite": True, "params_changed_after": True}
    o.update(overflow)
    return {"script": "dino", "precision": "fp16", "inject": 3, "exit": 0, "injected": {"loss": 1.0},
            "overflow": o, "losses": [5.0, 4.9, 4.9, 4.8, 4.7], "skipped_steps": [1, 3]}


@pytest.mark.parametrize("change", [{}, {"skipped": False}, {"params_unchanged": False}, {"scale_after": 65536.0},
                                    {"params_finite": False}, {"params_changed_after": False}])
def test_fp16_overflow_verdict(change):
    verdict = gpu_check.overflow_verdict(fp16_run(**change))
    assert verdict["ok"] == (not change), verdict
    assert verdict["natural_skips"] == [1] and verdict["later_steps"] == 2


def test_a_part_past_the_budget_is_skipped_with_its_reason(tmp_path):
    check = gpu_check.Check(gpu_check.parse_args(["--dry_run", "--output_dir", str(tmp_path / "out"),
                                                  "--work_dir", str(tmp_path / "work")]))
    check.deadline = gpu_check.time.monotonic() + 3
    check.part("bench_data", check.bench_data)
    part = check.summary["parts"]["bench_data"]
    assert part["status"] == "skipped" and "s of the budget left" in part["note"]
    assert "| bench_data | skipped |" in (tmp_path / "out" / "report.md").read_text()


def test_carried_wheels_install_into_a_private_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "datasets-0.0.1-py3-none-any.whl"
    info = "datasets-0.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("datasets/__init__.py", '__version__ = "0.0.1-carried"\n')
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: datasets\nVersion: 0.0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    check = gpu_check.Check(gpu_check.parse_args(["--dry_run", "--output_dir", str(tmp_path / "out"), "--wheels",
                                                  str(wheels), "--work_dir", str(tmp_path / "work")]))
    imports = {"missing_before": ["datasets"]}
    check.install_wheels(imports)
    assert imports["installed"] == [wheel.name] and imports["now_importable"] == ["datasets"], imports
    site = tmp_path / "work" / "site"
    assert (site / "datasets" / "__init__.py").exists() and str(site) in check.pythonpath
    version = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.__version__)"],
                             env=dict(script_env(), PYTHONPATH=str(site)), capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "0.0.1-carried"


FAKE_FP16 = '''import torch
from accelerate import Accelerator


def main():  # what accelerate does in fp16 on CUDA, with the CPU's GradScaler
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")
    model = torch.nn.Linear(4, 4)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(5):
        accelerator.backward(model(torch.randn(8, 4)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
'''


def test_probe_sees_the_gradscaler_skip_the_injected_step(tmp_path):
    (tmp_path / "fake_fp16.py").write_text(FAKE_FP16)
    record = tmp_path / "record.json"
    env = dict(script_env(), PYTHONPATH=f"{tmp_path}:{REPO}")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "_probe", str(record), "3",
                             "fake_fp16.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(record.read_text())
    o = probe["overflow"]
    assert o["step"] == 3 and o["grads_nonfinite"] and o["skipped"] and o["params_unchanged"] and o["params_finite"]
    assert o["scale_after"] == o["scale_before"] / 2
    assert [s["skipped"] for s in probe["steps"]] == [False, False, True, False, False]
