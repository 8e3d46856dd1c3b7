"""What the step benchmarks share: the device and Accelerator, input batches made by the real
transforms, timing the scripts' own train_step functions (wall clock and this process's CPU time),
scoring on cached model outputs, peak memory of one step, the tables and the JSON summary."""
import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import hvp_utils as hvp
import hvp_run


def cpu_name():
    """The CPU's model name and its widest vector units (AMX / AVX-512 / AVX2), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                  if flag in flags), "no AVX2")
    return f"{name} ({units})"


def machine(device):
    """One line naming where a benchmark ran."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ----------------------------------------------------------------------------------- device and Accelerator

def add_device_flags(parser, precisions=("auto", "no", "bf16", "fp16")):
    """--device, --mixed_precision, --threads, --seed: the flags every step bench takes."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available, else the CPU")
    parser.add_argument("--gpu", dest="device", action="store_const", const="cuda", help="same as --device cuda")
    parser.add_argument("--mixed_precision", default="auto", choices=list(precisions),
                        help="autocast of the training scripts' Accelerator; auto, as the scripts' presets: bf16 where "
                             "the device has it natively, else fp32 (emulated bf16 makes a CPU step several times slower)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the synthetic images")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def precision_name(accelerator):
    """The autocast an Accelerator runs, as the bench tables name it: bf16, fp16 or fp32."""
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision


def make_accelerator(device, mixed_precision):
    """The Accelerator a training script would get on `device` (one process, no gradient
    accumulation, no trackers), with the CUDA settings hvp_run.Run makes (TF32, cuDNN benchmark).
    --mixed_precision is resolved as the scripts resolve it (hvp_run.resolve_precision: "auto" is
    bf16 where native, else fp32), and what it resolved to is printed.

    Accelerate keeps one shared state per process and refuses a second Accelerator with other
    settings; benches called one after another in one process (tests, notebooks) reset it first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    precision, note = hvp_run.resolve_precision(mixed_precision, device)
    precision = precision or "no"
    print(f"precision: {'fp32' if precision == 'no' else precision}" + (f" ({note})" if note else ""),
          file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    try:
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    except ValueError:  # "AcceleratorState has already been initialized and cannot be changed"
        accelerator = None
    if accelerator is None or accelerator.device.type != device.type or accelerator.mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    return accelerator


# ----------------------------------------------------------------------------------- input batches

def random_images(n, size, seed):
    """n random RGB PIL images of size x size pixels (the transforms crop and resize them)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


def make_batch(transform, images, seed, device):
    """One batch as the data loader makes it: transform(image, generator) per image, each with its
    own seeded generator (as hvp_run.BatchStream), collated; pinned when the step copies it to a GPU."""
    samples = [transform(image, torch.Generator().manual_seed(hvp_run.mix_seed(seed, i))) for i, image in enumerate(images)]
    batch = hvp.collate_views(samples)
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def first_views(batch, counts):
    """The batch a plain run's loader makes of the same images: the first counts[key] views of
    each view group (its "_params" and, for "globals", iBOT's "masks" along with them)."""
    out = dict(batch)
    for key, n in counts.items():
        if key not in batch:  # e.g. no "locals" when a run draws none
            continue
        for name in (key, key + "_params", *(("masks",) if key == "globals" and "masks" in batch else ())):
            out[name] = batch[name][:, :n].contiguous()
    return out


# ----------------------------------------------------------------------------------- scoring on cached outputs

class Replay:
    """Stands in for a model in a script's select_hard_* call. Recording (the default): every call
    (and every method call, such as SimSiam's embed) runs the model and keeps what it returned.
    After replay(), the calls return those outputs in the same order without running the model, so
    the same select_hard_* call then times only what follows the forward: the scoring."""

    def __init__(self, model):
        self._model, self._outputs, self._next, self._replaying = model, [], 0, False

    def replay(self):
        if not self._outputs:
            raise RuntimeError("Replay: nothing recorded (the model was never called)")
        self._replaying, self._next = True, 0
        return self

    def _call(self, name, args, kwargs):
        if self._replaying:
            out = self._outputs[self._next % len(self._outputs)]
            self._next += 1
            return out
        out = (self._model if name is None else getattr(self._model, name))(*args, **kwargs)
        self._outputs.append(out)
        return out

    def __call__(self, *args, **kwargs):
        return self._call(None, args, kwargs)

    def __getattr__(self, name):  # only for names the instance lacks: the model's methods
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, args, kwargs)


def placeholder(views):
    """A (B, n, 3, 1, 1) stand-in for views (B, n, 3, H, W) in a replayed select_hard_* call: the
    call takes only the shape, device and dtype from it (the replayed models ignore their input),
    so resizing it and copying it to channels_last cost next to nothing."""
    return views.new_zeros(*views.shape[:3], 1, 1)


# ----------------------------------------------------------------------------------- timing

def now(device):
    """(wall clock, CPU time of this process), after the GPU has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def clock_marks():
    """While active, every hvp.clock call (the marks train_step puts around its selection and
    training parts) also notes (wall clock it returned, CPU time of this process): the CPU-time
    split of the same parts, which the step's record does not hold. hvp.clock's result is unchanged."""
    real, marks = hvp.clock, []

    def clock(enabled, device):
        t = real(enabled, device)
        marks.append((t, time.process_time()))
        return t

    hvp.clock = clock
    try:
        yield marks
    finally:
        hvp.clock = real


def _cpu_split(marks, record):
    """(select, train) CPU seconds from train_step's clock marks: three per micro-batch (before the
    selection, after it, after the training part), as its select_s / train_s are summed. None when
    the marks do not reproduce the record's wall-clock split (train_step timed itself otherwise)."""
    if not marks or len(marks) % 3:
        return None
    triples = [marks[i:i + 3] for i in range(0, len(marks), 3)]
    walls = (sum(b[0] - a[0] for a, b, _ in triples), sum(c[0] - b[0] for _, b, c in triples))
    if not all(math.isclose(w, record[k], rel_tol=1e-6, abs_tol=1e-7) for w, k in zip(walls, ("select_s", "train_s"))):
        return None
    return sum(b[1] - a[1] for a, b, _ in triples), sum(c[1] - b[1] for _, b, c in triples)


