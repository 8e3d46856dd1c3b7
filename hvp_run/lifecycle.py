"""The lifecycle of a training run around the method's step: precision, CPU threads, the
Accelerator, the run lock, stop signals, metrics, checkpoints, k-NN, export and Hub push (`Run`)."""
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from hvp_utils import collate_views, IMAGENET_MEAN, IMAGENET_STD
from .config import _first_error_line, HVPError, mix_seed, progress_bar, run_folder_of, seed_all, UNDO_ON_ERROR
from .data import BatchStream, default_workers, make_loader, open_source, Source, training_batches, usable_cores
from .checkpoints import checkpoint_bytes, checkpoint_config, checkpoint_problem, checkpoints, cleanup_partial_checkpoints, _flatten, load_checkpoint, _replace_dir, save_checkpoint, _unflatten
from .knn import knn_eval
from .hub import HubPusher, _link_tree


# ----------------------------------------------------------------------------------- run lifecycle
#
# What happens around the training steps, the same for every method and written once: checks that
# fail in a second instead of after hours, one run per output folder, the resume decision, state
# shared from the main process, metrics, checkpoints, stop on a signal, k-NN, export and push.

def native_bf16(device):
    """True where bf16 autocast runs on native bf16 units: CUDA GPUs that support it, CPUs with
    AVX512-BF16 or AMX-BF16. (Elsewhere CPUs emulate it, 1.7-3.3x slower than fp32 on Ice Lake.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(mixed_precision, device):
    """--mixed_precision: "auto" is bf16 where it is native (see native_bf16), otherwise fp32 ("no");
    "" leaves it to `accelerate launch --mixed_precision` (or its config). Returns (value for
    Accelerate, or None; a note saying why, or "")."""
    if mixed_precision != "auto":
        return mixed_precision or None, ""
    if native_bf16(device):
        return "bf16", f"auto: this {'GPU' if device.type == 'cuda' else 'CPU'} has native bf16"
    return "no", f"auto: fp32, this {'GPU' if device.type == 'cuda' else 'CPU'} has no native bf16 (emulated bf16 is slower)"


def make_accelerator(mixed_precision, grad_accum, report_to, output_dir):
    """Accelerator for CUDA, or CPU (also several CPU processes over gloo under accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    on_cpu = not torch.cuda.is_available()
    trackers = None if report_to in ("", "none") else report_to.split(",")
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision or None,
                       gradient_accumulation_steps=grad_accum, log_with=trackers,
                       project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)))


