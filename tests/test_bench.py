"""The step benchmarks keep working: bench/bench_{simsiam,simclr,dino,ibot}.py time the training
scripts' own train_step functions, so a change there that a bench no longer fits fails here. Each
bench runs in-process at a tiny size (1 warm-up + 1 measured step of each kind) and must write a
table and a JSON summary with finite, positive ratios; the scoring replay must pick what the real
selection picks."""
import contextlib
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import REPO, script_env

sys.path.insert(0, str(REPO))
import hvp_run  # noqa: E402
import hvp_utils as hvp  # noqa: E402
import train_dino as td  # noqa: E402
import train_ibot as ti  # noqa: E402
import train_simclr as tc  # noqa: E402
import train_simsiam as ts  # noqa: E402
from bench import bench_data, bench_dino, bench_ibot, bench_simclr, bench_simsiam, common, run_all  # noqa: E402

QUICK = ["--steps", "1", "--warmup", "1", "--mixed_precision", "no", "--threads", "1"]  # 1 thread: no spinning OpenMP
# workers on a shared 2-core machine (the test process gets its thread count back afterwards)
RESNET = ["--arch", "test_resnet", "--image_size", "16", "--batch_size", "8"]  # timm's 0.4M-parameter ResNet
VIT = ["--arch", "test_vit", "--small_stem", "--image_size", "16", "--local_size", "8", "--batch_size", "4",
       "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32", "--global_views", "4",
       "--local_crops_number", "2"]  # timm's 6-block, 64-wide ViT with 4 px patches: 16 + 4 tokens
BENCHES = {
    "simsiam": (bench_simsiam, [*RESNET, "--proj_dim", "64", "--pred_dim", "16"]),
    "simclr": (bench_simclr, [*RESNET, "--proj_hidden_dim", "64", "--proj_dim", "16"]),
    "dino": (bench_dino, [*VIT, "--device_crops"]),  # + the HVP step with its views cut inside train_step
    "ibot": (bench_ibot, VIT),
}
_RUNS = {}


def run_bench(name, tmp_path_factory):
    """bench_<name>.main at the tiny size, once per test session -> (returned summary, --output path)."""
    if name not in _RUNS:
        module, flags = BENCHES[name]
        output = tmp_path_factory.mktemp(f"bench_{name}") / f"{name}.md"
        threads = torch.get_num_threads()
        try:
            _RUNS[name] = module.main([*flags, *QUICK, "--output", str(output)]), output
        finally:
            torch.set_num_threads(threads)
    return _RUNS[name]