def timed_step(step, device):
    """Run one training step (step() returns train_step's record, logged: select_s and train_s
    measured with the GPU synchronised) -> {"wall": parts, "cpu": parts} in seconds: total (the
    whole call), select and train (train_step's own split), rest = total - select - train (the
    copy of the uint8 views to the device, the photometric augmentation of every view and the
    logged step's selection statistics)."""
    with clock_marks() as marks:
        start = now(device)
        record = step()
        end = now(device)
    split = _cpu_split(marks, record)
    wall = {"total": end[0] - start[0], "select": float(record["select_s"]), "train": float(record["train_s"])}
    cpu = {"total": end[1] - start[1], "select": split[0] if split else None, "train": split[1] if split else None}
    for parts in (wall, cpu):
        parts["rest"] = None if parts["select"] is None else parts["total"] - parts["select"] - parts["train"]
    return {"wall": wall, "cpu": cpu}


def timed(fn, device):
    start = now(device)
    fn()
    end = now(device)
    return end[0] - start[0], end[1] - start[1]


@dataclasses.dataclass
class Kind:
    """One kind of step in a bench: `step()` runs the script's train_step once (log_now=True) and
    returns its record; `score()` (HVP kinds) runs the script's select_hard_* on replayed model
    outputs plus the gathers of the chosen views, i.e. the scoring + gather part of the selection."""
    label: str
    step: Callable[[], dict]
    score: Optional[Callable[[], object]] = None


CLOCKS = {"wall": "wall clock", "cpu": "CPU time of this process"}


def _median(values):
    return None if any(v is None for v in values) else statistics.median(values)


def measure(kinds, device, warmup, steps):
    """Interleave the kinds (plain, HVP@1, HVP@0.5, plain, ...) for warmup + steps rounds, so slow
    drifts of a shared machine hit all alike; each HVP step is followed by one timing of its
    scoring. Returns {clock: {kind: median seconds of each part}} over the measured rounds, with
    score (scoring + gather) and select_forward = median select - median score for HVP kinds."""
    runs = {name: [] for name in kinds}
    for i in range(warmup + steps):
        for name, kind in kinds.items():
            sample = timed_step(kind.step, device)
            if kind.score is not None:
                sample["wall"]["score"], sample["cpu"]["score"] = timed(kind.score, device)
            if i >= warmup:
                runs[name].append(sample)
    med = {}
    for clock in CLOCKS:
        med[clock] = {}
        for name, samples in runs.items():
            parts = {part: _median([s[clock][part] for s in samples]) for part in samples[0][clock]}
            if "score" in parts:
                parts["select_forward"] = (None if parts["select"] is None
                                           else parts["select"] - parts["score"])
            med[clock][name] = parts
    return med


