"""What the bench scripts share: the machine line, peak memory of one step, writing the results."""
import ctypes
import gc
import json
import platform
from pathlib import Path

import torch


def machine(device):
    """One line naming where a benchmark ran."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


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


def write(output, table, summary):
    """Print the Markdown table; with --output also write it and a JSON summary next to it."""
    print(table)
    if output:
        Path(output).write_text(table + "\n")
        Path(output).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
