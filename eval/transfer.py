"""The paper's transfer table for one backbone: linear probe and fine-tuning on a list of datasets.

For every dataset, eval/linear.py and eval/finetune.py run in this process, one after the other,
with the dataset's preset (eval/finetune.py --help lists the table: Hub id, columns, splits, and the
SimSiam or DINO lr / epochs of DESIGN.md, evaluation protocols; linear probes use the ImageNet
linear protocol, as upstream). Results go to a Markdown table and a JSON file; a dataset that fails
is reported in the table with its one-line error and the others still run; when every evaluation
failed, the command ends with a one-line error (exit status 2) after writing the table.

    python eval/transfer.py --backbone outputs/simsiam --datasets cifar10,cifar100,flowers102,food101
    python eval/transfer.py --backbone outputs/dino --checkpoint_key teacher --protocol dino --evals linear
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval/transfer.py \\
        --backbone hf-hub:<org>/<repo> --datasets cifar10,/data/inat21_mini --batch_size 64

A dataset outside the table (local folder, parquet, other Hub id) uses --train_split/--test_split
and the column flags, and the linear / fine-tuning defaults (or --epochs, --finetune_lr).
Images that cannot be decoded are counted per split in each evaluation's result (JSON), and named
in the table's cell when there are any.
"""
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_run  # noqa: E402
from eval import common, finetune, linear  # noqa: E402  (the evaluations this runs)


@dataclass
class Config:
    backbone: str = ""  # training output folder, checkpoint folder, export folder or hf-hub:<id>
    checkpoint_key: str = ""  # take the backbone weights from this checkpoint state entry (teacher for DINO/iBOT)
    datasets: str = "cifar10,cifar100,flowers102,food101,inat21"  # comma-separated preset names, Hub ids or local paths
    evals: str = "linear,finetune"  # which evaluations to run: linear, finetune or both
    protocol: str = "simsiam"  # lr / epochs column of the fine-tuning presets: simsiam | dino
    train_split: str = "train"  # train split of datasets outside the preset table
    test_split: str = "test"  # test split of datasets outside the preset table
    image_column: str = "image"  # image column of datasets outside the preset table
    label_column: str = "label"  # label column of datasets outside the preset table
    image_size: int = 0  # crop size; 0 = the backbone's training size (224 for ImageNet backbones)
    epochs: int = 0  # override the epochs of every run (0 = presets / script defaults)
    finetune_lr: float = 0.0  # fine-tuning base lr for datasets outside the preset table (0 = finetune.py default)
    cache_views: int = 0  # linear probe: augmented copies of the train features cached once (0 = reference protocol)
    batch_size: int = 64  # images per process per step
    num_workers: int = 2  # data loader workers per process
    mixed_precision: str = ""  # no | fp16 | bf16; empty = accelerate's setting
    output: str = ""  # Markdown table; default <backbone folder>/transfer.md (+ .json next to it); outputs/<org>--<name>/ for a Hub backbone


def dataset_flags(cfg, name):
    """Flags shared by both evaluations for one dataset: its preset, or the generic flags."""
    preset = finetune.transfer_preset(name, cfg.protocol)
    if preset and preset["dataset"] in finetune.TRANSFER:
        raise hvp_run.HVPError(f"{name}: no public Hub copy known; pass a local copy's path in --datasets")
    common = dict(backbone=cfg.backbone, checkpoint_key=cfg.checkpoint_key, image_size=cfg.image_size,
                  batch_size=cfg.batch_size, num_workers=cfg.num_workers, mixed_precision=cfg.mixed_precision)
    if preset:
        data = {k: preset[k] for k in ("dataset", "image_column", "label_column", "test_split")}
        data["train_split"] = "train"
        tuned = dict(lr=preset["lr"], epochs=preset["epochs"])
    else:
        data = dict(dataset=name, train_split=cfg.train_split, test_split=cfg.test_split,
                    image_column=cfg.image_column, label_column=cfg.label_column)
        tuned = dict(lr=cfg.finetune_lr) if cfg.finetune_lr else {}
    return common, data, tuned