# ----------------------------------------------------------------------------------- memory

def _rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn, device):
    """Memory one call of fn() needs above what is allocated before it, in MiB.

    CUDA: torch.cuda.max_memory_allocated over the call (exact, tensors only). CPU: the rise of the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set
    before the call, after returning freed heap memory to the system (malloc_trim): includes the
    allocator's overhead, approximate to a few MiB. Returns None where neither is available."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _rss_mb("VmRSS")
        fn()
        return _rss_mb("VmHWM") - before
    except OSError:
        return None


def memory_table(kinds, device, labels):
    """Markdown rows: peak memory of one step of each kind, and its ratio to the first kind.
    kinds: name -> step function (the first is the baseline); labels: name -> row label."""
    for fn in kinds.values():  # warm: first calls allocate caches and workspaces
        fn()
    peaks = {name: peak_memory_mb(fn, device) for name, fn in kinds.items()}
    what = "max_memory_allocated" if device.type == "cuda" else "peak RSS rise (VmHWM)"
    lines = ["", f"peak memory of one step above the model and inputs ({what}):", "",
             "| step | peak (MiB) | / plain |", "|---|---|---|"]
    base = next(iter(peaks.values()))
    for name, peak in peaks.items():
        lines.append(f"| {labels[name]} | {'n/a' if peak is None else f'{peak:.0f}'} | "
                     f"{'n/a' if peak is None or not base else f'{peak / base:.2f}'} |")
    return lines, peaks


# ----------------------------------------------------------------------------------- report

def _cell(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}f}"


def step_tables(med, kinds):
    """Markdown lines: one table per clock, a row per kind (the first is plain, the baseline)."""
    lines, base_name = [], next(iter(kinds))
    for clock, label in CLOCKS.items():
        base = med[clock][base_name]["total"]
        lines += ["", f"{label}:", "",
                  "| step | total (s) | / plain | views to device + photometric + stats (s) | selection: select_s (s) "
                  "| selection forward (s) | scoring + gather (s) | scoring + gather % of step | train step: train_s (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, kind in kinds.items():
            m = med[clock][name]
            share = (f"{100 * m['score'] / m['total']:.2f} %" if "score" in m else "-")
            lines.append(f"| {kind.label} | {m['total']:.4f} | {m['total'] / base:.2f} | {_cell(m['rest'])} | "
                         f"{_cell(m['select'])} | {_cell(m.get('select_forward')) if 'score' in m else '-'} | "
                         f"{_cell(m['score'], 5) if 'score' in m else '-'} | {share} | {_cell(m['train'])} |")
    return lines


NOTES = ("total: the whole train_step call (GPU synchronised before and after). select_s / train_s: "
         "train_step's own split (log_now=True: hvp.clock synchronises the GPU). The rest of the call: the "
         "uint8 views copied to the device, the photometric augmentation of every view (N for HVP, 2 for "
         "plain) and, on this logged step, the selection statistics. Scoring + gather: the script's "
         "select_hard_* on the selection forward's cached outputs plus the gathers of the chosen views, "
         "timed apart after each step; selection forward = median select_s - median scoring + gather "
         "(it includes the resize and the memory-format copy of the chosen views). CPU-time parts come "
         "from train_step's own clock marks.")


def finish(bench, title, med, kinds, device, args):
    """Tables, memory, summary; with args.output also the Markdown file and its .json. Returns the summary."""
    where = machine(device)
    lines = [f"{title}, {where}, median of {args.steps} interleaved steps after {args.warmup} warm-up", "", NOTES]
    lines += step_tables(med, kinds)
    memory_lines, peaks = memory_table({name: k.step for name, k in kinds.items()}, device,
                                       {name: k.label for name, k in kinds.items()})
    base_name = next(iter(kinds))
    summary = {"bench": bench, "machine": where, "device": device.type, "args": vars(args),
               "step_ratio": {name: med["wall"][name]["total"] / med["wall"][base_name]["total"] for name in kinds},
               "step_ratio_cpu": {name: med["cpu"][name]["total"] / med["cpu"][base_name]["total"] for name in kinds},
               "median_s": {CLOCKS[c]: med[c] for c in CLOCKS}, "peak_memory_mib": peaks}
    write(args.output, "\n".join(lines + memory_lines), summary)
    return summary


def write(output, table, summary):
    """Print the Markdown table; with --output also write it and a JSON summary next to it."""
    print(table)
    if output:
        Path(output).write_text(table + "\n")
        Path(output).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
