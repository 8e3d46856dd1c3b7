"""Feature-extraction throughput of the eval harness vs a bare timm forward pass, in one run.

    python bench/bench_features.py                                  # ResNet-18 and ViT-S/16 at 224 px, 128 images
    python bench/bench_features.py --models resnet18:32 --images 2048 --batch_size 256
    python bench/bench_features.py --mixed_precision bf16 --output bench_features.md

harness: what eval/linear.py and eval/knn.py do for one split: read the parquet split by row groups
  (hvp_run.open_source + hvp_run.eval_loader: whole batches made by hvp_run.BatchStream), decode and
  resize + centre-crop every image in the loader workers, run the probe feature model
  (linear.FeatureModel: pooled output, or for ViTs the concatenated [CLS] of the last 4 blocks)
  through `hvp_run.extract_features`, which gathers features and labels.
bare: `model(x)` of the same timm backbone on the same batches, already decoded and in memory.
The two are interleaved (ABAB...) after a warm-up, so drifts of a shared machine hit both alike; the
table reports the median images/s of each and the ratio harness / bare (1.0 = the harness adds
nothing; the bar is >= 0.9). Inputs are the first --images test images of the shipped dataset.
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import hvp_run  # noqa: E402
from eval import common, linear  # noqa: E402


def write_subset(folder, rows):
    """The first `rows` test images of the shipped dataset as a one-split parquet dataset."""
    import pyarrow.parquet as pq
    source = pq.ParquetFile(Path(hvp_run.DEFAULT_DATASET) / "data" / "test-00000-of-00001.parquet")
    (folder / "data").mkdir(parents=True)
    table = source.read().slice(0, rows)
    pq.write_table(table.replace_schema_metadata(source.schema_arrow.metadata),
                   folder / "data" / "test-00000-of-00001.parquet", row_group_size=max(1, rows // 8))


def bench_model(arch, size, args, accelerator, dataset, workdir):
    backbone = hvp_run.create_backbone(arch, size)
    export = hvp_run.export_backbone(backbone, workdir / f"{arch}-{size}", {"input_size": (3, size, size)}, "bench")
    model, _ = common.load_backbone(export)  # the harness loads the backbone as the eval scripts do
    extractor = linear.FeatureModel(model, n_last_blocks=4).to(accelerator.device).eval()
    loader = hvp_run.eval_loader(hvp_run.open_source(str(dataset), "test"), size, accelerator, args.batch_size,
                             args.num_workers)
    batches = [b["image"] for b in loader]  # the same decoded batches, for the bare forward
    count = sum(len(b) for b in batches)

    def harness():
        feats, _, _ = hvp_run.extract_features(extractor, loader, accelerator, desc=f"{arch} harness")
        assert len(feats) == count

    @torch.no_grad()
    def bare():
        for x in batches:
            with accelerator.autocast():
                model(x.to(accelerator.device)).float()

    def timed(fn):
        start = time.perf_counter()
        fn()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - start)

    for _ in range(args.warmup):
        harness(), bare()
    rates = {"harness": [], "bare": []}
    for _ in range(args.repeats):
        rates["harness"].append(timed(harness))
        rates["bare"].append(timed(bare))
    harness_rate, bare_rate = statistics.median(rates["harness"]), statistics.median(rates["bare"])
    kind = "[CLS] x 4" if extractor.vit else "pooled"
    return (f"| {arch} | {size} | {kind} | {extractor.dim} | {count} | {bare_rate:.1f} | {harness_rate:.1f} "
            f"| {harness_rate / bare_rate:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18:224,vit_small:224", help="arch:image_size, comma-separated")
    parser.add_argument("--images", type=int, default=128, help="images per measured pass")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=1, help="loader workers of the harness")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3, help="measured passes of each kind (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default="", help="also write the Markdown table to this file")
    args = parser.parse_args()

    accelerator = hvp_run.make_accelerator(args.mixed_precision, 1, "none", ".")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_subset(workdir / "data", args.images)
        for spec in args.models.split(","):
            arch, size = spec.split(":")
            rows.append(bench_model(arch, int(size), args, accelerator, workdir / "data", workdir))
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    table = "\n".join([
        f"Feature extraction, {device}, torch {torch.__version__}, precision {args.mixed_precision}, "
        f"batch {args.batch_size}, {args.num_workers} loader worker(s), median of {args.repeats}.", "",
        "| model | px | features | dim | images | bare timm forward (img/s) | eval harness (img/s) | harness / bare |",
        "|---|---|---|---|---|---|---|---|", *rows]) + "\n"
    print("\n" + table)
    if args.output:
        Path(args.output).write_text(table)
    accelerator.end_training()


if __name__ == "__main__":
    main()