@pytest.mark.parametrize("name", list(BENCHES))
def test_bench_times_the_real_step_at_a_tiny_size_and_writes_its_summary(name, tmp_path_factory):
    summary, output = run_bench(name, tmp_path_factory)
    written = json.loads(output.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["bench"] == name
    for key in ("step_ratio", "step_ratio_cpu"):
        assert set(written[key]) == {"plain", "hvp@1", "hvp@0.5", *(["hvp@1-device-crops"] if name == "dino" else [])}
        assert all(math.isfinite(v) and v > 0 for v in written[key].values()), written[key]
    table = output.read_text()
    assert "wall clock:" in table and "CPU time of this process:" in table and "peak memory of one step" in table
    for clock in ("wall clock", "CPU time of this process"):
        for kind in ("hvp@1", "hvp@0.5", *(["hvp@1-device-crops"] if name == "dino" else [])):
            parts = written["median_s"][clock][kind]
            # train_step's own split was read (the CPU-time one through its hvp.clock marks) and the scoring timed
            assert parts["select"] is not None and parts["train"] > 0 and parts["score"] > 0, (clock, kind, parts)


def test_run_all_summarises_the_four_benches(tmp_path_factory):
    summaries = {name: run_bench(name, tmp_path_factory)[0] for name in BENCHES}
    lines = run_all.summary_lines(summaries)
    assert len(lines) == 2 + len(BENCHES)
    assert all("(CPU time " in line for line in lines[2:]), lines


@pytest.mark.parametrize("native", [False, True])
def test_the_benches_time_the_precision_the_scripts_run_by_default(native, monkeypatch, capsys):
    """Without --mixed_precision a bench runs what the scripts' presets run ("auto"), resolved the same
    way: fp32 on a CPU without native bf16 (emulated bf16 is several times slower), bf16 where it is
    native; the bench prints what it resolved to."""
    for bench, script in ((bench_simsiam, ts), (bench_simclr, tc), (bench_dino, td), (bench_ibot, ti)):
        default = bench.parse_args([]).mixed_precision
        assert default == script.PRESETS[hvp_run.DEFAULT_DATASET]["mixed_precision"] == "auto", bench.__name__
    monkeypatch.setattr(hvp_run.lifecycle, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    accelerator = common.make_accelerator(cpu, bench_dino.parse_args([]).mixed_precision)
    assert accelerator.mixed_precision == hvp_run.resolve_precision("auto", cpu)[0] == ("bf16" if native else "no")
    assert f"precision: {'bf16' if native else 'fp32'} (auto: " in capsys.readouterr().err
    assert common.precision_name(accelerator) == ("bf16" if native else "fp32")


def test_bench_data_times_the_training_loader_itself(tmp_path):
    """bench_data's per-image worker cost is measured in a worker of the training scripts' loader:
    TimedStream is hvp_run.BatchStream with only the worker's CPU clock added to each batch, over a
    parquet file of the JPEGs in row groups of one batch."""
    groups = bench_data.crop_sets()["SimSiam 2x224"]
    path = bench_data.write_parquet(bench_data.synthetic_jpegs(3, height=48, width=64), 8, 2, tmp_path / "x.parquet")
    source = hvp_run.open_source(str(path), "train")
    assert source.kind == "parquet" and [p[2] for p in source.pieces] == [2, 2, 2, 2]
    transform = hvp.MultiViewTransform(groups, crops="device")
    real = list(hvp_run.BatchStream(source, transform, 2, batches=4, shuffle_buffer=2))
    timed = list(bench_data.TimedStream(source, transform, 2, batches=4, shuffle_buffer=2))
    assert len(real) == len(timed) == 4
    for plain, marked in zip(real, timed):
        assert set(marked) == set(plain) | {"worker_cpu_s"}
        assert all(torch.equal(plain[k], marked[k]) for k in plain if isinstance(plain[k], torch.Tensor))
    marks = [float(b["worker_cpu_s"]) for b in timed]
    assert marks == sorted(marks)  # a process CPU clock
    ms = bench_data.loader_worker_ms(source, groups, "device", 2, 2)  # one loader worker, 2 measured batches
    assert math.isfinite(ms) and ms > 0


def test_a_bench_still_runs_as_a_script():
    result = subprocess.run([sys.executable, "bench/bench_dino.py", "--help"], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--hvp_select_res" in result.stdout and "--gpu" in result.stdout


class NoAccelerator:
    def autocast(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize("res", [1.0, 0.5])
def test_replayed_outputs_give_the_selection_of_the_real_forward(res):
    """The benches time the scoring by calling select_hard_views again with common.Replay standing in
    for the models and placeholders for the views: it must choose exactly what the real call chose."""
    torch.manual_seed(0)
    B, G, L_loader, L = 3, 4, 4, 2
    base = dict(arch="test_vit", small_stem=True, image_size=16, local_size=8, out_dim=64, patch_out_dim=64,
                hidden_dim=64, bottleneck_dim=32, global_views=G, local_views=L_loader, local_crops_number=L,
                hvp_select_res=res)
    g, l = torch.randn(B, G, 3, 16, 16), torch.randn(B, L_loader, 3, 8, 8)

    dino_cfg = replace(td.Config(), **{k: v for k, v in base.items() if k != "patch_out_dim"})
    student, teacher = td.build_model(dino_cfg, 0.0), td.build_model(dino_cfg, 0.0)
    center = 0.1 * torch.randn(64)
    real = td.select_hard_views(student, teacher, g, l, center, 0.04, dino_cfg, NoAccelerator(), 4)
    students, teachers = common.Replay(student), common.Replay(teacher)
    td.select_hard_views(students, teachers, g, l, center, 0.04, dino_cfg, NoAccelerator(), 4)
    students.replay(), teachers.replay()
    again = td.select_hard_views(students, teachers, common.placeholder(g), common.placeholder(l), center, 0.04,
                                 dino_cfg, NoAccelerator(), 4)
    for key in ("globals", "locals", "score", "plain_score"):
        assert torch.equal(real[key], again[key]), key

    ibot_cfg = replace(ti.Config(), **base)
    student, teacher = ti.build_model(ibot_cfg, 0.0), ti.build_teacher(ibot_cfg)
    ti.copy_student_into(teacher, student)
    masks = ti.block_masks([0.3] * B * G, 4, 4, ibot_cfg.pred_aspect, torch.Generator().manual_seed(0)).view(B, G, 4, 4)
    centers, temps = (0.1 * torch.randn(64), 0.1 * torch.randn(64)), (0.04, 0.07)
    real = ti.select_hard_views(student, teacher, g, masks, l, centers, temps, ibot_cfg, NoAccelerator(), 4)
    students, teachers = common.Replay(student), common.Replay(teacher)
    ti.select_hard_views(students, teachers, g, masks, l, centers, temps, ibot_cfg, NoAccelerator(), 4)
    students.replay(), teachers.replay()
    size = 16 if res == 1 else 8
    small_masks = ti.resize_masks(masks, (size // 4, size // 4))
    again = ti.select_hard_views(students, teachers, common.placeholder(g), small_masks, common.placeholder(l), centers,
                                 temps, ibot_cfg, NoAccelerator(), 4)
    for key in ("globals", "locals", "score", "plain_score"):
        assert torch.equal(real[key], again[key]), key


def test_bench_cpu_threads_times_each_rule_on_the_real_script(tmp_path):
    """A few steps of the main job under each thread rule, in processes of their own (the rule
    itself is tested in test_lifecycle.py; here: the bench runs the script and reads its metrics)."""
    output = tmp_path / "threads.md"
    result = subprocess.run([sys.executable, "bench/bench_cpu_threads.py", "--steps", "10", "--skip", "0", "--rounds",
                             "1", "--output", str(output)], cwd=REPO, env=script_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line.split(" | ") for line in output.read_text().splitlines()
            if line.startswith(("| auto", "| 1 thread", "| all"))]
    assert [row[0] for row in rows] == ["| auto", "| 1 thread", "| all cores"]
    assert all(float(row[1]) > 0 and float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
    assert rows[0][5] == "1.00 |"