def preset_for(presets, dataset):
    """The entry of a script's preset table for `dataset`, looked up as hvp_run.parse_config does (local
    paths by their resolved form)."""
    return {hvp_run.dataset_key(k): v for k, v in presets.items()}.get(hvp_run.dataset_key(dataset), {})


def run_one(cfg, kind, name, accelerator):
    common, data, tuned = dataset_flags(cfg, name)
    epochs = dict(epochs=cfg.epochs) if cfg.epochs else {}
    cache = dict(cache_views=cfg.cache_views) if cfg.cache_views else {}
    if kind == "linear":  # the shipped dataset's CPU preset applies here too
        run_cfg = linear.Config(**{**common, **data, **preset_for(linear.PRESETS, data["dataset"]), **cache, **epochs})
        return linear.run(run_cfg, accelerator)
    flags = {**common, **data, **preset_for(finetune.presets(cfg.protocol), data["dataset"]), **tuned, **epochs}
    run_cfg = finetune.Config(**flags, protocol=cfg.protocol)
    return finetune.run(finetune.resolve_config(run_cfg), accelerator)


def markdown(cfg, rows):
    kinds = cfg.evals.split(",")
    lines = [f"Transfer of `{cfg.backbone}`{f' ({cfg.checkpoint_key})' if cfg.checkpoint_key else ''}: best top-1 % "
             f"over epochs (last epoch in brackets), {cfg.protocol} protocol.", "",
             "| dataset | " + " | ".join({"linear": "linear", "finetune": "fine-tune"}[k] for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for name, results in rows.items():
        cells = []
        for kind in kinds:
            r = results[kind]
            if "error" in r:
                cells.append(f"error: {r['error']}")
                continue
            skipped = {split: n for split, n in r.get("skipped_images", {}).items() if n}
            cells.append(f"{r['best_top1']:.2f} ({r['final_top1']:.2f})"
                         + (f"; {common.skipped_text(skipped)}" if skipped else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    cfg, _ = hvp_run.parse_config(Config, description=__doc__.splitlines()[0])
    if not cfg.backbone:
        raise hvp_run.HVPError("give --backbone <training output | checkpoint | export folder | hf-hub:id>")
    kinds = cfg.evals.split(",")
    if not kinds or any(k not in ("linear", "finetune") for k in kinds):
        raise hvp_run.HVPError(f"--evals must be linear, finetune or linear,finetune, got {cfg.evals!r}")
    if cfg.protocol not in ("simsiam", "dino"):
        raise hvp_run.HVPError(f"--protocol must be simsiam or dino, got {cfg.protocol!r}")
    common.check_precision(cfg.mixed_precision)
    hvp_run.load_backbone(cfg.backbone)  # a backbone that cannot be loaded stops here, not once per dataset
    accelerator = common.make_accelerator(cfg.mixed_precision)
    output = Path(cfg.output) if cfg.output else common.results_folder(cfg.backbone) / "transfer.md"
    rows, start = {}, time.perf_counter()
    for name in cfg.datasets.split(","):
        rows[name] = {}
        for kind in kinds:
            try:
                rows[name][kind] = run_one(cfg, kind, name, accelerator)
            except hvp_run.HVPError as e:  # one bad dataset does not lose the others' results
                rows[name][kind] = {"error": str(e)}
                if accelerator.is_main_process:
                    print(f"error: {name} {kind}: {e}", file=sys.stderr, flush=True)
        if accelerator.is_main_process:  # rewrite after every dataset: partial tables survive a crash
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(markdown(cfg, rows))
            output.with_suffix(".json").write_text(json.dumps(
                {"config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - start, "results": rows}, indent=2))
    if accelerator.is_main_process:
        print(markdown(cfg, rows), flush=True)
    accelerator.end_training()
    if all("error" in result for results in rows.values() for result in results.values()):
        raise hvp_run.HVPError(f"every evaluation failed (the errors are above and in {output})")


if __name__ == "__main__":
    hvp_run.run_main(main)