class RunLock:
    """One run per output folder: an exclusive lock on <folder>/.lock (flock), held by the main
    process for the whole run. The kernel drops it when the process ends, however it ends, so a
    lock left by a killed run is simply free again. Where the file system has no flock (some network
    file systems), the lock is <folder>/.lock-noflock instead, created only where it does not exist,
    holding the run's pid, host and start time until the run ends: one left by a run that died on
    this host is taken over; any other is refused, as a run on another host cannot be seen from here
    (the error says to delete the file if that run has ended)."""

    def __init__(self, folder):
        import fcntl
        import socket
        self.folder, self.path, self.lock_file = Path(folder), Path(folder) / ".lock", None
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        me = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise HVPError(f"{folder} is in use by another run ({holder}): wait for it to end, or choose "
                           "another --output_dir") from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: this file system has no flock
            os.close(self.fd)
            self.fd = None
            self._create_lock_file(me, e)
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me.encode(), 0)

    def _create_lock_file(self, me, flock_error):
        import atexit
        import re
        import socket
        path = self.folder / ".lock-noflock"
        for attempt in (1, 2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                holder = _read_text(path)  # "" while its run is still writing it
                found = re.match(r"pid (\d+) on ([^,\s]+),", holder)
                if attempt == 1 and found and found[2] == socket.gethostname() and not _alive(int(found[1])):
                    path.unlink(missing_ok=True)  # left by a run that died on this host
                    continue
                raise HVPError(f"{self.folder} is in use by another run ({holder or 'no details yet'}; this file "
                               f"system has no flock, so {path} is the lock): wait for it to end, or choose another "
                               f"--output_dir; if that run has ended, delete {path}") from None
            os.write(fd, me.encode())
            os.fsync(fd)
            os.close(fd)
            break
        self.lock_file, self.me, self.pid = path, me, os.getpid()
        atexit.register(self.release)  # an error that ends the run frees the folder too; a kill cannot
        print(f"note: the file system of {self.folder} has no flock ({flock_error.strerror or flock_error}): this "
              f"run holds {path} instead, removed when it ends", flush=True)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        # only the process that made the lock file removes it, and only while it is still its own
        if self.lock_file is not None and os.getpid() == self.pid:
            if _read_text(self.lock_file) == self.me:
                self.lock_file.unlink(missing_ok=True)
            self.lock_file = None


def _read_text(path):
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopRequest:
    """SIGTERM and SIGINT (as a scheduler, systemd or a terminal's Ctrl-C send them to the whole
    process group) become a flag; the run saves after the current step and exits 0. A second
    Ctrl-C more than 3 s after the first quits at once, without saving.

    Processes agree on the step to stop at without a host-device sync: each step starts an
    asynchronous all-reduce (max) of the signal's number over a CPU (gloo) group and reads the one
    of the step before, so every process sees a request at the same step, one step after it
    arrived, and knows which signal it was (the main process reports it)."""

    def __init__(self, accelerator):
        self.requested, self.first_at, self.signal_name = False, None, None
        self.accelerator, self.group, self.pending, self.previous = accelerator, None, None, {}
        if accelerator.num_processes > 1:
            import torch.distributed as dist
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.first_at is not None and time.monotonic() - self.first_at > 3:
            raise KeyboardInterrupt
        if not self.requested and self.accelerator.is_main_process:
            print(f"\n{signal.Signals(signum).name}: saving after this step, then stopping"
                  + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
        self.requested, self.signal_name = True, self.signal_name or signal.Signals(signum).name
        self.first_at = self.first_at or time.monotonic()

    def agreed(self):
        """Call once per step on every process: True on all of them at the same step once any got a signal."""
        if self.group is None:
            return self.requested
        import torch.distributed as dist
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item() > 0)
            if stop and self.signal_name is None:  # the signal came to another process
                self.signal_name = signal.Signals(int(flag.item())).name
        number = signal.Signals[self.signal_name].value if self.requested else 0
        flag = torch.tensor([float(number)])
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def close(self):
        """Wait for the last exchange; give the signals back to the handlers they had before
        (a run inside a longer program, e.g. a notebook, leaves Ctrl-C as it found it)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def tracker_name(key):
    """TensorBoard (or other tracker) name of a metrics.jsonl key, grouped by prefix; None for what
    is not a time series (constants such as k or sample counts, histograms)."""
    if key in ("step", "epoch", "k", "temperature", "train_samples", "test_samples", "startup_s", "finish_s") \
            or key.endswith("_hist"):
        return None
    if key.startswith(("hard_", "random_")):
        return f"hvp/{key}"
    if key.startswith("knn_"):
        return f"knn/{key[4:]}"
    if key in ("images_per_s", "select_s", "train_s", "peak_mem_gib"):
        return f"speed/{key}"
    if key == "skipped_images":
        return f"data/{key}"
    return f"train/{key}"


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) + the Accelerate trackers, main process only.
    Opening it at `resume_step` first drops the records of later steps (replayed after a resume),
    so every step appears once."""

    def __init__(self, accelerator, output_dir, resume_step=0):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = None
        if accelerator.is_main_process:
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and _record_step(line) <= resume_step]
                tmp = self.path.with_name(f"metrics.jsonl.tmp-{os.getpid()}")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
            self.file = open(self.path, "a")

    def log(self, record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {tracker_name(k): v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and tracker_name(k)}
        if scalars:
            self.accelerator.log(scalars, step=record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _record_step(line):
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut by a kill
        return float("inf")


def write_run_info(output_dir, config, derived=None):
    """Record the resolved config, what the run derived from it (`derived`), versions and the
    command line next to the results."""
    import platform
    from importlib import metadata
    info = {"config": dataclasses.asdict(config), "run": derived or {}, "argv": sys.argv,
            "processes": int(os.environ.get("WORLD_SIZE", 1)),
            "python": platform.python_version(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for mod in ("timm", "accelerate", "datasets"):  # installed versions, read without importing them
        try:
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            pass
    Path(output_dir, "config.json").write_text(json.dumps(info, indent=2))


def save_view_grid(path, views, hard_pair, mean=IMAGENET_MEAN, std=IMAGENET_STD, max_images=8):
    """PNG grid: one row per image, all its candidate views; the selected pair is framed green."""
    import torchvision
    views = views[:max_images].float().cpu()
    B, N = views.shape[:2]
    x = views * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    x = F.pad(x.clamp(0, 1), (2, 2, 2, 2), value=0.0)
    chosen = torch.zeros(B, N, dtype=torch.bool)
    chosen[torch.arange(B)[:, None], hard_pair[:B].cpu()] = True
    frame = torch.zeros_like(x[0, 0])
    frame[1, :2], frame[1, -2:], frame[1, :, :2], frame[1, :, -2:] = 1, 1, 1, 1
    mask = frame.sum(0, keepdim=True) > 0
    x = torch.where(chosen[:, :, None, None, None] & mask, frame, x)
    torchvision.utils.save_image(x.flatten(0, 1), path, nrow=N, padding=2)


def broadcast_state(state, accelerator):
    """Give every process the main process's version of a nested state (tensors, dicts, lists,
    numbers): the structure travels first, then each tensor. Returns the state received."""
    from accelerate.utils import broadcast_object_list
    import torch.distributed as dist
    tensors = {}
    skeleton = _flatten(state, tensors, "") if accelerator.is_main_process else None
    shapes = {k: (str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in tensors.items()}
    box = [skeleton, shapes]
    broadcast_object_list(box, from_process=0)
    skeleton, shapes = box
    device = accelerator.device if dist.get_backend() == "nccl" else torch.device("cpu")
    received = {}
    for key, (dtype, shape) in shapes.items():
        t = tensors[key].to(device) if key in tensors else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, src=0)
        received[key] = t
    return _unflatten(skeleton, received)


def broadcast_object(accelerator, value):
    """The main process's `value` (a picklable object), on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(accelerator, fn):
    """fn() on the main process only, its result handed to every process; an HVPError there stops
    every process with the same line (instead of leaving the others waiting at the next collective)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except HVPError as e:
            error = str(e)
    result, error = broadcast_object(accelerator, (result, error))
    if error is not None:
        raise HVPError(error)
    return result


def _state_of(obj):
    return obj.detach() if torch.is_tensor(obj) else obj.state_dict()


def _load_state(obj, state):
    if torch.is_tensor(obj):
        obj.copy_(state)
    else:
        obj.load_state_dict(state)


def _same(a, b):
    """Config values compared across a JSON round trip (tuples come back as lists)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def torch_threads(requested, omp_num_threads, on_cpu, cores, processes_per_node, workers):
    """Torch's CPU threads per process, as (threads, select_threads); None leaves torch's own count.
    threads: --threads when given (> 0); torch's own where OMP_NUM_THREADS is set (torch reads it) or
    the run is not on the CPU; else the process's share of the cores it may use. select_threads: on
    a CPU with loader workers (and no --threads), that share less the workers, at least 1, for the
    selection forward (hvp_utils.threads): the workers decode and augment the next batch on the
    cores it leaves, while the training step, on every core, has them to itself (Run also lowers
    the workers' priority, so that they take only what the training process leaves). On 2 Xeon cores
    with one worker the main job trained 1.21x the images/s of 1 thread throughout, and 2 threads
    throughout beside a worker of the same priority 0.95x (bench/bench_cpu_threads.py)."""
    if requested > 0:
        return requested, None
    if omp_num_threads or not on_cpu:
        return None, None
    share = max(1, cores // max(1, processes_per_node))
    select = max(1, share - workers)
    return share, (select if select < share else None)


def _process_age():
    """Seconds since this process started (its imports included)."""
    import psutil
    return time.time() - psutil.Process().create_time()


@dataclasses.dataclass
class Step:
    """One optimizer step, as `Run.steps()` yields it."""
    index: int  # optimizer steps done before this one (0, 1, ...): what schedules take
    epoch: int  # the epoch the step belongs to
    micro_batches: Iterator  # the step's run.grad_accum batches; torch is seeded before each
    log_now: bool  # run.log writes this step's record: compute what is worth logging (selection statistics)
    grid_now: bool  # also save a view grid (main process, the first logged step of each epoch)


class Run:
    """The lifecycle of one training run, shared by the four scripts. One order, each call once:

        run = hvp_run.Run(cfg, "SimSiam", MODEL_FIELDS, notes)  # accelerator, every check that needs no model;
                                                                 # seeds torch with --seed
        model, optimizer = ...                                   # built after Run(): the same on every process
        model, optimizer = run.prepare(model, optimizer)
        run.start({"model": run.accelerator.unwrap_model(model), "optimizer": optimizer}, transform,
                  export=run.accelerator.unwrap_model(model).backbone)  # or loader=... instead of transform
        for step in run.steps():
            record = train_step(model, optimizer, step.micro_batches, ...)  # the method's step
            run.log(step, record)                                            # written when step.log_now
        run.finish()                                             # final checkpoint, k-NN, export, Hub push

    What the run uses of the config is declared in `RunConfig` (the method's model fields are passed
    as `model_fields`: --resume refuses a checkpoint that differs in them; any other change is
    printed as a note). The caller's config is not changed: what the run derives from it is an
    attribute (`grad_accum`, `global_batch`, `steps_per_epoch`, `total_steps`, `num_workers`,
    `crops`, `threads`) and is recorded in config.json's "run" entry.

    Checked before any model is built, each failing with one line (exit status 2) on every process:
    the output folder (writable, not used by another run, resumable or new as --resume says), the
    Hub settings, the dataset, its training split and the labelled evaluation split. The decisions
    (which checkpoint, which step) are made by the main process and shared; at start the main
    process's state (fresh or resumed) is sent to every process, so no process needs to read the
    checkpoint and all start identical (every model and buffer in the state), with or without a
    shared file system. Only the main process writes to --output_dir. Under `run_main`, an HVPError
    before a new run's first step is done removes what the run wrote (a folder it made, the lock).

    metrics.jsonl gets one record per logged step (`run.log`), the k-NN results, and, once per
    process lifetime, `startup_s` (seconds from the process start to its first batch; in the first
    logged record) and a last record with `finish_s` (seconds `finish` took). On CUDA every logged
    record has `peak_mem_gib` (torch.cuda.max_memory_allocated).
    """

    def __init__(self, cfg, method, model_fields=(), notes=()):
        self.cfg, self.method, self.model_fields, self.notes = cfg, method, tuple(model_fields), list(notes)
        self.tag = f"hvp_{method.lower()}"
        self.output_dir = Path(cfg.output_dir)
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.grad_accum = cfg.grad_accum
        if cfg.global_batch:  # --global_batch sets the accumulation from the process count
            per_step = cfg.batch_size * world
            if cfg.global_batch % per_step:
                raise HVPError(f"--global_batch {cfg.global_batch} is not a multiple of --batch_size {cfg.batch_size} "
                               f"x {world} process(es)")
            self.grad_accum = cfg.global_batch // per_step
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, self.precision_note = resolve_precision(cfg.mixed_precision, device)
        self.accelerator = acc = make_accelerator(precision, self.grad_accum, cfg.report_to, self.output_dir)
        self.rank, self.world, self.device, self.is_main = acc.process_index, acc.num_processes, acc.device, acc.is_main_process
        if self.device.type == "cuda":  # TF32 matmuls/convolutions (fp32 runs) and the fastest kernels for fixed shapes
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.lock, self.stopped, self.state, self.step, self._batches = None, False, {}, 0, None
        self._saved_step = None  # the step of the last checkpoint this process wrote
        self.metrics, self._stepped, self._new_folder = None, False, None
        self.bar = None
        UNDO_ON_ERROR.append(self._stop_on_error)
        self.pusher = self._everywhere(lambda: HubPusher.from_config(self.resolved_config(), acc, method))
        self.source = Source(**self._on_main(lambda: dataclasses.asdict(
            open_source(cfg.dataset, cfg.split, cfg.image_column, cfg.label_column))))
        self.eval_source = self._on_main(self._open_eval_split)
        self.eval_source = Source(**self.eval_source) if self.eval_source else None
        self.decision = self._on_main(self._claim_output_dir)
        self.global_batch = cfg.batch_size * self.world * self.grad_accum
        self.steps_per_epoch = self.source.num_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise HVPError(f"split {cfg.split!r} has {self.source.num_rows} images, fewer than one global batch "
                           f"({self.global_batch})")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.num_workers = cfg.num_workers if cfg.num_workers >= 0 else default_workers(per_node)
        threads, self.select_threads = torch_threads(cfg.threads, os.environ.get("OMP_NUM_THREADS"),
                                                     self.device.type == "cpu", usable_cores(), per_node,
                                                     self.num_workers)
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        # the loader workers of a CPU run fill the cores the training process leaves (torch_threads)
        self.worker_nice = 19 if self.select_threads else 0
        # where views are cut: batched on a GPU; on a CPU the workers' resizes are cheaper (bench_data.py)
        self.crops = cfg.crops if cfg.crops != "auto" else ("device" if self.device.type == "cuda" else "worker")
        # on a CPU the training process and the loader workers share the cores: the workers also apply the
        # photometric step (jitter, blur, ...; a fifth of the main job's step) beside the training process
        self.photometric = "worker" if self.crops == "worker" and self.device.type == "cpu" and self.num_workers else "device"
        torch.manual_seed(cfg.seed)  # the same initial weights on every process

    @property
    def resuming(self):
        """True when this run continues from a checkpoint (decided at construction)."""
        return self.decision["checkpoint"] is not None

    def resolved_config(self):
        """The config as this run uses it: the caller's, with the derived --grad_accum (what
        config.json, checkpoints and the model card record)."""
        return dataclasses.replace(self.cfg, grad_accum=self.grad_accum)

    # --- agreement between processes

    def _on_main(self, fn):
        return on_main(self.accelerator, fn)

    def _everywhere(self, fn):
        """fn() on every process; if it raises HVPError anywhere, every process stops."""
        result, error = None, None
        try:
            result = fn()
        except HVPError as e:
            error = str(e)
        if self.world > 1:
            failed = self.accelerator.reduce(torch.tensor([float(error is not None)], device=self.device), "sum")
            if failed.item() and error is None:
                error = "another process stopped at start (its error is printed above)"
        if error is not None:
            raise HVPError(error)
        return result

    def _claim_output_dir(self):
        """Main process: the output folder is writable and ours; which checkpoint to resume from.
        A folder that does not exist yet is created (and locked) by `start`, so that bad input
        found before then leaves nothing behind. --resume PATH of another folder continues that
        run's checkpoint here (see `_continue_elsewhere`)."""
        cfg, out = self.cfg, self.output_dir
        resume, named = cfg.resume, None
        if resume not in ("", "yes", "auto"):  # --resume PATH
            named = Path(resume).expanduser()
            if not checkpoints(named):
                raise HVPError(f"--resume takes no value, 'auto', or a checkpoint or run folder; {resume!r} is neither "
                               "a checkpoint-N folder nor a folder holding one")
            if run_folder_of(named).resolve() != out.resolve():
                return self._continue_elsewhere(named)
            resume = "yes"
        if not out.exists():
            self._check_creatable()
            if resume == "yes":
                raise HVPError(f"--resume: {out} does not exist, there is no run to continue (a new run starts "
                               "without --resume; --resume auto continues a run if there is one)")
            return {"checkpoint": None, "step": 0, "notes": []}
        before = set(os.listdir(out))
        self._lock_output_dir()
        found = checkpoints(out)
        if not found:
            if resume == "yes":
                raise HVPError(f"--resume: no checkpoint in {out} to continue (a new run starts without --resume; "
                               "--resume auto continues a run if there is one)")
            self._new_folder = before
            return {"checkpoint": None, "step": 0, "notes": []}
        if not resume:
            raise HVPError(f"{out} already holds a run ({found[0].name}): pass --resume to continue it, or choose "
                           "another --output_dir")
        if named is not None and named.resolve() != out.resolve():  # one checkpoint of this folder
            newer = [c.name for c in found if c.name > named.name]
            if newer:  # its saves would mix with the newer checkpoints
                raise HVPError(f"--resume: {named.name} is not the newest checkpoint in {out} ({newer[0]} is): resume "
                               f"the newest, or continue from {named.name} in another folder with --output_dir")
            return self._resume_decision(*self._newest_good([named], named))
        return self._resume_decision(*self._newest_good(found, out))

    def _continue_elsewhere(self, named):
        """--resume PATH where PATH (a checkpoint, or a run folder: its newest good checkpoint) lies
        outside --output_dir: the run goes on from it, writing to --output_dir, which holds no run."""
        out = self.output_dir
        if out.exists():
            before = set(os.listdir(out))
            self._lock_output_dir()
            if checkpoints(out):
                raise HVPError(f"--resume {named}: --output_dir {out} already holds a run: continue from {named} "
                               "in a new folder")
            self._new_folder = before
        else:
            self._check_creatable()
        ckpt, notes = self._newest_good(checkpoints(named), named)
        return self._resume_decision(ckpt, notes + [f"continuing from {ckpt} in {out}"])

    def _check_creatable(self):
        """A new --output_dir can be made; the folders `start` will create are what a failure removes."""
        out = self.output_dir
        parent = next(p for p in [out, *out.parents] if p.exists())
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            raise HVPError(f"cannot create --output_dir {out}: {parent} is not a writable folder")
        self._new_folder = [p for p in [out, *out.parents] if not p.exists()]  # the folders start() makes

    @staticmethod
    def _newest_good(found, where):
        """The newest undamaged checkpoint of `found` (newest first) and warnings about those skipped."""
        notes = []
        for ckpt in found:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                break
            notes.append(f"warning: {ckpt.name} is damaged ({problem}): not resuming from it")
        else:
            raise HVPError(f"--resume: every checkpoint in {where} is damaged (last problem: {problem})")
        if notes:
            notes.append(f"resuming from the previous good checkpoint, {ckpt.name}")
        return ckpt, notes

    def _resume_decision(self, ckpt, notes):
        """Resuming from `ckpt`: refuse another method's or another model's checkpoint; note what changed."""
        skeleton = json.loads((ckpt / "state.json").read_text())
        method = skeleton.get("method")
        if method is None:  # older checkpoints: the export's tag, hvp_<method>
            export = ckpt / "backbone" / "config.json"
            tag = json.loads(export.read_text()).get("pretrained_cfg", {}).get("tag") if export.is_file() else None
            method = tag.removeprefix("hvp_") if tag else self.method
        if method.lower() != self.method.lower():
            script = skeleton.get("script") or "the script that trained it"
            raise HVPError(f"--resume: {ckpt.name} holds a {method} run; resume it with {script}")
        saved = checkpoint_config(ckpt)
        mine = dataclasses.asdict(self.resolved_config())
        differ = [f for f in self.model_fields if f in saved and not _same(saved[f], mine[f])]
        if differ:
            raise HVPError(f"--resume: {ckpt} holds a model with " + ", ".join(f"--{f} {saved[f]}" for f in differ)
                           + "; this command asks for " + ", ".join(f"--{f} {mine[f]}" for f in differ))
        # everything but the model may change (a longer run, another lr, more workers); --resume itself always does
        changed = [f"{f} {saved[f]} -> {mine[f]}" for f in mine
                   if f in saved and f != "resume" and not _same(saved[f], mine[f])]
        if changed:
            notes.append("note: resuming with changed settings: " + ", ".join(changed))
        run = skeleton.get("run")
        layout = None if not isinstance(run, dict) else _data_layout(run["processes"], run["num_workers"],
                                                                      saved["batch_size"], run["grad_accum"],
                                                                      saved["shuffle_buffer"])
        return {"checkpoint": str(ckpt), "step": skeleton["step"], "notes": notes, "layout": layout}

    def _stop_on_error(self):
        """When main() stops with an HVPError (run_main calls this): end the progress bar's line (the
        error gets its own), and if no step was done in a folder that held no run, remove what the
        run wrote, the lock included (the folder too if the run made it), so that bad input found
        before the first step leaves nothing behind. A resumed run's folder is left as it was."""
        if self.bar is not None:
            self.bar.close()
        if not self.is_main or self._new_folder is None or self._stepped:
            return
        if self.metrics is not None:
            self.metrics.close()
        for tracker in self.accelerator.trackers:  # TensorBoard's event file
            tracker.finish()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if isinstance(self._new_folder, list):  # made by this run: the folder and the parents it made
            shutil.rmtree(self.output_dir, ignore_errors=True)
            for parent in self._new_folder[1:]:
                try:
                    parent.rmdir()
                except OSError:  # not empty (or gone): something else lives there now
                    break
        elif self.output_dir.is_dir():
            for p in self.output_dir.iterdir():
                if p.name not in self._new_folder:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        self._new_folder = None

    def _lock_output_dir(self):
        out = self.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise HVPError(f"cannot write to --output_dir {out}: {e.strerror or e}") from None
        self.lock = RunLock(out)
        cleanup_partial_checkpoints(out)

    def _open_eval_split(self):
        cfg = self.cfg
        if not cfg.eval_split:
            return None
        if not self.source.label_column:
            print(f"note: split {cfg.split!r} has no integer label column {cfg.label_column!r}: no k-NN evaluation",
                  flush=True)
            return None
        source = open_source(cfg.dataset, cfg.eval_split, cfg.image_column, cfg.label_column)
        if source.files and (source.files, source.pieces) == (self.source.files, self.source.pieces):
            # files given directly are one split: its queries would be the memory bank itself
            print(f"note: {cfg.dataset!r} has one split only (files given directly): no k-NN evaluation (give a "
                  "folder with a test split, or --eval_split '')", flush=True)
            return None
        if not source.label_column:
            raise HVPError(f"evaluation split {cfg.eval_split!r} of {cfg.dataset!r} has no integer label column "
                           f"{cfg.label_column!r} for the k-NN evaluation (--eval_split '' skips it)")
        return dataclasses.asdict(source)

    # --- start

    def prepare(self, *objects):
        """accelerator.prepare (DDP, autocast, fp16 scaler) of the trained model and its optimizer."""
        return self.accelerator.prepare(*objects)

    def start(self, state, transform=None, *, export, loader=None, evaluate=None, banner="", data_config=None,
              export_name="backbone"):
        """Begin (or resume) training.

        state: what a checkpoint holds, {name: module, optimizer or tensor}; export: the backbone
        written as the timm export (and pushed), called `export_name` in the closing message;
        evaluate: the backbone k-NN evaluates (default export); banner: the method's part of the
        start-up line.

        The batches come from one of:
        - transform: the training views of one image, transform(image, generator) -> dict; the
          built-in loader (a BatchStream over --dataset in --num_workers workers) batches them;
        - loader: your own, an iterable of this process's batches (iterated once per epoch, e.g. a
          DataLoader) or a function epoch -> such an iterable. A batch is whatever your step reads
          (the scripts' steps read hvp.collate_views of MultiViewTransform outputs); a dict's
          "skipped" count, if any, is added to the logged skipped_images. Epochs are counted in
          --dataset's size: the run takes run.steps_per_epoch x run.grad_accum batches of each of
          your epochs (fewer is an error); to resume exactly, give the same batches for the same
          epoch. --dataset is still opened: it sets the steps per epoch and is the k-NN memory bank."""
        cfg, acc = self.cfg, self.accelerator
        if (transform is None) == (loader is None):
            raise TypeError("Run.start takes either a transform (for the built-in loader) or a loader")
        self.state, self.export, self.evaluate = dict(state), export, evaluate or export
        self.export_name = export_name
        if acc.scaler is not None:
            self.state["scaler"] = acc.scaler
        self.data_config = data_config or {"input_size": (3, cfg.image_size, cfg.image_size), "interpolation": "bicubic",
                                           "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        self.step = self.decision["step"]
        self._on_main(self._load_and_check_room)
        if self.world > 1:  # everyone starts from the main process's state, fresh or resumed
            received = broadcast_state({k: _state_of(v) for k, v in self.state.items()}, acc)
            for name, value in received.items():
                _load_state(self.state[name], value)
        seed_all(cfg.seed + self.rank)
        self.metrics = MetricsLog(acc, self.output_dir, self.step)
        if self.is_main:
            write_run_info(self.output_dir, self.resolved_config(), self._derived())
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in dataclasses.asdict(self.resolved_config()).items()}
        purge = {"tensorboard": {"purge_step": self.step + 1}} if self.step and "tensorboard" in cfg.report_to else {}
        acc.init_trackers(self.tag, config=hparams, init_kwargs=purge)
        if loader is None:
            self.notes += self._layout_note()
        if self.is_main:
            self._print_banner(banner)
        self._stop = StopRequest(acc)
        if loader is None:
            self._batches = training_batches(self._dataset_loader(transform), self.steps_per_epoch, self.step,
                                             self.grad_accum, total_steps=self.total_steps)
        else:
            self._batches = self._user_batches(loader)
        self.bar = progress_bar(self.total_steps, self.step, self.method, self.is_main)
        self.skipped, self._last_log = 0, (time.perf_counter(), self.step)
        self._startup_s, self._startup_logged = None, False

    def _layout_note(self):
        """Resuming mid-epoch with other processes, loader workers or batches: say what happens to the
        rest of the epoch (the rows each step takes come from a plan of the layout, data.epoch_ranges,
        and the rows the old layout already trained are not a position in the new one's plan)."""
        saved, within = self.decision.get("layout"), self.step % self.steps_per_epoch
        mine = _data_layout(self.world, self.num_workers, self.cfg.batch_size, self.grad_accum, self.cfg.shuffle_buffer)
        changed = [f"{k} {saved[k]} -> {mine[k]}" for k in mine if saved and saved[k] != mine[k]]
        if not within or not changed:
            return []
        epoch = self.step // self.steps_per_epoch
        return [f"note: resuming mid-epoch {epoch} (step {within} of {self.steps_per_epoch}) with another data layout "
                f"({', '.join(changed)}): its last {self.steps_per_epoch - within} steps take their rows from the new "
                f"layout's plan, so in epoch {epoch} some rows are trained twice and some not at all; every later "
                "epoch trains every example once"]

    def _dataset_loader(self, transform):
        """The built-in epoch loader: (epoch, skip) -> DataLoader over this process's BatchStream."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        batches = self.steps_per_epoch * self.grad_accum
        collate = functools.partial(collate_views, apply_photometric=True) if self.photometric == "worker" else None

        def epoch_loader(epoch, skip):
            stream = BatchStream(self.source, transform, cfg.batch_size, epoch, cfg.seed, self.rank, self.world,
                                 batches, skip, cfg.shuffle_buffer, collate)
            return make_loader(stream, self.num_workers, pin_memory=pin, nice=self.worker_nice)
        return epoch_loader

    def _user_batches(self, loader):
        """(epoch, batch) from a user's loader (see `start`), from the current step on."""
        per_epoch = self.steps_per_epoch * self.grad_accum
        epoch, done = divmod(self.step * self.grad_accum, per_epoch)
        while True:
            count = 0
            for batch in itertools.islice(loader(epoch) if callable(loader) else loader, per_epoch):
                count += 1
                if count > done:  # resuming mid-epoch: the batches before are the ones already trained on
                    yield epoch, batch
            if count < per_epoch:
                raise HVPError(f"the loader's epoch {epoch} has {count} batches; this run takes {per_epoch} per epoch "
                               f"({self.steps_per_epoch} steps x {self.grad_accum} micro-batches)")
            epoch, done = epoch + 1, 0

    def _derived(self):
        """What the run derived from the config and the machine (config.json's "run" entry)."""
        return {"grad_accum": self.grad_accum, "global_batch": self.global_batch, "processes": self.world,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "num_workers": self.num_workers, "crops": self.crops, "photometric": self.photometric,
                "threads": self.threads, "select_threads": self.select_threads, "worker_nice": self.worker_nice,
                "device": str(self.device), "precision": self.accelerator.mixed_precision}

    def _load_and_check_room(self):
        """Main process: load the chosen checkpoint into the state; check there is room for the next."""
        if self.lock is None:
            self._lock_output_dir()
        ckpt = self.decision["checkpoint"]
        for note in self.decision["notes"]:
            print(note, flush=True)
        if ckpt is not None:
            saved = load_checkpoint(ckpt)
            for name, obj in self.state.items():
                if name not in saved or saved[name] is None:
                    if name == "scaler":
                        continue
                    raise HVPError(f"--resume: {ckpt} has no {name!r} state (saved by another script?)")
                try:
                    _load_state(obj, saved[name])
                except (RuntimeError, ValueError, KeyError) as e:
                    raise HVPError(f"--resume: {ckpt} does not fit this {name}: {_first_error_line(e)[:300]}") from None
        # a save writes the new checkpoint before it removes the oldest: keep_checkpoints + 1 exist for a
        # moment (the ones already here count; with keep_checkpoints 0, all are kept: room for the next)
        keep, present = self.cfg.keep_checkpoints, len(checkpoints(self.output_dir))
        count = max(1, keep + 1 - present) if keep > 0 else 1
        size = checkpoint_bytes(self.state, self.export)
        free = shutil.disk_usage(self.output_dir).free
        if free < count * size + 16 * 2**20:  # + metrics, view grids, logs
            raise HVPError(f"--output_dir {self.output_dir} has {free / 2**30:.2f} GiB free; a checkpoint needs "
                           f"about {size / 2**30:.2f} GiB and this run needs room for {count} more ("
                           + (f"--keep_checkpoints {keep}, and the newest is written before the oldest is removed)"
                              if keep > 0 else "the next; --keep_checkpoints 0 keeps them all)"))

    def _print_banner(self, banner):
        cfg = self.cfg
        precision = self.accelerator.mixed_precision
        line = (f"{self.method} {banner} | {self.world} process(es) on {self.device.type} | global batch "
                f"{self.global_batch} ({cfg.batch_size} x {self.world} x {self.grad_accum} accumulated) | "
                f"{self.steps_per_epoch} steps/epoch | {self.total_steps} steps | precision {precision}"
                + (f" ({self.precision_note})" if self.precision_note else "")
                + f" | {self.num_workers} loader workers, crops on the {self.crops}, photometric on the {self.photometric} | "
                  f"{self.threads} torch thread(s)"
                + (f", {self.select_threads} in the selection forward beside the workers" if self.select_threads else "")
                + (f" | resumed at step {self.step}" if self.step else ""))
        print(line, flush=True)
        for note in self.notes:
            print(note, flush=True)
        if self.device.type == "cuda" and precision == "no":
            print("warning: training on CUDA in fp32 (TF32 matmuls); bf16 is usually ~2x faster: pass "
                  "--mixed_precision bf16 (or accelerate launch --mixed_precision bf16)", flush=True)

    # --- the loop

    def steps(self):
        """Yield a `Step` for each remaining optimizer step. Its micro_batches yields the step's
        run.grad_accum batches and seeds torch from (seed, rank, step, micro-step) before each, so
        drop-path and other randomness inside a step replay exactly after a resume; the step must
        use all of them. Between steps: progress bar, periodic checkpoint and k-NN, the stop check."""
        if self._batches is None:
            raise RuntimeError("Run.steps: call run.start(...) first")
        cfg = self.cfg
        while self.step < self.total_steps:
            log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total_steps
            self._used = 0
            yield Step(self.step, self.step // self.steps_per_epoch, self._micro_batches(), log_now,
                       grid_now=log_now and self.is_main and self.step % self.steps_per_epoch < cfg.log_every)
            if self._used != self.grad_accum:
                raise RuntimeError(f"the training step used {self._used} of its {self.grad_accum} micro-batches")
            self.step += 1
            self._stepped = True
            self.bar.update(1)
            if self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save()
            if cfg.knn_every and self.step % (cfg.knn_every * self.steps_per_epoch) == 0 and self.step < self.total_steps:
                result = self.knn()
                if result:
                    self.metrics.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **result})
            if self._stop.agreed():
                self.stopped = True
                return

    def _micro_batches(self):
        for micro in range(self.grad_accum):
            _, batch = next(self._batches)
            if self._startup_s is None:
                self._startup_s = _process_age()
            # seeded after the fetch: starting a loader draws from torch's generator too
            torch.manual_seed(mix_seed(self.cfg.seed, self.rank, self.step, micro))
            self.skipped += int(batch.get("skipped", 0)) if isinstance(batch, dict) else 0
            self._used += 1
            yield batch

    def log(self, step, record):
        """Write the record of `step` if step.log_now: `loss` (a tensor) is averaged over processes
        and must be finite; tensors become numbers; speed and skipped images are added (and, once,
        startup_s; on CUDA peak_mem_gib)."""
        if not step.log_now:
            return
        done = step.index + 1
        record = dict(record)  # the caller's dict stays as it was
        loss = self.accelerator.reduce(record.pop("loss").detach().float(), reduction="mean").item()
        if not math.isfinite(loss):
            raise HVPError(f"loss became {loss} at step {done}: training diverged; the last checkpoint in "
                           f"{self.output_dir} is intact (try a lower --lr)")
        (since, from_step), now = self._last_log, time.perf_counter()
        full = {"step": done, "epoch": round(done / self.steps_per_epoch, 4), "loss": loss}
        for key, value in record.items():
            full[key] = float(value) if torch.is_tensor(value) and value.numel() == 1 else value
        full.update(images_per_s=(done - from_step) * self.global_batch / (now - since), skipped_images=self.skipped)
        if self._startup_s is not None and not self._startup_logged:
            full["startup_s"], self._startup_logged = self._startup_s, True
        if self.device.type == "cuda":
            full["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.log(full)
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{full['images_per_s']:.0f}")
        self._last_log = (now, done)

    def save_grid(self, step, name, views, chosen):
        """grids/step-<step><name>.png: a few images' candidate views, the chosen ones framed (main process)."""
        if self.is_main:
            (self.output_dir / "grids").mkdir(exist_ok=True)
            save_view_grid(self.output_dir / "grids" / f"step-{step.index + 1:08d}{name}.png", views, chosen)

    # --- checkpoints, evaluation, the end

    def save(self, push=True):
        """Checkpoint the state (main process), refresh <output_dir>/backbone, push when due (and `push`)."""
        self.accelerator.wait_for_everyone()
        path = self.output_dir / f"checkpoint-{self.step:08d}"

        def write():  # main process; an HVPError there (a full disk) stops every process with its line
            state = {name: _state_of(obj) for name, obj in self.state.items()}
            # the method and script name a checkpoint resumed by another script; the layout, a mid-epoch
            # resume on other processes or workers
            script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else None
            state.update(step=self.step, config=dataclasses.asdict(self.resolved_config()), method=self.method,
                         script=script, run=self._derived())
            save_checkpoint(self.output_dir, self.step, state, self.export, self.data_config, self.tag,
                            self.cfg.keep_checkpoints, license=self.cfg.hub_license)
            tmp = self.output_dir / f"backbone.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _link_tree(path / "backbone", tmp)  # the checkpoint's export, by hard links
            _replace_dir(tmp, self.output_dir / "backbone")
            if push and self.pusher.due(self.step) and self.step < self.total_steps:
                self.pusher.push(self.output_dir / "backbone", self.step, state_dir=path)
        self._on_main(write)
        self.accelerator.wait_for_everyone()
        self._saved_step = self.step
        return path

    def knn(self):
        """k-NN accuracy of the evaluated backbone (train split = memory bank, eval split = queries)."""
        if self.eval_source is None:
            return None
        cfg, model = self.cfg, self.evaluate
        was_training = model.training
        model.eval()
        result = knn_eval(model, self.accelerator, self.source, self.eval_source, cfg.image_size,
                          batch_size=2 * cfg.batch_size, num_workers=self.num_workers, k=cfg.knn_k)
        model.train(was_training)
        return result

    def finish(self):
        """Final checkpoint; then, unless stopped by a signal: k-NN (knn.json), export, Hub push."""
        cfg, began = self.cfg, time.perf_counter()
        self.bar.close()
        self._batches = None  # ends the loader workers before evaluation starts its own
        if self._saved_step == self.step:  # right after a scheduled checkpoint: not written twice
            path = self.output_dir / f"checkpoint-{self.step:08d}"
        else:  # stopped by a signal: no new push (the one under way is abandoned at once, below)
            path = self.save(push=not self.stopped)
        result = None
        if self.stopped:
            if self.is_main:
                print(f"{self._stop.signal_name or 'stop signal'}: saved {path}; continue with the same command and "
                      "--resume", flush=True)
        else:
            result = self.knn()
            if result is not None and self.is_main:
                self.metrics.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **result})
                (self.output_dir / "knn.json").write_text(json.dumps(result, indent=2))
                skipped = f" ({result['skipped_images']} images could not be decoded)" if result["skipped_images"] else ""
                print(f"k-NN (k={cfg.knn_k}, T=0.07) on {Path(cfg.dataset).name or cfg.dataset} [{cfg.eval_split}]: "
                      f"top-1 {result['knn_top1']:.2f} %, top-5 {result['knn_top5']:.2f} %{skipped}", flush=True)
            if self.is_main:
                export = self.output_dir / "backbone"
                print(f"{self.export_name} exported to {export} (timm: create_model('local-dir:{export}', "
                      "pretrained=True))", flush=True)
            self.pusher.push(self.output_dir / "backbone", self.step, results=result, state_dir=path)
        # a signal: a scheduler's SIGKILL follows soon, so a push under way is abandoned at once (kept in
        # hub_upload with its command); otherwise it gets until the deadline
        pushed = self.pusher.close(timeout=0 if self.stopped else None)
        self.metrics.log({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                          "finish_s": time.perf_counter() - began})
        self.metrics.close()
        self._stop.close()
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
        if self._stop_on_error in UNDO_ON_ERROR:
            UNDO_ON_ERROR.remove(self._stop_on_error)
        if pushed is False and not self.stopped:  # a scheduler or CI sees the failure in the exit status
            raise HVPError("training finished and is saved, but its final Hub push did not complete "
                           "(see the hub: line above)")
        return result


def _data_layout(processes, num_workers, batch_size, grad_accum, shuffle_buffer):
    """What decides which rows an epoch's steps take (see data.epoch_ranges; 0 workers read as 1)."""
    return {"processes": processes, "loader workers": max(1, num_workers), "batch_size": batch_size,
            "grad_accum": grad_accum, "shuffle_buffer": shuffle_buffer}
