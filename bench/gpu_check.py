"""One prepared, time-boxed check of the training scripts on a CUDA machine, with one Markdown report.

    python bench/gpu_check.py --output_dir bench/gpu-report                # on the GPU machine (<= 7.5 min)
    python bench/gpu_check.py --output_dir X --parts benches train_fp16_plain   # a second run: what the first skipped
    python bench/gpu_check.py --dry_run --output_dir /tmp/gpu-dry          # CPU, tiny sizes (tests/test_gpu_check.py)

What it does, in this order, each part time-boxed against --budget_s (a part or run that no longer
fits is skipped with a note; a child process past its share is killed), rewriting
<output_dir>/report.md and summary.json after every item, so a check stopped from outside still
leaves a report:

  environment   machine, GPU, driver, CUDA, versions; the project's imports (a missing `datasets`
                is installed from --wheels when carried, else replaced by a stand-in: see below)
  dataset       a parquet split of synthetic 500 x 375 JPEGs (bench_data.synthetic_jpegs) with labels
  train_bf16    the four training scripts as real subprocesses of their CLI (python train_X.py ...),
                HVP and plain, at ImageNet sizes: ResNet-50 224 px N = 4 vs 2 views (SimSiam, SimCLR),
                ViT-S/16 224/96 px G = 4 globals + L_loader = 16 locals -> 2 + 10 vs 2 + 10 (DINO, iBOT);
                images/s, step time and the synchronised select_s + train_s from metrics.jsonl,
                peak torch.cuda.max_memory_allocated, loss finiteness, HVP / plain ratios
  train_fp16    the HVP runs in fp16, each with one injected overflow (the loss going into
                accelerator.backward multiplied by inf at one step): the GradScaler must skip that
                step (scale drops, parameters unchanged and finite) and training must go on
  loader        the DINO HVP crop set through the real loader (hvp_run.BatchStream + make_loader) with
                1, 4, 8 and 15 workers, crops in the workers vs on the device: images/s
  dino_crops    train_dino.py HVP with --crops worker vs the train_bf16 run (--crops device)
  benches       bench/bench_{simsiam,simclr,dino,ibot}.py with run_all.py's --gpu settings
  bench_data    bench/bench_data.py (per-image worker CPU of both crop paths, device-side cost)
  train_fp16_plain  the plain runs in fp16 (last: the first part the budget drops)

Each training run goes through this file's `_probe` mode: it imports the script as a module,
wraps accelerate.Accelerator.backward (the injected overflow) and AcceleratedOptimizer.step (scale
and skipped steps), then calls the script's main() with the command line it was given. The scripts
and hvp_run.Run are not changed: the timings, peak memory and k-NN come from what the run writes
itself (metrics.jsonl: startup_s, images_per_s, peak_mem_gib on CUDA, finish_s; config.json's "run"
entry: global batch, workers, crops, device; knn.json).

`datasets`: hvp_run.open_source imports it only for Hub ids, image folders and CSV/JSON files; a
parquet file (what this check trains on) needs pyarrow alone. Where it is missing and no wheels are carried,
the children also get a stand-in module named `datasets` (a folder put first on PYTHONPATH), so
that an import of it elsewhere fails with a clear message (every attribute raises); the report
says so. `python bench/gpu_wheels.py` downloads wheels of the real one.

--dry_run: the same parts on the CPU at tiny sizes (timm's test_resnet / test_vit, 32/16 px, a
few steps, 1-2 loader workers, fp32 only); the fp16 parts are replaced by an explanation, and the
overflow machinery is run as a control instead (fp32 has no GradScaler, so the injected step must
be seen applied and non-finite). It keeps this file working while no GPU is at hand.
"""
import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("simsiam", "simclr", "dino", "ibot")
PARTS = ("train_bf16", "train_fp16", "loader", "dino_crops", "benches", "bench_data", "detection", "train_fp16_plain")
MODULES = ("torch", "torchvision", "timm", "accelerate", "safetensors", "huggingface_hub", "datasets", "pyarrow",
           "PIL", "numpy", "fsspec", "tqdm", "tensorboard", "pytest")
DISTRIBUTIONS = {"PIL": "pillow", "huggingface_hub": "huggingface-hub"}
PROJECT_MODULES = ("hvp_utils", "hvp_run", "train_simsiam", "train_simclr", "train_dino", "train_ibot", "bench.common",
                   "bench.bench_simsiam", "bench.bench_simclr", "bench.bench_dino", "bench.bench_ibot", "bench.bench_data")
REQUIRED = ("torch", "torchvision", "timm", "accelerate", "safetensors", "huggingface_hub", "pyarrow", "PIL", "numpy",
            "fsspec", "tqdm")


# ----------------------------------------------------------------------------------- settings

@dataclasses.dataclass
class Settings:
    """Sizes of one mode (GPU or dry run). est_* are the first guesses of a part's wall time (s),
    replaced by what the check measures as it goes; cap_* bound one child process."""
    rows: int
    unique: int
    height: int
    width: int
    row_group: int
    steps: int          # --max_steps of every training run (one record per step: --log_every 1)
    warmup: int         # first steps left out of the medians (cuDNN autotuning, allocator, loader start)
    inject_step: int    # the fp16 runs' overflow step
    batch: int
    workers: int        # --num_workers of the training runs (-1: the scripts' default, cores - 1)
    precisions: tuple
    model_flags: dict
    views: dict         # script -> (HVP flags, plain flags, label HVP, label plain)
    loader_workers: tuple
    loader_batch: int
    loader_seconds: float
    loader_views: tuple  # (image_size, local_size, G, L_loader)
    bench_flags: dict
    bench_data_flags: list
    extra_flags: list   # every training run
    est_train: float
    cap_train: float
    est_bench: float
    cap_bench: float
    est_loader: float
    est_bench_data: float
    detection: dict     # eval/detection.py: shapes set (images, size), backbones {label: create_backbone args}, flags
    est_detection: float


VIT_VIEWS_GPU = (["--global_views", "4", "--local_views", "16", "--local_crops_number", "10"],
                 ["--global_views", "2", "--local_views", "10", "--local_crops_number", "10"],
                 "G=4, L_loader=16 -> 2+10", "2+10")
VIT_VIEWS_DRY = (["--global_views", "4", "--local_views", "4", "--local_crops_number", "2"],
                 ["--global_views", "2", "--local_views", "2", "--local_crops_number", "2"],
                 "G=4, L_loader=4 -> 2+2", "2+2")
PAIR_VIEWS = (["--num_views", "4"], ["--num_views", "2"], "N=4", "N=2")


