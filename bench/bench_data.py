"""Data-pipeline cost at ImageNet size: loader-worker CPU per image with the crops made in the
workers vs on the training device, and what the device then spends per image.

    python bench/bench_data.py                                    # ImageNet-sized JPEGs, every crop set
    python bench/bench_data.py --images 8 --repeats 2             # quicker
    python bench/bench_data.py --loader --workers 0 1 2           # also the shipped dataset through DataLoader
    python bench/bench_data.py --output bench/RESULTS_data.md     # also write the table (+ .json)

Worker side, what one loader worker spends per image (process CPU time, which a shared machine
disturbs less than wall-clock time; 1 torch thread, as in a loader worker):
  real loader: the JPEGs written to a parquet file (row groups of --worker_batch rows) and read by
               the training scripts' loader, hvp_run.BatchStream through hvp_run.make_loader with one
               worker: reading the row groups, the shuffle buffer, the per-row generators, decoding,
               the views, collate_views into shared memory and handing the batch to the training
               process. Measured inside the worker over --worker_batches batches in the steady state
               (after the first batch, which includes the worker's start; the last, which reads
               nothing, left out). This is the number to size --num_workers by (images/s per core).
  parts:       the transform alone in this process, from the encoded JPEG bytes (open_image, then
               MultiViewTransform), plus its share of collate_views over the image set (in this
               process: no shared memory); both paths in the same run, repeat by repeat interleaved,
               the median repeat reported. "real loader - parts" is what the parts leave out.
  worker path: crops="worker": full-size decode, every view's parameters, every view's antialiased
               resized crop (crop_view: torchvision resized_crop's pixels) and flip, uint8 crops collated.
  device path: crops="device": the same parameters, the JPEG decoded at reduced size when every
               view allows it (draft_reduction), only the region covering the view boxes kept,
               images padded and collated.
  "decode" (full-size decode_image) and "params" (MultiViewTransform.sample_params) are measured on
  their own; "crops" is the rest of the worker path's transform, "region" the rest of the device
  path's (it includes the draft decoding's saving, so it can be negative).
Device side (--device, cuda when available; on CUDA timed with torch.cuda.synchronize around
each measurement): per image of a --device_batch batch, crop_views + photometric for every group
of the device path (views_from_batch), vs photometric alone on the worker path's crops, with both
photometric paths (subsets: less arithmetic, waits for the device; sync-free: fixed shapes). On
CUDA the device path is also run once under torch.cuda.set_sync_debug_mode("error") to check that
it never makes the host wait.

Crop sets (the recipes of the training scripts): HVP-DINO 4 x 224 + 16 x 96 px (bicubic, DINO's
two global transforms and its local one), DINO 2 x 224 + 10 x 96, iBOT 4 x 224 + 10 x 96 (the
DINO recipes; iBOT's patch masks are drawn by train_ibot's MaskedMultiCrop and left out here),
HVP-SimSiam 4 x 224 (bilinear, MoCo v2 recipe) and SimSiam 2 x 224.
Images: synthetic 500 x 375 (smooth multi-scale noise, JPEG quality 90), and when the foolbox
wheel's ImageNet photos are installed (requirements-nodeps.txt): those cut to 500 x 375 and
re-encoded at quality 90, and the files as shipped (512 x 512, one 1024 x 683).

--loader keeps the earlier small-image measurement: views per second through BatchStream and the
DataLoader (wall clock) by number of workers, on the shipped dataset (worker-path crops).
"""
import argparse
import importlib.metadata
import io
import itertools
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
import hvp_run  # noqa: E402
from bench import common  # noqa: E402

BARS = {"worker_ms": 4.0, "ratio": 0.35}   # HVP-DINO device path, real loader worker: CPU per image, and new / old


