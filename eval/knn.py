"""Weighted k-NN evaluation of a frozen backbone (the DINO protocol).

Features of the train split form the memory bank, the test split is classified by its k nearest
neighbours (cosine similarity on L2-normalised features), each voting with weight exp(sim / T).

    python eval/knn.py --backbone outputs/simsiam                  # a training output folder
    python eval/knn.py --backbone outputs/simsiam/checkpoint-00000780
    python eval/knn.py --backbone outputs/simsiam/backbone --dataset <hub id | folder | parquet>
    python eval/knn.py --backbone hf-hub:<org>/<repo> --image_size 224
    python eval/knn.py --raw_pixels                                # the floor: k-NN on raw pixels
    accelerate launch --multi_gpu --num_processes 8 eval/knn.py --backbone ... --dataset ILSVRC/imagenet-1k \\
        --test_split validation

Both splits are read whole, in order (hvp_run.eval_loader). Images that cannot be decoded are left out
and counted per split ("skipped_images" in the JSON and on every result line).

Writes a JSON result (--output; default <backbone folder>/eval/knn-<dataset>.json, so never the
knn.json a training run writes; outputs/<org>--<name>/eval/ for a Hub backbone, outputs/raw-pixels/eval/
for --raw_pixels) and prints one line per k.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
import hvp_run  # noqa: E402
from eval import common  # noqa: E402


@dataclass
class Config:
    backbone: str = ""  # training output folder, checkpoint folder, export folder (config.json + model.safetensors) or hf-hub:<id>
    raw_pixels: bool = False  # use flattened normalised pixels as features instead of a backbone (the baseline floor)
    dataset: str = hvp_run.DEFAULT_DATASET  # Hub dataset id, local image folder, or parquet file/folder
    train_split: str = "train"  # memory bank split
    test_split: str = "test"  # query split
    image_column: str = "image"  # dataset column holding images
    label_column: str = "label"  # dataset column holding labels
    image_size: int = 0  # eval crop size; 0 = the size the backbone was trained at (config.json)
    k: str = "10,20,100,200"  # neighbour counts, comma-separated
    temperature: float = 0.07  # vote weight exp(sim / T)
    batch_size: int = 256  # images per process per forward
    num_workers: int = 2  # data loader workers per process
    mixed_precision: str = ""  # auto | no | fp16 | bf16 for feature extraction; empty = accelerate's setting
    output: str = ""  # JSON result file; default <backbone folder>/eval/knn-<dataset>.json


def parse_ks(text):
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise hvp_run.HVPError(f"--k must be comma-separated whole numbers, got {text!r}") from None
    if any(k < 1 for k in ks):
        raise hvp_run.HVPError(f"--k values must be >= 1, got {text!r}")
    return ks


def default_output(cfg):
    """<backbone folder>/eval/knn-<dataset>.json (common.results_folder: outputs/<id> for a Hub backbone)."""
    return common.results_folder("raw-pixels" if cfg.raw_pixels else cfg.backbone) / "eval" / \
        f"knn-{common.dataset_name(cfg.dataset)}.json"


def main():
    cfg, _ = hvp_run.parse_config(Config, description=__doc__.splitlines()[0])
    if not cfg.backbone and not cfg.raw_pixels:
        raise hvp_run.HVPError("give --backbone <folder | checkpoint | hf-hub:id> or --raw_pixels")
    ks = parse_ks(cfg.k)
    accelerator = common.make_accelerator(cfg.mixed_precision)
    sources = [common.open_split(cfg.dataset, split, cfg.image_column, cfg.label_column, accelerator, "k-NN")
               for split in (cfg.train_split, cfg.test_split)]
    if cfg.raw_pixels:
        size = cfg.image_size or 28
        forward, mean, std, name = (lambda x: x.flatten(1)), hvp.IMAGENET_MEAN, hvp.IMAGENET_STD, "raw pixels"
    else:
        model, config = hvp_run.load_backbone(cfg.backbone)
        size, mean, std = common.data_config(config, cfg.image_size)
        forward, name = model.to(accelerator.device).eval(), cfg.backbone

    # One feature pass; every k is then a cheap vote over the same features.
    loaders = [hvp_run.eval_loader(source, size, accelerator, cfg.batch_size, cfg.num_workers, mean, std)
               for source in sources]
    train_feats, train_labels, train_skipped = hvp_run.extract_features(forward, loaders[0], accelerator, cfg.train_split)
    test_feats, test_labels, test_skipped = hvp_run.extract_features(forward, loaders[1], accelerator, cfg.test_split)
    for labels, split in ((train_labels, cfg.train_split), (test_labels, cfg.test_split)):
        common.check_labels(labels, split)
    skipped = {"train": train_skipped, "test": test_skipped}
    results = {"backbone": name, "dataset": cfg.dataset, "image_size": size, "temperature": cfg.temperature,
               "train_samples": len(train_labels), "test_samples": len(test_labels), "skipped_images": skipped,
               "knn": {}}
    for k in ks:
        top1, top5 = hvp_run.knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, cfg.temperature)
        results["knn"][str(k)] = {"top1": top1, "top5": top5}
        if accelerator.is_main_process:
            print(f"k-NN {name} on {Path(cfg.dataset).name or cfg.dataset} [{cfg.test_split}] k={k}: "
                  f"top-1 {top1:.2f} %, top-5 {top5:.2f} % | {common.skipped_text(skipped)}", flush=True)
    if accelerator.is_main_process:
        output = Path(cfg.output) if cfg.output else default_output(cfg)
        common.write_result(output, results)
        print(f"results written to {output}", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    hvp_run.run_main(main)