def gpu_settings():
    sys.path.insert(0, str(REPO))
    from bench import run_all  # the --gpu flags run_all.py uses, so both stay the same
    resnet = ["--arch", "resnet50", "--image_size", "224"]
    vit = ["--arch", "vit_small", "--image_size", "224", "--local_size", "96", "--freeze_last_layer", "0"]
    return Settings(
        rows=4096, unique=64, height=375, width=500, row_group=128, steps=24, warmup=6, inject_step=10, batch=64,
        workers=-1, precisions=("bf16", "fp16"),
        model_flags={"simsiam": resnet, "simclr": resnet, "dino": vit, "ibot": vit},
        views={"simsiam": PAIR_VIEWS, "simclr": PAIR_VIEWS, "dino": VIT_VIEWS_GPU, "ibot": VIT_VIEWS_GPU},
        loader_workers=(1, 4, 8, 15), loader_batch=32, loader_seconds=3.0, loader_views=(224, 96, 4, 16),
        bench_flags={name: list(run_all.SETTINGS[name][1]) + ["--gpu"] for name in SCRIPTS},
        bench_data_flags=["--images", "16", "--repeats", "2", "--device", "cuda", "--loader", "--image_size", "224",
                          "--views", "4", "--workers", "1", "4", "8", "15", "--crops", "worker", "device",
                          "--batch_size", "64", "--batches", "8"],
        extra_flags=[], est_train=30, cap_train=150, est_bench=45, cap_bench=150, est_loader=80, est_bench_data=90,
        detection=dict(images=32, size=320, backbones={"resnet50": ("resnet50", 224, {}),
                                                       "vit_small": ("vit_small", 224, {"pos_embed_resample": "dino"})},
                       flags=["--max_iter", "40", "--batch_size", "4", "--min_size", "320", "--max_size", "480",
                              "--test_min_size", "320", "--num_workers", "4"]),
        est_detection=60)


def dry_settings():
    resnet = ["--arch", "test_resnet", "--image_size", "32"]
    vit = ["--arch", "test_vit", "--patch_size", "8", "--image_size", "32", "--local_size", "16", "--out_dim", "64",
           "--hidden_dim", "64", "--bottleneck_dim", "32", "--freeze_last_layer", "0"]
    quick = ["--steps", "1", "--warmup", "0", "--mixed_precision", "no", "--threads", "1", "--device", "cpu"]
    bench_resnet = ["--arch", "test_resnet", "--image_size", "16", "--batch_size", "8"]
    bench_vit = ["--arch", "test_vit", "--small_stem", "--image_size", "16", "--local_size", "8", "--batch_size", "4",
                 "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32", "--global_views", "4",
                 "--local_crops_number", "2"]
    return Settings(
        rows=64, unique=16, height=60, width=80, row_group=16, steps=3, warmup=1, inject_step=2, batch=8, workers=1,
        precisions=("no",),
        model_flags={"simsiam": resnet + ["--proj_dim", "64", "--pred_dim", "16"],
                     "simclr": resnet + ["--proj_hidden_dim", "64", "--proj_dim", "16"],
                     "dino": vit, "ibot": vit + ["--patch_out_dim", "64"]},
        views={"simsiam": PAIR_VIEWS, "simclr": PAIR_VIEWS, "dino": VIT_VIEWS_DRY, "ibot": VIT_VIEWS_DRY},
        loader_workers=(1, 2), loader_batch=8, loader_seconds=0.5, loader_views=(32, 16, 4, 4),
        bench_flags={"simsiam": bench_resnet + ["--proj_dim", "64", "--pred_dim", "16"] + quick,
                     "simclr": bench_resnet + ["--proj_hidden_dim", "64", "--proj_dim", "16"] + quick,
                     "dino": bench_vit + quick, "ibot": bench_vit + quick},
        bench_data_flags=["--images", "1", "--repeats", "1", "--device_repeats", "1", "--device", "cpu",
                          "--device_batch", "2", "--sets", "SimSiam", "--loader", "--image_size", "32", "--views", "2",
                          "--workers", "1", "2", "--crops", "worker", "device", "--batch_size", "8", "--batches", "2"],
        extra_flags=["--report_to", "none"], est_train=12, cap_train=90, est_bench=30, cap_bench=120, est_loader=20,
        est_bench_data=20,
        detection=dict(images=4, size=64, backbones={"resnet18": ("resnet18", 64, {}),
                                                     "vit_tiny": ("vit_tiny", 32, {"depth": 2, "embed_dim": 32,
                                                                                  "num_heads": 2})},
                       flags=["--max_iter", "2", "--batch_size", "2", "--min_size", "64", "--max_size", "96",
                              "--test_min_size", "64", "--fpn_channels", "32", "--detections_per_image", "5",
                              "--num_workers", "0"]),
        est_detection=15)


# ----------------------------------------------------------------------------------- small helpers

def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    os.replace(tmp, path)