def crop_sets():
    cfg = types.SimpleNamespace(image_size=224, local_size=96, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    g1, g2, local = hvp.dino_augs(cfg)
    simsiam = hvp.ViewAug(size=224, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                          blur_p=0.5, blur_kernel=9, flip_p=0.5, interpolation="bilinear")  # train_simsiam.simsiam_aug
    return {"HVP-DINO 4x224+16x96": {"globals": [g1, g2] * 2, "locals": [local] * 16},
            "DINO 2x224+10x96": {"globals": [g1, g2], "locals": [local] * 10},
            "iBOT 4x224+10x96": {"globals": [g1, g2] * 2, "locals": [local] * 10},
            "HVP-SimSiam 4x224": {"views": [simsiam] * 4},
            "SimSiam 2x224": {"views": [simsiam] * 2}}


def encode(image, quality=90):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_jpegs(n, height=375, width=500, seed=0):
    """Smooth images with detail at several scales (noise at 4 ... 500 cells across, bicubic)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.zeros(3, height, width)
        for cells, amp in ((4, 1.0), (16, 0.6), (64, 0.45), (188, 0.35), (500, 0.25)):
            noise = torch.rand(1, 3, max(2, cells * height // width) + 1, cells + 1, generator=g)
            img += amp * F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)[0]
        lo, hi = img.amin((1, 2), keepdim=True), img.amax((1, 2), keepdim=True)
        arr = ((img - lo) / (hi - lo) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
        out.append(encode(Image.fromarray(arr)))
    return out


def real_jpegs(n):
    """(cut to 500 x 375 and re-encoded, as shipped) from the foolbox wheel, or None."""
    from PIL import Image
    try:
        folder = Path(importlib.metadata.distribution("foolbox").locate_file("foolbox/data"))
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(folder.glob("imagenet_*.jpg"))[:n]
    if not files:
        return None
    cut = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        ch = min(h, w * 3 // 4)
        cw = ch * 4 // 3
        im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)).resize((500, 375), Image.LANCZOS)
        cut.append(encode(im))
    return cut, [f.read_bytes() for f in files]


def cpu_ms(fn, items):
    """Process CPU milliseconds per item of fn over items."""
    start = time.process_time()
    for i, item in enumerate(items):
        fn(i, item)
    return (time.process_time() - start) * 1e3 / len(items)


def worker_side(jpegs, groups, repeats):
    """Per-image worker CPU ms of both paths (median over repeats, interleaved), with the parts."""
    worker, device = hvp.MultiViewTransform(groups), hvp.MultiViewTransform(groups, crops="device")
    sizes = [hvp.oriented_size(hvp_run.open_image(b)) for b in jpegs]
    runs = {k: [] for k in ("decode", "params", "worker", "device", "collate_worker", "collate_device")}
    outputs = {}
    for transform in (worker, device):  # warm-up: imports, first-call initialisation
        hvp.collate_views([transform(hvp_run.open_image(jpegs[0]), torch.Generator().manual_seed(0))])
    for _ in range(repeats):
        runs["decode"].append(cpu_ms(lambda i, b: hvp_run.decode_image(b), jpegs))
        runs["params"].append(cpu_ms(lambda i, hw: worker.sample_params(*hw, torch.Generator().manual_seed(i)), sizes))
        for mode, transform in (("worker", worker), ("device", device)):
            samples = []
            runs[mode].append(cpu_ms(lambda i, b: samples.append(transform(hvp_run.open_image(b), torch.Generator().manual_seed(i))),
                                     jpegs))
            start = time.process_time()
            hvp.collate_views(samples)
            runs["collate_" + mode].append((time.process_time() - start) * 1e3 / len(samples))
            outputs[mode] = samples
    med = {k: statistics.median(v) for k, v in runs.items()}
    reduced = [float(s["image_box"][2] / s["image"].shape[1]) for s in outputs["device"]]
    return med, outputs, reduced


class TimedStream(hvp_run.BatchStream):
    """hvp_run.BatchStream unchanged, except that every batch also carries the process CPU time of
    the loader worker that made it, read as it hands the batch over ("worker_cpu_s"): differences
    between two batches of one worker are all it spent in between (its other threads, such as the
    queue's feeder that pickles the previous batch, included)."""

    def __iter__(self):
        for batch in super().__iter__():
            batch["worker_cpu_s"] = torch.tensor(time.process_time(), dtype=torch.float64)
            yield batch


def write_parquet(jpegs, rows, row_group, path):
    """A parquet file in the Hugging Face image layout (image: {bytes, path}, label) holding `rows`
    rows, the JPEGs repeated in turn, in row groups of `row_group` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": jpegs[i % len(jpegs)], "path": None} for i in range(rows)], type=image_type)
    pq.write_table(pa.table({"image": images, "label": pa.array([0] * rows, pa.int64())}), path, row_group_size=row_group)
    return path


def loader_worker_ms(source, groups, crops, batch_size, measured):
    """Per-image CPU ms of one loader worker of the real loader (hvp_run.BatchStream + make_loader, as
    the training scripts run it) making `measured` batches in the steady state. The source has
    (measured + 2) x batch_size rows in row groups of batch_size; with a shuffle buffer of one batch,
    batch k >= 1 reads row group k + 1, so batches 1 ... measured read, decode and collate exactly
    their share (batch 0 also fills the buffer and starts the worker; the last reads nothing)."""
    transform = hvp.MultiViewTransform(groups, crops=crops)
    stream = TimedStream(source, transform, batch_size, batches=measured + 2, shuffle_buffer=batch_size)
    marks = [float(batch["worker_cpu_s"]) for batch in hvp_run.make_loader(stream, 1)]
    return (marks[measured] - marks[0]) * 1e3 / (measured * batch_size)


def timed(fn, device, repeats):
    """Median seconds of fn(): process CPU time on CPU, synchronized wall-clock time on CUDA."""
    fn()  # warm-up (constants, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        else:
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
    return statistics.median(times)


def device_side(outputs, groups, device, batch_size, repeats):
    """Per-image device ms: crop_views, photometric (both paths) for the device path's batch, and
    photometric (both paths) on the worker path's crops."""
    transform = hvp.MultiViewTransform(groups)
    take = [outputs["device"][i % len(outputs["device"])] for i in range(batch_size)]
    dbatch = hvp.collate_views(take)
    wbatch = hvp.collate_views([outputs["worker"][i % len(outputs["worker"])] for i in range(batch_size)])
    for key in ("image", "image_size", "image_box"):
        dbatch[key] = dbatch[key].to(device)
    for name in groups:
        wbatch[name] = wbatch[name].to(device)
    geometry = {name: transform.geometry(name) for name in groups}

    def crops():
        return {name: hvp.crop_views(dbatch["image"], dbatch["image_size"], dbatch["image_box"],
                                     dbatch[name + "_params"], *geometry[name]) for name in groups}
    made = crops()
    out = {"crop_views": timed(crops, device, repeats)}
    for sync_free in (False, True):
        tag = "sync_free" if sync_free else "subsets"
        out["device_photometric_" + tag] = timed(lambda: [hvp.photometric(made[n], dbatch[n + "_params"], sync_free=sync_free)
                                                          for n in groups], device, repeats)
        out["worker_photometric_" + tag] = timed(lambda: [hvp.photometric(wbatch[n], wbatch[n + "_params"], sync_free=sync_free)
                                                          for n in groups], device, repeats)
    out = {k: v * 1e3 / batch_size for k, v in out.items()}
    if device.type == "cuda":  # the device path, as the training step runs it, must never wait for the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for name in groups:
                hvp.views_from_batch(dbatch, name, *geometry[name])
            out["host_syncs"] = "none"
        except RuntimeError as e:
            out["host_syncs"] = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


def loader_table(args, device):
    """The shipped dataset through BatchStream + DataLoader (the training scripts' loader): views/s by
    views per image, workers and crop path (worker: the workers cut the views; device: they send the
    decoded region and the views are cut here, by views_from_batch, timed as "device side")."""
    aug = hvp.ViewAug(size=args.image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
    source = hvp_run.open_source(args.dataset, args.split)
    batches_per_epoch = source.num_rows // args.batch_size
    rows, summary = [], {}
    for n, workers, crops in itertools.product(args.views, args.workers, args.crops):
        transform = hvp.MultiViewTransform({"views": [aug] * n}, crops=crops)
        stream = hvp_run.BatchStream(source, transform, args.batch_size, batches=batches_per_epoch, shuffle_buffer=1000)
        batches = iter(hvp_run.make_loader(stream, workers, pin_memory=device.type == "cuda"))
        for _ in range(1 + 2 * workers):  # warm-up: worker start-up, then drain what they prefetched (2 each)
            batch = next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(batches)
        loader_s = time.perf_counter() - start
        del batches
        on_device = hvp.pixels_to_device(batch, device)
        device_s = timed(lambda: hvp.views_from_batch(on_device, "views", aug.size, aug.interpolation), device,
                         args.batches) * args.batches
        loader_rate = args.batches * args.batch_size * n / loader_s
        device_rate = args.batches * args.batch_size * n / device_s
        summary[f"N={n},workers={workers},crops={crops}"] = {"loader_views_per_s": loader_rate,
                                                             "device_views_per_s": device_rate}
        rows.append((n, workers, crops, loader_rate, device_rate))
    lines = ["", f"Loader (wall clock), {Path(args.dataset).name or args.dataset} [{args.split}], {args.image_size} px views, "
             f"batch {args.batch_size}, {args.batches} batches per setting", "",
             "| N views/image | loader workers | crops on | loader views/s | per worker | images/s | vs N=2 (same workers) "
             f"| device side ({device.type}: crops if on device + photometric) views/s |", "|---|---|---|---|---|---|---|---|"]
    for n, workers, crops, loader_rate, device_rate in rows:
        base = next((r[3] for r in rows if r[0] == 2 and r[1] == workers and r[2] == crops), None)
        lines.append(f"| {n} | {workers} | {crops} | {loader_rate:.0f} | {loader_rate / max(workers, 1):.0f} | "
                     f"{loader_rate / n:.0f} | {'-' if base is None else f'{(loader_rate / n) / (base / 2):.2f}x images/s'} "
                     f"| {device_rate:.0f} |")
    return lines, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="JPEGs per image set")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a loader worker uses 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device side: cpu or cuda")
    parser.add_argument("--device_batch", type=int, default=0, help="images per device-side batch (0: 8 on CPU, 64 on CUDA)")
    parser.add_argument("--device_repeats", type=int, default=2, help="repeats per device-side measurement")
    parser.add_argument("--sets", nargs="+", default=None, help="crop sets to run (names as in the table, first word)")
    parser.add_argument("--worker_batch", type=int, default=16, help="real loader: batch size (and parquet row group)")
    parser.add_argument("--worker_batches", type=int, default=4, help="real loader: measured batches per setting")
    parser.add_argument("--loader", action="store_true", help="also the shipped dataset through the DataLoader")
    parser.add_argument("--dataset", default=hvp_run.DEFAULT_DATASET)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4, 8], help="--loader: views per image (N)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="--loader: worker counts")
    parser.add_argument("--crops", nargs="+", default=["worker"], choices=["worker", "device"],
                        help="--loader: where the views are cut (one row each)")
    parser.add_argument("--batch_size", type=int, default=128, help="--loader: batch size")
    parser.add_argument("--batches", type=int, default=10, help="--loader: measured batches per setting")
    parser.add_argument("--output", default="", help="also write the Markdown table (and a .json) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_size = args.device_batch or (64 if device.type == "cuda" else 8)
    cpu = common.machine(torch.device("cpu"))

    image_sets = {"synthetic 500x375 q90": synthetic_jpegs(args.images)}
    real = real_jpegs(args.images)
    if real:
        image_sets["real 500x375 q90"], image_sets["real as shipped"] = real
    sets = {k: v for k, v in crop_sets().items() if not args.sets or k.split()[0] in args.sets}
    default = "sync_free" if device.type == "cuda" else "subsets"   # photometric's default on this device
    rows, summary = [], {"bars": BARS}
    parquet_dir = tempfile.TemporaryDirectory()
    sources = {name: hvp_run.open_source(write_parquet(jpegs, (args.worker_batches + 2) * args.worker_batch,
                                                       args.worker_batch, Path(parquet_dir.name) / f"{i}.parquet"), "train")
               for i, (name, jpegs) in enumerate(image_sets.items())}
    for (set_name, jpegs), (crop_name, groups) in itertools.product(image_sets.items(), sets.items()):
        med, outputs, reduced = worker_side(jpegs, groups, args.repeats)
        dev = device_side(outputs, groups, device, batch_size, args.device_repeats)
        loader = {f"loader_{mode}": loader_worker_ms(sources[set_name], groups, mode, args.worker_batch,
                                                     args.worker_batches) for mode in ("worker", "device")}
        old, new = med["worker"] + med["collate_worker"], med["device"] + med["collate_device"]
        row = {"images": set_name, "crops": crop_name, "kb": sum(map(len, jpegs)) / len(jpegs) / 1024,
               "reduced": statistics.mean(reduced), **med, "worker_total": old, "device_total": new, **loader, **dev}
        rows.append(row)
        summary[f"{set_name} | {crop_name}"] = row
        print(f"{set_name:22s} {crop_name:22s} real loader worker: worker path {loader['loader_worker']:6.2f} ms, "
              f"device path {loader['loader_device']:5.2f} ms (parts {old:.2f} / {new:.2f}), device side "
              f"{dev['crop_views'] + dev['device_photometric_' + default]:.2f} ms", file=sys.stderr)
    parquet_dir.cleanup()

    lines = [f"Worker CPU per image (process CPU time, {args.threads} thread; real loader: one worker, batches of "
             f"{args.worker_batch}, {args.worker_batches} measured; parts: median of {args.repeats}; "
             f"{args.images} JPEGs per set), {cpu}", "",
             "| images (avg KB) | crop set | real loader worker ms: worker path / device path | device / worker "
             "| images/s per worker core: worker / device | parts: decode | params | crops (worker) | region (device) "
             "| collate worker / device | parts total: worker / device | real loader - parts: worker / device "
             "| mean draft 1/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} ({r['kb']:.0f}) | {r['crops']} | {r['loader_worker']:.2f} / "
                     f"{r['loader_device']:.2f} | {r['loader_device'] / r['loader_worker']:.3f} | "
                     f"{1e3 / r['loader_worker']:.0f} / {1e3 / r['loader_device']:.0f} | {r['decode']:.2f} | "
                     f"{r['params']:.2f} | {r['worker'] - r['decode'] - r['params']:.2f} | "
                     f"{r['device'] - r['decode'] - r['params']:.2f} | {r['collate_worker']:.2f} / "
                     f"{r['collate_device']:.2f} | {r['worker_total']:.2f} / {r['device_total']:.2f} | "
                     f"{r['loader_worker'] - r['worker_total']:.2f} / {r['loader_device'] - r['device_total']:.2f} | "
                     f"{r['reduced']:.2f} |")
    timing = "synchronized wall clock" if device.type == "cuda" else f"process CPU time, {args.threads} thread"
    lines += ["", f"Device side per image ({timing}, batches of {batch_size}, median of {args.device_repeats}), "
              f"{common.machine(device)}", "",
              "| images | crop set | device path: crop_views | photometric subsets | photometric sync-free "
              f"| crop_views + photometric ({default}) | worker path: photometric subsets | sync-free |"
              + (" host syncs (device path) |" if device.type == "cuda" else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else "")]
    for r in rows:
        lines.append(f"| {r['images']} | {r['crops']} | {r['crop_views']:.2f} | {r['device_photometric_subsets']:.2f} | "
                     f"{r['device_photometric_sync_free']:.2f} | {r['crop_views'] + r['device_photometric_' + default]:.2f} | "
                     f"{r['worker_photometric_subsets']:.2f} | "
                     f"{r['worker_photometric_sync_free']:.2f} |" + (f" {r['host_syncs']} |" if device.type == "cuda" else ""))
    hvp_dino = [r for r in rows if r["crops"].startswith("HVP-DINO")]
    if hvp_dino:
        lines += ["", f"Bars (HVP-DINO crop set, device path, real loader worker): CPU <= {BARS['worker_ms']} ms per "
                  f"image and device / worker <= {BARS['ratio']} ({cpu}):"]
        for r in hvp_dino:
            ratio = r["loader_device"] / r["loader_worker"]
            ok = r["loader_device"] <= BARS["worker_ms"] and ratio <= BARS["ratio"]
            lines.append(f"- {r['images']}: {r['loader_device']:.2f} ms, ratio {ratio:.3f}: {'met' if ok else 'NOT met'}")
    if args.loader:
        more, loader_summary = loader_table(args, device)
        lines += more
        summary["loader"] = loader_summary
    common.write(args.output, "\n".join(lines), {"bench": "data", "machine": cpu, "device": common.machine(device),
                                                   "args": vars(args), "results": summary})


if __name__ == "__main__":
    hvp_run.run_main(main)
