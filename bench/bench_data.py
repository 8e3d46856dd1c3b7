"""Data-pipeline throughput: views per second for N views per image, by number of loader workers.

    python bench/bench_data.py                                      # shipped dataset, 32 px, N = 2 4 8
    python bench/bench_data.py --image_size 224 --views 2 4 --workers 0 2 4 8 --dataset <hub id | folder>

The loader part is what the training scripts run in their workers: decode, random-resized crop +
flip of every view (hvp.MultiViewTransform; uint8 crops and their recorded parameters), batching.
The device part is hvp.photometric: colour jitter, grayscale, blur, (solarize) and normalisation of
the whole batch of views at once on the training device. Both are measured in the steady state
(after worker start-up, and once the batches the workers prefetched are used up) and reported as views per second; "per worker" divides the loader rate
by the number of worker processes (0 = in the main process, counted as 1). N = 2 is what plain
training needs, N = 4 what HVP's default draws: the ratio column says how much more loading a
hard-view step costs when the loader is the bottleneck.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
from bench import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=hvp.DEFAULT_DATASET)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4, 8], help="views per image (N)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10, help="measured batches per setting")
    parser.add_argument("--output", default="", help="also write the Markdown table (and a .json) here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aug = hvp.ViewAug(size=args.image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
    rows, summary = [], {}
    for n, workers in itertools.product(args.views, args.workers):
        ds, _ = hvp.open_dataset(args.dataset, args.split)
        ds = hvp.shard_for_rank(ds, 0, 1, workers)
        stream = hvp.ViewStream(ds, hvp.MultiViewTransform({"views": [aug] * n}), "image", None, 0, 0, args.batch_size)
        loader = hvp.make_loader(stream, args.batch_size, workers, ds.num_shards)
        batches = iter(loader)
        for _ in range(1 + 4 * workers):  # warm-up: worker start-up, then drain what they prefetched (4 each)
            batch = next(batches)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(batches)
        loader_s = time.perf_counter() - start
        del batches
        views = batch["views"].to(device)
        hvp.photometric(views, batch["views_params"])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.batches):
            hvp.photometric(views, batch["views_params"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        photometric_s = time.perf_counter() - start
        loader_rate = args.batches * args.batch_size * n / loader_s
        device_rate = args.batches * args.batch_size * n / photometric_s
        summary[f"N={n},workers={workers}"] = {"loader_views_per_s": loader_rate, "photometric_views_per_s": device_rate}
        rows.append((n, workers, loader_rate, device_rate))

    lines = [f"Data pipeline, {Path(args.dataset).name or args.dataset} [{args.split}], {args.image_size} px views, "
             f"batch {args.batch_size}, {args.batches} batches per setting, {common.machine(device)}", "",
             "| N views/image | loader workers | loader views/s | per worker | images/s | vs N=2 (same workers) "
             f"| photometric on {device.type} views/s |", "|---|---|---|---|---|---|---|"]
    for n, workers, loader_rate, device_rate in rows:
        base = next((r[2] for r in rows if r[0] == 2 and r[1] == workers), None)
        lines.append(f"| {n} | {workers} | {loader_rate:.0f} | {loader_rate / max(workers, 1):.0f} | {loader_rate / n:.0f} | "
                     f"{'-' if base is None else f'{(loader_rate / n) / (base / 2):.2f}x images/s'} | {device_rate:.0f} |")
    common.write(args.output, "\n".join(lines), {"bench": "data", "machine": common.machine(device),
                                                   "args": vars(args), "results": summary})


if __name__ == "__main__":
    hvp.run_main(main)