def clean(obj):
    """JSON-safe copy: non-finite floats become the strings 'nan', 'inf', '-inf'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def fmt(value, digits=1, unit=""):
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{unit}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def tail(path, lines=25):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# ----------------------------------------------------------------------------------- child modes

def probe_main(argv):
    """_probe RECORD INJECT_STEP SCRIPT ARGS...: run SCRIPT's main() with ARGS, recording the
    optimizer steps (scale, skipped), the peak RSS and, with INJECT_STEP > 0, an overflow at that
    step (the loss given to accelerator.backward times inf) with what the optimizer step did."""
    record_path, inject, script, args = Path(argv[0]), int(argv[1]), argv[2], argv[3:]
    t0 = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import resource

    import accelerate
    import torch
    from accelerate.optimizer import AcceleratedOptimizer

    import hvp_run
    cuda = torch.cuda.is_available()
    rec = {"script": script, "argv": args, "inject_step": inject, "steps": [], "times": {}}
    rec["times"]["imports"] = time.perf_counter() - t0
    calls = {"backward": 0, "step": 0}
    kept = {}

    def save():
        write_json(record_path, rec)

    real_backward = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        calls["backward"] += 1
        if inject and calls["backward"] == inject:
            rec["injected"] = {"backward_call": calls["backward"], "loss": float(loss.detach().float())}
            loss = loss * float("inf")
        return real_backward(self, loss, **kwargs)

    real_step = AcceleratedOptimizer.step

    def step(self, closure=None):
        calls["step"] += 1
        n, scaler = calls["step"], self.scaler
        injected = inject and n == inject
        if injected:
            if cuda:  # the copy below is the check's, not the run's: keep it out of the peak
                rec["peak_before_inject_mib"] = torch.cuda.max_memory_allocated() / 2**20
            params = [p for group in self.param_groups for p in group["params"]]
            before = [p.detach().clone() for p in params]
            grads_bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
            scale_before = scaler.get_scale() if scaler is not None else None
        out = real_step(self, closure)
        entry = {"step": n}
        if scaler is not None:
            entry.update(scale=float(scaler.get_scale()), skipped=bool(self.step_was_skipped))
        rec["steps"].append(entry)
        if injected:
            rec["overflow"] = {
                "step": n, "scaler": scaler is not None, "grads_nonfinite": grads_bad, "scale_before": scale_before,
                "scale_after": entry.get("scale"), "skipped": entry.get("skipped", False),
                "params_unchanged": all(torch.equal(a, p.detach()) for a, p in zip(before, params)),
                "params_finite": all(bool(torch.isfinite(p).all()) for p in params)}
            # what the end of the run compares with (a sum per parameter, not a second copy of the model)
            kept["params"], kept["sums"] = params, [p.detach().double().sum() for p in params]
            del before
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            save()
        return out

    accelerate.Accelerator.backward, AcceleratedOptimizer.step = backward, step
    sys.argv = [script, *args]
    module = importlib.import_module(Path(script).stem)
    try:
        hvp_run.run_main(module.main)
    finally:
        rec["times"]["end"] = time.perf_counter() - t0
        rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if "sums" in kept:  # did training go on after the injected step?
            rec["overflow"]["params_changed_after"] = any(bool(p.detach().double().sum() != total)
                                                          for total, p in zip(kept["sums"], kept["params"]))
            kept.clear()
        save()


def env_main(argv):
    """_env RECORD: versions, machine, CUDA and the project's imports, as JSON."""
    sys.path.insert(0, str(REPO))
    import importlib.metadata as md
    info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "modules": {}, "project_imports": {}}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is a finding
            info["modules"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            continue
        try:
            version = md.version(DISTRIBUTIONS.get(name, name))
        except md.PackageNotFoundError:
            version = getattr(module, "__version__", "?")
        info["modules"][name] = {"version": version, "file": str(getattr(module, "__file__", ""))}
    for name in PROJECT_MODULES:
        try:
            importlib.import_module(name)
            info["project_imports"][name] = "ok"
        except Exception as e:  # noqa: BLE001
            info["project_imports"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu_name=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                        multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                        bf16_supported=torch.cuda.is_bf16_supported())
    except Exception as e:  # noqa: BLE001
        info["cuda_error"] = f"{type(e).__name__}: {e}"
    write_json(argv[0], info)


def loader_main(argv):
    """_loader RECORD DATASET BATCH SECONDS IMAGE LOCAL G L_LOADER CROPS,... WORKERS,...: images/s
    of DINO's multi-crop transform through hvp_run.BatchStream + hvp_run.make_loader, per (crops, workers)."""
    record_path, dataset = Path(argv[0]), argv[1]
    batch, seconds = int(argv[2]), float(argv[3])
    image_size, local_size, G, L_loader = map(int, argv[4:8])
    crops_list, workers_list = argv[8].split(","), [int(w) for w in argv[9].split(",")]
    sys.path.insert(0, str(REPO))
    import torch

    import hvp_utils as hvp
    import hvp_run
    import train_dino as td
    cfg = dataclasses.replace(td.Config(), image_size=image_size, local_size=local_size, global_views=G,
                              local_views=L_loader, local_crops_number=min(L_loader, 10))
    source = hvp_run.open_source(dataset, "train")
    batches = source.num_rows // batch
    pin = torch.cuda.is_available()
    out = {"rows": source.num_rows, "batch": batch, "views_per_image": G + L_loader, "pin_memory": pin, "results": []}
    for crops in crops_list:
        transform = hvp.multicrop_transform(cfg, crops)
        for workers in workers_list:
            stream = hvp_run.BatchStream(source, transform, batch, epoch=len(out["results"]), seed=0, batches=batches)
            loader = hvp_run.make_loader(stream, workers, pin_memory=pin)
            start = time.perf_counter()
            it = iter(loader)
            next(it)
            first = time.perf_counter() - start
            drain = min(2 * workers, batches // 2)  # what the workers prefetched (prefetch_factor 2) while starting
            for _ in range(drain - 1):
                next(it)
            # timed: until --seconds, or until the last round, where workers run out of batches one by one
            t1, n, limit = time.perf_counter(), 0, max(1, batches - drain - workers)
            while n < limit and time.perf_counter() - t1 < seconds:
                next(it)
                n += 1
            elapsed = time.perf_counter() - t1
            del it, loader
            rate = n * batch / elapsed if n else None
            out["results"].append({"crops": crops, "workers": workers, "first_batch_s": first, "batches": n,
                                   "images_per_s": rate, "views_per_s": rate and rate * (G + L_loader),
                                   "images_per_s_per_worker": rate and rate / workers})
            write_json(record_path, out)


def benches_main(argv):
    """_benches OUTDIR NAME...: bench_<NAME>.main(flags) in this process, flags from the JSON in
    OUTDIR/flags.json; each summary is written by the bench next to OUTDIR/<NAME>.md."""
    out_dir = Path(argv[0])
    flags = json.loads((out_dir / "flags.json").read_text())
    sys.path.insert(0, str(REPO))
    for name in argv[1:]:
        module = importlib.import_module(f"bench.bench_{name}")
        module.main([*flags[name], "--output", str(out_dir / f"{name}.md")])


CHILD_MODES = {"_probe": probe_main, "_env": env_main, "_loader": loader_main, "_benches": benches_main}


# ----------------------------------------------------------------------------------- the check

class Skip(Exception):
    """An item that does not fit the remaining budget."""


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.s = dry_settings() if self.dry else gpu_settings()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s - 5  # 5 s for the last report
        self.out = Path(args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="hvp-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("")
        self.child = None
        self.observed = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.pythonpath = [str(REPO)]
        if self.dry:
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.summary = {
            "mode": "dry_run" if self.dry else "gpu", "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s, "elapsed_s": 0.0,
            "finished": False, "settings": clean(dataclasses.asdict(self.s)), "machine": {}, "imports": {},
            "dataset": {}, "train": [], "ratios": [], "overflow": [], "dino_crops": {}, "loader": {}, "benches": {},
            "bench_data": {}, "parts": {}, "skipped": []}

    # --- time and children

    def left(self):
        return self.deadline - time.monotonic()

    def estimate(self, kind, default):
        return max(self.observed.get(kind, [default]))

    def need(self, what, kind, default):
        est = self.estimate(kind, default)
        if self.left() < est:
            raise Skip(f"{what}: skipped, {max(0, self.left()):.0f} s of the budget left, it needs ~{est:.0f} s")

    def note_time(self, kind, seconds):
        self.observed.setdefault(kind, []).append(seconds * 1.1)

    def log(self, text):
        with open(self.log_path, "a") as f:
            f.write(text.rstrip() + "\n")
        print(text, flush=True)

    def run_child(self, cmd, name, cap):
        """Run cmd in its own session; kill the whole group past min(cap, budget left). Returns
        (exit code or None when killed, wall seconds, log path)."""
        timeout = max(1.0, min(cap, self.left()))
        log = self.work / f"{name}.log"
        env = dict(self.env, PYTHONPATH=os.pathsep.join(self.pythonpath + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.log(f"$ {' '.join(map(str, cmd))}   (limit {timeout:.0f} s)")
        start = time.monotonic()
        with open(log, "w") as f:
            self.child = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            try:
                rc = self.child.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_child()
                rc = None
            finally:
                self.child = None
        wall = time.monotonic() - start
        status = "killed at its time limit" if rc is None else f"exit {rc}"
        self.log(f"  {status}, {wall:.1f} s")
        if rc != 0:
            self.log("  | " + tail(log, 30).replace("\n", "\n  | "))
        return rc, wall, log

    def kill_child(self):
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.child.wait()

    def me(self, mode, *args):
        return [sys.executable, Path(__file__).resolve(), mode, *args]

    # --- parts

    def part(self, name, fn):
        """Run one part: its status and wall time go into the summary; the report is rewritten."""
        if name in self.summary["parts"]:
            return
        start = time.monotonic()
        entry = {"status": "ok", "note": ""}
        self.summary["parts"][name] = entry
        try:
            note = fn()
            if note:
                entry["note"] = note
        except Skip as e:
            entry.update(status="skipped", note=str(e))
        except Exception as e:  # noqa: BLE001 - a broken part must not stop the others
            entry.update(status="failed", note=f"{type(e).__name__}: {e}")
            self.log(f"part {name} failed: {type(e).__name__}: {e}")
        entry["wall_s"] = time.monotonic() - start
        skipped = [s for s in self.summary["skipped"] if s["part"] == name]
        if entry["status"] == "ok" and skipped:
            entry["status"] = "partial"
        self.write()

    def skip_item(self, part, item, reason):
        self.summary["skipped"].append({"part": part, "item": item, "reason": reason})
        self.log(f"skipped {part} / {item}: {reason}")
        self.write()

    def environment(self):
        rc, wall, log = self.run_child(self.me("_env", self.work / "env.json"), "env", 120)
        if rc != 0:
            raise RuntimeError(f"the environment probe failed: {tail(log, 5)}")
        info = json.loads((self.work / "env.json").read_text())
        missing = [m for m, v in info["modules"].items() if "error" in v]
        imports = {"missing_before": missing, "installed": [], "wheels": str(self.args.wheels), "datasets": "installed"}
        if missing:
            self.install_wheels(imports)
        if "datasets" in missing and "datasets" not in imports.get("now_importable", []):
            stub = self.work / "stub" / "datasets"
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "__init__.py").write_text(STUB)
            self.pythonpath.append(str(stub.parent))
            imports["datasets"] = ("stand-in (no importable `datasets` here, none carried or the carried one failed: "
                                   "hvp_run.open_source does not import it for a parquet file; any use raises)")
        elif "datasets" in missing:
            imports["datasets"] = "installed from the carried wheels"
        if missing == ["datasets"] and imports["datasets"].startswith("stand-in"):
            # the project modules were imported above without it (hvp_run imports `datasets` lazily)
            info["modules"]["datasets"] = {"version": "absent (gpu_check stand-in)", "file": str(stub / "__init__.py")}
        elif missing:  # again, with what was installed
            rc, wall, log = self.run_child(self.me("_env", self.work / "env.json"), "env2", 120)
            info = json.loads((self.work / "env.json").read_text())
        info["nvidia_smi"] = nvidia_smi()
        info["cpu"] = cpu_model()
        info["cores"] = os.cpu_count()
        info["cores_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        info["memory_gib"] = mem_total_gib()
        info["hostname"] = platform.node()
        self.summary["machine"] = info
        imports["still_missing"] = [m for m, v in info["modules"].items() if "error" in v]
        imports["project_imports"] = info["project_imports"]
        self.summary["imports"] = imports
        bad = [m for m in REQUIRED if m in imports["still_missing"]]
        broken = {m: e for m, e in info["project_imports"].items() if e != "ok"}
        if bad or broken:
            raise RuntimeError(f"missing {bad}, project imports failing {broken}")
        if not self.dry and not info.get("cuda_available"):
            raise RuntimeError("torch sees no CUDA device here: run with --dry_run on a CPU machine")

    def install_wheels(self, imports):
        wheels = sorted(Path(self.args.wheels).glob("*.whl")) if self.args.wheels else []
        if not wheels:
            imports["wheel_note"] = f"no wheels in {self.args.wheels}"
            return
        site = self.work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", site, *wheels]
        rc, wall, log = self.run_child(cmd, "pip", 120)
        if rc != 0:
            imports["wheel_note"] = f"pip install of the wheels failed: {tail(log, 3)}"
            return
        imports["installed"] = [w.name for w in wheels]
        self.pythonpath.insert(1, str(site))
        check = [sys.executable, "-c", "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)",
                 *imports["missing_before"]]
        rc, _, log = self.run_child(check, "pip-check", 60)
        if rc == 0:
            imports["now_importable"] = list(imports["missing_before"])
        else:  # not used then: a stand-in replaces a `datasets` that cannot be imported
            imports["wheel_note"] = f"installed, but an import still fails, so not used: {tail(log, 2)}"
            imports["now_importable"] = []
            self.pythonpath.remove(str(site))

    def dataset(self):
        sys.path.insert(0, str(REPO))
        import pyarrow as pa
        import pyarrow.parquet as pq

        from bench.bench_data import synthetic_jpegs
        s = self.s
        start = time.monotonic()
        jpegs = synthetic_jpegs(s.unique, s.height, s.width, seed=0)
        cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        images = pa.array([{"bytes": jpegs[i % s.unique], "path": f"{i % s.unique:05d}.jpg"} for i in range(s.rows)], cell)
        labels = pa.array([i % s.unique % 10 for i in range(s.rows)], pa.int64())
        folder = self.work / "data"  # the Hub layout: a train split and a test split (the k-NN queries)
        path, test = folder / "data" / "train-00000-of-00001.parquet", folder / "data" / "test-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"image": images, "label": labels})
        pq.write_table(table, path, row_group_size=s.row_group)
        pq.write_table(table.slice(0, s.unique), test, row_group_size=s.row_group)  # each distinct image once
        self.dataset_path = folder
        self.summary["dataset"] = {
            "path": str(path), "rows": s.rows, "unique_images": s.unique, "size": f"{s.width} x {s.height}",
            "row_group": s.row_group, "jpeg_kib_mean": sum(map(len, jpegs)) / len(jpegs) / 1024,
            "file_mib": path.stat().st_size / 2**20, "seconds": time.monotonic() - start,
            "labels": "unique image index % 10 (rows repeat the unique images; the test split holds each once)"}

    # --- training runs

    def train_run(self, part, script, kind, precision, inject=0, crops="device", first=False):
        s = self.s
        hvp_flags, plain_flags, hvp_label, plain_label = s.views[script]
        name = f"{script}-{kind}-{precision}" + (f"-{crops}" if crops != "device" else "") + ("-inject" if inject else "")
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        flags = [*s.model_flags[script], *(hvp_flags if kind == "hvp" else plain_flags),
                 "--dataset", self.dataset_path, "--output_dir", out, "--batch_size", s.batch,
                 "--max_steps", s.steps, "--log_every", 1, "--num_workers", s.workers, "--crops", crops,
                 "--mixed_precision", precision, "--seed", 0, *s.extra_flags]
        if not first:  # the first run also does the final k-NN and writes TensorBoard logs
            flags += ["--eval_split", "", "--report_to", "none"]
        est_kind = f"train:{script}"
        try:
            self.need(name, est_kind, s.est_train * (1.5 if first else 1))
        except Skip as e:
            self.skip_item(part, name, str(e))
            return None
        record = self.work / f"{name}.probe.json"
        record.unlink(missing_ok=True)
        cmd = self.me("_probe", record, inject, f"train_{script}.py", *flags)
        rc, wall, log = self.run_child(cmd, name, s.cap_train)
        self.note_time(est_kind, wall)
        run = summarize_run(name, script, kind, hvp_label if kind == "hvp" else plain_label, precision, crops, inject,
                            rc, wall, out / "metrics.jsonl", record, log, s)
        run["command"] = " ".join(map(str, [f"python train_{script}.py", *flags]))
        run["first_run_extras"] = first
        self.summary["train"].append(run)
        if inject:
            control = precision != "fp16"
            if control and rc != 0:
                run["status"] += " (expected for the fp32 control: the next loss is non-finite)"
            self.summary["overflow"].append(overflow_verdict(run, control=control))
        self.summary["ratios"] = hvp_ratios(self.summary["train"])
        if not self.args.keep_work:
            shutil.rmtree(out, ignore_errors=True)
        self.write()
        return run

    def train_part(self, part, precision, kinds, inject=0, scripts=SCRIPTS):
        for script in scripts:
            for kind in kinds:
                first = part == "train_bf16" and script == scripts[0] and kind == kinds[0]
                self.train_run(part, script, kind, precision, inject=inject if kind == "hvp" else 0, first=first)

    def train_fp16(self):
        if self.dry:
            self.train_run("train_fp16", "simsiam", "hvp", "no", inject=self.s.inject_step)
            return ("dry run: fp16 (GradScaler) and bf16 autocast are CUDA parts; instead the overflow injection runs as "
                    "a control in fp32, where nothing skips the step, so the check must see it applied and non-finite "
                    "(and the run stop at the next logged loss)")
        self.train_part("train_fp16", "fp16", ("hvp",), inject=self.s.inject_step)

    def train_fp16_plain(self):
        if self.dry:
            return "dry run: fp16 is a CUDA part (no GradScaler on the CPU)"
        self.train_part("train_fp16_plain", "fp16", ("plain",))

    def dino_crops(self):
        precision = self.s.precisions[0]
        run = self.train_run("dino_crops", "dino", "hvp", precision, crops="worker")
        device = next((r for r in self.summary["train"] if r["script"] == "dino" and r["kind"] == "hvp"
                       and r["precision"] == precision and r["crops"] == "device" and not r["inject"]), None)
        if run is None:
            return None
        self.summary["dino_crops"] = {
            "precision": precision, "device": device and device["images_per_s"], "worker": run["images_per_s"],
            "device_over_worker": ratio(device and device["images_per_s"], run["images_per_s"]),
            "device_compute_ms": device and device["compute_ms"], "worker_compute_ms": run["compute_ms"]}
        return None

    # --- benches

    def loader(self):
        s = self.s
        self.need("loader", "loader", s.est_loader)
        record = self.work / "loader.json"
        record.unlink(missing_ok=True)
        cmd = self.me("_loader", record, self.dataset_path, s.loader_batch, s.loader_seconds, *s.loader_views,
                      "worker,device", ",".join(map(str, s.loader_workers)))
        rc, wall, log = self.run_child(cmd, "loader", max(s.est_loader * 2, 60))
        self.note_time("loader", wall)
        result = json.loads(record.read_text()) if record.exists() else {"results": []}
        result.update(exit=rc, wall_s=wall)
        self.summary["loader"] = result
        done = {(r["crops"], r["workers"]) for r in result["results"]}
        missing = [f"{c} x {w}" for c in ("worker", "device") for w in s.loader_workers if (c, w) not in done]
        if missing:
            self.skip_item("loader", ", ".join(missing), "not measured: " + (
                "the loader child was killed at its time limit" if rc is None else f"the loader child exited {rc}"))
        return None

    def benches(self):
        s = self.s
        out = self.work / "benches"
        out.mkdir(exist_ok=True)
        (out / "flags.json").write_text(json.dumps(s.bench_flags))
        groups = [list(SCRIPTS)] if self.dry else [[name] for name in SCRIPTS]  # GPU: a process each (run_all)
        for names in groups:
            label = "+".join(names)
            try:
                self.need(f"bench {label}", "bench", s.est_bench)
            except Skip as e:
                self.skip_item("benches", label, str(e))
                continue
            rc, wall, log = self.run_child(self.me("_benches", out, *names), f"bench-{label}", s.cap_bench)
            self.note_time("bench", wall / len(names) if self.dry else wall)
            for name in names:
                js = out / f"{name}.json"
                if js.exists():
                    summary = json.loads(js.read_text())
                    summary["table"] = (out / f"{name}.md").read_text()
                    summary["command"] = " ".join([f"python bench/bench_{name}.py", *s.bench_flags[name]])
                    self.summary["benches"][name] = summary
                else:
                    self.skip_item("benches", name, "no result: " + (
                        "killed at its time limit" if rc is None else f"exit {rc}: {tail(log, 3)}"))
            self.write()

    def bench_data(self):
        s = self.s
        self.need("bench_data", "bench_data", s.est_bench_data)
        md = self.work / "bench_data.md"
        flags = [*s.bench_data_flags, *(["--dataset", self.dataset_path] if "--loader" in s.bench_data_flags else [])]
        cmd = [sys.executable, REPO / "bench" / "bench_data.py", *flags, "--output", md]
        rc, wall, log = self.run_child(cmd, "bench_data", max(2 * s.est_bench_data, 60))
        self.note_time("bench_data", wall)
        if rc != 0 or not md.exists():
            raise RuntimeError("killed at its time limit" if rc is None else f"exit {rc}: {tail(log, 3)}")
        result = json.loads(md.with_suffix(".json").read_text())
        self.summary["bench_data"] = {"command": " ".join(map(str, ["python bench/bench_data.py", *flags])),
                                      "table": md.read_text(), "results": result.get("results", {}),
                                      "machine": result.get("machine"), "wall_s": wall}
        return ("bench_data.py's first tables are per-image CPU time in one process (images/s per core, no worker "
                "count); its --loader table takes the worker counts (--workers) and both crop paths (--crops), on "
                "the synthetic split with its generic N-view recipe; the loader part above does the same for "
                "DINO's HVP crop set")

    def detection(self):
        """eval/detection.py end to end on the generated shapes set: a ResNet through the FPN and a ViT
        through the simple feature pyramid, each exported untrained (the check is that it runs and
        COCOeval scores it, not the AP)."""
        sys.path.insert(0, str(REPO))
        import torch

        import hvp_run
        from eval.detection import write_shapes_dataset
        s, d = self.s, self.s.detection
        shapes = write_shapes_dataset(self.work / "shapes", d["images"], d["size"])
        data = ["--train_images", shapes / "images", "--train_annotations", shapes / "instances.json",
                "--val_images", shapes / "images", "--val_annotations", shapes / "instances.json"]
        precision = self.s.precisions[0]
        self.summary["detection"] = {}
        for label, (arch, size, kwargs) in d["backbones"].items():
            self.need(f"detection {label}", "detection", s.est_detection)
            torch.manual_seed(0)
            export = hvp_run.export_backbone(hvp_run.create_backbone(arch, size, **kwargs).eval(),
                                             self.work / f"det-{label}", {"input_size": (3, size, size)}, "gpu_check")
            out = self.work / f"detection-{label}.json"
            cmd = [sys.executable, REPO / "eval" / "detection.py", "--backbone", export, *data, *d["flags"],
                   "--mixed_precision", precision, "--output", out]
            rc, wall, log = self.run_child(cmd, f"detection-{label}", max(4 * s.est_detection, 60))
            self.note_time("detection", wall)
            if rc != 0 or not out.exists():
                self.skip_item("detection", label, "killed at its time limit" if rc is None
                               else f"exit {rc}: {tail(log, 3)}")
                continue
            result = json.loads(out.read_text())
            self.summary["detection"][label] = {
                "command": " ".join(map(str, ["python eval/detection.py", "--backbone", f"<untrained {arch}>",
                                              *d["flags"], "--mixed_precision", precision])),
                "protocol": result["protocol"], "box_ap": result["box_ap"]["AP"], "mask_ap": result["mask_ap"]["AP"],
                "loss_first": result["losses"][0]["loss"] if result["losses"] else None,
                "loss_last": result["losses"][-1]["loss"] if result["losses"] else None,
                "seconds": result["seconds"], "wall_s": wall}
            self.write()
        if not self.summary["detection"]:
            raise RuntimeError("no detection run finished")

    # --- all of it

    def run(self):
        self.part("environment", self.environment)
        if self.summary["parts"]["environment"]["status"] != "ok":
            return self.finish()
        self.part("dataset", self.dataset)
        if self.summary["parts"]["dataset"]["status"] != "ok":
            return self.finish()
        precision = self.s.precisions[0]
        todo = {
            "train_bf16": lambda: self.train_part("train_bf16", precision, ("hvp", "plain")) or (
                "dry run: fp32 (--mixed_precision no); bf16 autocast is checked on the GPU" if self.dry else None),
            "train_fp16": self.train_fp16,
            "loader": self.loader,
            "dino_crops": self.dino_crops,
            "benches": self.benches,
            "bench_data": self.bench_data,
            "detection": self.detection,
            "train_fp16_plain": self.train_fp16_plain,
        }
        for name in PARTS:
            if name in self.args.parts and name not in self.args.skip:
                self.part(name, todo[name])
            else:
                self.summary["parts"][name] = {"status": "not asked", "note": "not in --parts", "wall_s": 0.0}
        return self.finish()

    def finish(self, interrupted=None):
        self.summary["finished"] = interrupted is None
        if interrupted:
            self.summary["interrupted"] = interrupted
        self.write()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        failed = [n for n, p in self.summary["parts"].items() if p["status"] == "failed"]
        self.log(f"wrote {self.out / 'report.md'} and {self.out / 'summary.json'}"
                 + (f"; failed parts: {', '.join(failed)}" if failed else ""))
        return 1 if failed or interrupted else 0

    def write(self):
        self.summary["elapsed_s"] = time.monotonic() - self.t0
        write_json(self.out / "summary.json", self.summary)
        tmp = self.out / "report.md.tmp"
        tmp.write_text(report(self.summary))
        os.replace(tmp, self.out / "report.md")


STUB = '''"""Stand-in for `datasets`, written by bench/gpu_check.py: the package is not installed on this
machine and no wheels were carried. hvp_run.open_source does not import `datasets` for a parquet
file, which is all the check trains on: any other use ends here with this message."""
__version__ = "absent (gpu_check stand-in)"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"`datasets` is not installed here (bench/gpu_check.py put a stand-in without {name!r}); "
                      "carry its wheels: python bench/gpu_wheels.py")
'''


# ----------------------------------------------------------------------------------- run summaries

def read_json(path):
    """The JSON object in `path`, or {} where it is missing or cut short."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def summarize_run(name, script, kind, views, precision, crops, inject, rc, wall, metrics, record, log, s):
    """One training run's numbers, from what the run wrote (metrics.jsonl, config.json, knn.json in
    its output folder) and what the probe recorded (optimizer steps, overflow, peak RSS)."""
    lines = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    records = [r for r in lines if "loss" in r]
    probe = read_json(record) if record.exists() else {}
    derived = read_json(metrics.parent / "config.json").get("run", {})
    measured = [r for r in records if r["step"] > s.warmup and r["step"] != inject]
    batch = derived.get("global_batch", s.batch)
    step_ms = [1e3 * batch / r["images_per_s"] for r in measured if r.get("images_per_s")]
    compute = [1e3 * (r["select_s"] + r["train_s"]) for r in measured if "select_s" in r]
    losses = [r["loss"] for r in records]
    # the loop: the steps after the first logged one (each record holds the time since the previous one)
    loop = [(b["step"] - a["step"]) * batch / b["images_per_s"] for a, b in zip(records, records[1:])
            if b.get("images_per_s")]
    peaks = [1024 * r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
    if peaks and probe.get("peak_before_inject_mib"):
        peaks.append(probe["peak_before_inject_mib"])
    startup = next((r["startup_s"] for r in records if "startup_s" in r), None)
    finish = next((r["finish_s"] for r in lines if "finish_s" in r), None)
    knn = read_json(metrics.parent / "knn.json") or None
    run = {
        "name": name, "script": script, "kind": kind, "views": views, "precision": precision, "crops": crops,
        "inject": inject, "exit": rc, "wall_s": wall, "status": "ok" if rc == 0 else (
            "killed at its time limit" if rc is None else f"exit {rc}"),
        "batch": batch, "num_workers": derived.get("num_workers"), "device": derived.get("device"),
        "steps_logged": len(records), "steps_measured": len(measured),
        "images_per_s": median([r.get("images_per_s") for r in measured]),
        "step_ms": median(step_ms), "compute_ms": median(compute),
        "select_ms": median([1e3 * r["select_s"] for r in measured if "select_s" in r]),
        "train_ms": median([1e3 * r["train_s"] for r in measured if "train_s" in r]),
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "peak_allocated_mib": max(peaks) if peaks else None, "peak_rss_mib": probe.get("peak_rss_mib"),
        "startup_s": startup, "loop_s": sum(loop) if loop else None, "finish_s": finish,
        "knn": knn, "optimizer_steps": probe.get("steps", []), "overflow": probe.get("overflow"),
        "injected": probe.get("injected"), "losses": losses,
    }
    run["skipped_steps"] = [e["step"] for e in run["optimizer_steps"] if e.get("skipped")]
    if rc != 0:
        run["error"] = tail(log, 12)
    return run


def overflow_verdict(run, control=False):
    o = run.get("overflow") or {}
    k = run["inject"]
    after = [v for i, v in enumerate(run["losses"], start=1) if i > k]
    v = {"script": run["script"], "precision": run["precision"], "step": k, "control": control,
         "injected": bool(run.get("injected")), "grads_nonfinite": o.get("grads_nonfinite"),
         "scale_before": o.get("scale_before"), "scale_after": o.get("scale_after"), "skipped": o.get("skipped"),
         "params_unchanged": o.get("params_unchanged"), "params_finite": o.get("params_finite"),
         "params_changed_after": o.get("params_changed_after"), "later_steps": len(after),
         "later_losses_finite": bool(after) and all(math.isfinite(x) for x in after),
         "natural_skips": [n for n in run["skipped_steps"] if n != k], "exit": run["exit"]}
    if control:  # fp32: nothing may skip the step; the check must see it applied
        v["ok"] = bool(v["injected"] and v["grads_nonfinite"] and not v["skipped"] and v["params_finite"] is False)
        v["verdict"] = ("control ok: without a GradScaler the injected step was applied and made the parameters "
                        "non-finite, and the check saw it" if v["ok"] else "control FAILED: the injection or its "
                        "detection did not work")
    else:
        v["ok"] = bool(v["injected"] and v["grads_nonfinite"] and v["skipped"] and v["params_unchanged"]
                       and v["params_finite"] and v["scale_after"] is not None and v["scale_before"] is not None
                       and v["scale_after"] < v["scale_before"] and run["exit"] == 0 and v["later_losses_finite"]
                       and v["params_changed_after"])
        v["verdict"] = "ok: step skipped, scale dropped, training went on" if v["ok"] else "NOT ok (see the row)"
    return v


def hvp_ratios(runs):
    out = []
    for hvp_run in runs:
        if hvp_run["kind"] != "hvp" or hvp_run["crops"] != "device":
            continue
        plain = next((r for r in runs if r["kind"] == "plain" and r["script"] == hvp_run["script"]
                      and r["precision"] == hvp_run["precision"]), None)
        if plain is None:
            continue
        if hvp_run["inject"] and any(r["kind"] == "hvp" and r["script"] == hvp_run["script"] and not r["inject"]
                                     and r["precision"] == hvp_run["precision"] for r in runs):
            continue
        out.append({"script": hvp_run["script"], "precision": hvp_run["precision"],
                    "views": f"{hvp_run['views']} vs {plain['views']}",
                    "step_time": ratio(hvp_run["step_ms"], plain["step_ms"]),
                    "compute": ratio(hvp_run["compute_ms"], plain["compute_ms"]),
                    "images_per_s_hvp": hvp_run["images_per_s"], "images_per_s_plain": plain["images_per_s"],
                    "peak_memory": ratio(hvp_run["peak_allocated_mib"], plain["peak_allocated_mib"])
                    if hvp_run["peak_allocated_mib"] else ratio(hvp_run["peak_rss_mib"], plain["peak_rss_mib"]),
                    "memory_kind": "max_memory_allocated" if hvp_run["peak_allocated_mib"] else "peak RSS (CPU)"})
    return out


# ----------------------------------------------------------------------------------- the report

def report(s):
    m, lines = s["machine"], []
    mode = "GPU" if s["mode"] == "gpu" else "dry run (CPU, tiny sizes: numbers say nothing about speed)"
    lines += ["# GPU check of the HVP training scripts", "",
              f"`{s['command']}`: {mode}; started {s['started']}, {s['elapsed_s']:.0f} s of a {s['budget_s']:.0f} s "
              f"budget{'' if s['finished'] else ' (not finished: this report is partial)'}.", ""]
    lines += ["## Machine", ""]
    if m:
        mods = m.get("modules", {})
        ver = {k: v.get("version", "missing") for k, v in mods.items()}
        rows = [("host", m.get("hostname")), ("CPU", f"{m.get('cpu')}, {m.get('cores')} cores "
                                                     f"({m.get('cores_usable')} usable), {fmt(m.get('memory_gib'))} GiB"),
                ("GPU", f"{m.get('gpu_name', 'none')}" + (f", {m['gpu_memory_gib']:.1f} GiB, compute capability "
                                                          f"{m['capability']}, {m['multiprocessors']} SMs"
                                                          if m.get("gpu_name") else "")),
                ("driver / nvidia-smi", m.get("nvidia_smi") or "n/a"),
                ("CUDA (torch) / cuDNN", f"{m.get('torch_cuda')} / {m.get('cudnn', 'n/a')}"),
                ("python", f"{m.get('python')} ({m.get('executable')})"),
                ("versions", ", ".join(f"{k} {v}" for k, v in ver.items()))]
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += ["## Imports", ""]
    imp = s.get("imports") or {}
    if imp:
        lines += [f"- missing at start: {', '.join(imp['missing_before']) or 'nothing'}",
                  f"- installed from {imp['wheels']}: {', '.join(imp['installed']) or 'nothing'}"
                  + (f" ({imp['wheel_note']})" if imp.get("wheel_note") else ""),
                  f"- `datasets`: {imp['datasets']}",
                  f"- still missing: {', '.join(imp.get('still_missing', [])) or 'nothing'}",
                  "- project modules: " + ", ".join(f"{k} {v}" for k, v in imp.get("project_imports", {}).items()), ""]
    lines += ["## Synthetic dataset", ""]
    d = s.get("dataset") or {}
    if d:
        lines += [f"{d['rows']} rows ({d['unique_images']} distinct synthetic JPEGs of {d['size']}, mean "
                  f"{d['jpeg_kib_mean']:.0f} KiB, quality 90; row groups of {d['row_group']}), {d['file_mib']:.0f} MiB "
                  f"of parquet, written in {d['seconds']:.1f} s. Labels: {d['labels']}.", ""]
    lines += ["## Training scripts", "",
              "Real subprocesses of each script's CLI (the exact commands are in summary.json), one record per step "
              "(--log_every 1). images/s and step time: metrics.jsonl's images_per_s (wall clock between steps, data "
              f"waits included); compute: its select_s + train_s (GPU synchronised); medians over the steps after the "
              f"first {s['settings']['warmup']} (and without an injected step). Peak memory: "
              "torch.cuda.max_memory_allocated over the whole run (CPU: peak RSS). Start / loop / finish: the run's "
              "own startup_s (process start to its first batch), the steps after the first, its finish_s (final "
              "checkpoint, k-NN, export). Every step is a logged one, so the "
              "HVP steps also compute their selection statistics. DINO and iBOT run with --freeze_last_layer 0 (every "
              "parameter trained, as after a real run's first epoch).", "",
              "| run | views | precision | crops | images/s | step ms | compute ms (select + train) | peak MiB "
              "| loss first -> last | finite | steps | start / loop / finish s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["train"]:
        peak = r["peak_allocated_mib"] if r["peak_allocated_mib"] is not None else r["peak_rss_mib"]
        lines.append(f"| {r['name']} | {r['views']} | {r['precision']} | {r['crops']} | {fmt(r['images_per_s'])} | "
                     f"{fmt(r['step_ms'])} | {fmt(r['compute_ms'])} ({fmt(r['select_ms'])} + {fmt(r['train_ms'])}) | "
                     f"{fmt(peak, 0)} | {fmt(r['loss_first'], 4)} -> {fmt(r['loss_last'], 4)} | "
                     f"{'yes' if r['losses_finite'] else 'NO'} | {r['steps_measured']}/{r['steps_logged']} | "
                     f"{fmt(r['startup_s'])} / {fmt(r['loop_s'])} / {fmt(r['finish_s'])} | {r['status']} |")
    knn = next((r for r in s["train"] if r.get("knn")), None)
    if knn:
        lines += ["", f"k-NN at the end of {knn['name']} (queries = the test split, the training images once each, "
                  f"so only a functional check): top-1 {fmt(knn['knn'].get('knn_top1'), 2)} %."]
    errors = [r for r in s["train"] if r.get("error")]
    for r in errors:
        lines += ["", f"{r['name']} ({r['status']}), last lines:", "", "```", r["error"], "```"]
    lines += ["", "## HVP / plain", ""]
    if s["ratios"]:
        lines += ["| script | precision | views | step time HVP / plain | compute HVP / plain | images/s HVP / plain "
                  "| peak memory HVP / plain |", "|---|---|---|---|---|---|---|"]
        for q in s["ratios"]:
            lines.append(f"| {q['script']} | {q['precision']} | {q['views']} | {fmt(q['step_time'], 2)} | "
                         f"{fmt(q['compute'], 2)} | {fmt(q['images_per_s_hvp'])} / {fmt(q['images_per_s_plain'])} | "
                         f"{fmt(q['peak_memory'], 2)} ({q['memory_kind']}) |")
    else:
        lines.append("No HVP / plain pair has run.")
    lines += ["", "## fp16 overflow injection", ""]
    part = s["parts"].get("train_fp16", {})
    if part.get("note"):
        lines += [part["note"] + ".", ""]
    if s["overflow"]:
        lines += ["Step k's loss given to accelerator.backward is multiplied by inf; the wrapped optimizer step "
                  "records the GradScaler's scale and whether the step was skipped, and compares every parameter "
                  "before and after it.", "",
                  "| script | precision | step | grads non-finite | scale before -> after | skipped | params unchanged "
                  "| params finite | updated later | later steps, losses finite | other skipped steps | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in s["overflow"]:
            lines.append(f"| {v['script']} | {v['precision']} | {v['step']} | {v['grads_nonfinite']} | "
                         f"{fmt(v['scale_before'], 0)} -> {fmt(v['scale_after'], 0)} | {v['skipped']} | "
                         f"{v['params_unchanged']} | {v['params_finite']} | {v['params_changed_after']} | "
                         f"{v['later_steps']}, {v['later_losses_finite']} | {v['natural_skips'] or '-'} | {v['verdict']} |")
    lines += ["", "## DINO crops: device vs worker", ""]
    c = s.get("dino_crops") or {}
    if c:
        lines += [f"train_dino.py HVP, {c['precision']}: images/s with --crops device {fmt(c['device'])}, with --crops "
                  f"worker {fmt(c['worker'])} (device / worker {fmt(c['device_over_worker'], 2)}); compute ms "
                  f"{fmt(c['device_compute_ms'])} vs {fmt(c['worker_compute_ms'])}.", ""]
    lines += ["## Data pipeline: loader workers", ""]
    ld = s.get("loader") or {}
    if ld.get("results"):
        lines += [f"DINO HVP crop set ({ld['views_per_image']} views per image) through hvp_run.BatchStream + "
                  f"hvp_run.make_loader, batch {ld['batch']}, pin_memory {ld['pin_memory']}, on the synthetic split; "
                  "images/s timed after the batches the workers prefetched while starting (2 per worker) and before the "
                  "epoch's last round of batches, for at most a few seconds. The device path's "
                  "crops and photometric work then run on the training device (see bench_data.py below).", "",
                  "| crops | workers | first batch s | images/s | per worker | views/s | batches timed |",
                  "|---|---|---|---|---|---|---|"]
        for r in ld["results"]:
            lines.append(f"| {r['crops']} | {r['workers']} | {fmt(r['first_batch_s'], 2)} | {fmt(r['images_per_s'])} | "
                         f"{fmt(r['images_per_s_per_worker'])} | {fmt(r['views_per_s'], 0)} | {r['batches']} |")
    lines += ["", "## Step benches", ""]
    if s["benches"]:
        sys.path.insert(0, str(REPO))
        from bench import run_all
        lines += run_all.summary_lines(s["benches"]) + [""]
        for name, b in s["benches"].items():
            lines += [f"### {name}", "", f"`{b['command']}`", "", b["table"].rstrip(), ""]
    lines += ["## Data pipeline: bench_data.py", ""]
    bd = s.get("bench_data") or {}
    if bd:
        lines += [f"`{bd['command']}`", "", bd["table"].rstrip(), ""]
    note = s["parts"].get("bench_data", {}).get("note")
    if note:
        lines += [f"Note: {note}.", ""]
    lines += ["## Detection: eval/detection.py", "",
              "Untrained backbones fine-tuned for a few iterations on the generated shapes set (a ResNet through "
              "the FPN, a ViT through the simple feature pyramid): whether the script runs and COCOeval scores it "
              "on this machine, not what AP a pretrained backbone reaches.", ""]
    det = s.get("detection") or {}
    if det:
        lines += ["| backbone | protocol | loss first -> last | box AP | mask AP | s (script) | s (wall) |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in det.items():
            lines.append(f"| {label} | {r['protocol']} | {fmt(r['loss_first'], 3)} -> {fmt(r['loss_last'], 3)} | "
                         f"{fmt(r['box_ap'], 2)} | {fmt(r['mask_ap'], 2)} | {fmt(r['seconds'])} | {fmt(r['wall_s'])} |")
        lines += ["", f"`{next(iter(det.values()))['command']}`", ""]
    lines += ["## Parts, skipped and failed", "", "| part | status | wall s | note |", "|---|---|---|---|"]
    for name, p in s["parts"].items():
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('wall_s'))} | {p.get('note', '')} |")
    if s["skipped"]:
        lines += [""] + [f"- {x['part']} / {x['item']}: {x['reason']}" for x in s["skipped"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- machine facts

def nvidia_smi():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or out.stderr.strip()[:200]
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"


def cpu_model():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def mem_total_gib():
    try:
        return next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        return None


# ----------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="report.md, summary.json and gpu_check.log go here")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="wall-clock budget of the whole check (default 450 s; dry run 300 s)")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes, fp32 (keeps this script working)")
    parser.add_argument("--wheels", default=str(REPO / ".gpu_wheels"),
                        help="carried wheels installed (pip --target, private folder) for a missing package")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="parts to leave out")
    parser.add_argument("--work_dir", default="", help="temporary files (default: a new folder under the temp dir)")
    parser.add_argument("--keep_work", action="store_true", help="keep the work folder (runs, logs, dataset)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 300.0 if args.dry_run else 450.0
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILD_MODES:
        return CHILD_MODES[argv[0]](argv[1:])
    check = Check(parse_args(argv))

    def stop(signum, _frame):
        check.kill_child()
        check.log(f"stopped by signal {signum}")
        sys.exit(check.finish(interrupted=f"signal {signum}"))

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
