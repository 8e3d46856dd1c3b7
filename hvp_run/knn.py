"""Weighted k-NN accuracy on frozen features (the evaluation every run ends with)."""

import torch
import torch.nn.functional as F

from hvp_utils import IMAGENET_MEAN, IMAGENET_STD
from .config import progress_bar
from .data import BatchStream, make_loader


class EvalTransform:
    """Resize the shorter side to size / crop_pct, centre-crop `size`, normalise (k-NN, linear)."""

    def __init__(self, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic"):
        self.size, self.mean, self.std, self.crop_pct, self.interpolation = size, mean, std, crop_pct, interpolation

    def __call__(self, image, generator=None):
        import torchvision.transforms.v2.functional as TF
        mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        x = TF.resize(TF.pil_to_tensor(image), int(self.size / self.crop_pct), interpolation=mode, antialias=True)
        x = TF.center_crop(x, [self.size, self.size]).float().div_(255)
        return {"image": TF.normalize(x, list(self.mean), list(self.std))}


# ----------------------------------------------------------------------------------- k-NN

@torch.no_grad()
def extract_features(forward, loader, accelerator, desc="features"):
    """Run `forward` over a loader of {"image", "label", "skipped"} batches on every process and
    gather the (features, labels) of all processes onto every process. Returns (features, labels,
    number of images that could not be decoded, over all processes)."""
    feats, labels, skipped = [], [], 0
    for batch in _bar_over(loader, desc, accelerator.is_local_main_process):
        with accelerator.autocast():
            f = forward(batch["image"].to(accelerator.device, non_blocking=True))
        feats.append(f.float())
        labels.append(batch["label"].to(accelerator.device))
        skipped += int(batch.get("skipped", 0))
    device = accelerator.device
    feats = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator.num_processes > 1:  # ranks hold different counts: pad, gather, strip the padding
        count = accelerator.gather(torch.tensor([len(labels)], device=device))
        skipped = int(accelerator.reduce(torch.tensor([skipped], device=device), reduction="sum").item())
        dim = int(accelerator.gather(torch.tensor([feats.shape[1]], device=device)).max())
        if feats.shape[1] != dim:  # this rank had no data
            feats = torch.zeros(0, dim, device=device)
        feats = accelerator.gather(accelerator.pad_across_processes(feats, dim=0))
        labels = accelerator.gather(accelerator.pad_across_processes(labels, dim=0, pad_index=-1))
        longest = len(labels) // len(count)
        keep = torch.cat([torch.arange(longest, device=device) < c for c in count])
        feats, labels = feats[keep], labels[keep]
    return feats, labels, skipped


def _rows_of(loader):
    """Images this process's evaluation loader reads (the split's rows as epoch_ranges divides them),
    None for other loaders."""
    stream = getattr(loader, "dataset", None)
    if not isinstance(stream, BatchStream) or stream.batches is not None:
        return None
    rows = stream.source.num_rows
    return rows * (stream.rank + 1) // stream.world - rows * stream.rank // stream.world


def _bar_over(loader, desc, enabled):
    """The loader's batches, with a progress bar in images (undecodable ones included) out of the
    process's rows."""
    bar = progress_bar(_rows_of(loader), desc=desc, enabled=enabled)
    for batch in loader:
        yield batch
        bar.update(len(batch["label"]) + int(batch.get("skipped", 0)))
    bar.close()


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, k=20, temperature=0.07, num_classes=None, chunk=1024):
    """Weighted k-NN (the DINO protocol): cosine similarity on L2-normalised features, the k nearest
    training samples vote for their class with weight exp(sim / T). Returns class scores (M, C)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, temperature=0.07):
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier."""
    num_classes = int(torch.cat([train_labels, test_labels]).max()) + 1
    scores = knn_classify(train_feats, train_labels, test_feats, k, temperature, num_classes)
    top = scores.topk(min(5, num_classes), dim=1).indices
    top1 = (top[:, 0] == test_labels).float().mean().item() * 100
    top5 = (top == test_labels[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def eval_loader(source, image_size, accelerator, batch_size, num_workers, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A loader over this process's part of an evaluation split: every image once, in order, resized
    and centre-cropped (EvalTransform), not augmented."""
    stream = BatchStream(source, EvalTransform(image_size, mean, std), batch_size, rank=accelerator.process_index,
                         world=accelerator.num_processes)
    return make_loader(stream, num_workers, pin_memory=torch.cuda.is_available())


def knn_eval(forward, accelerator, train_source, test_source, image_size, batch_size=256, num_workers=2, k=20,
             temperature=0.07, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """k-NN accuracy of frozen features: memory bank = the train Source, queries = the test Source."""
    train_feats, train_labels, skipped_train = extract_features(
        forward, eval_loader(train_source, image_size, accelerator, batch_size, num_workers, mean, std), accelerator,
        f"k-NN {train_source.split}")
    test_feats, test_labels, skipped_test = extract_features(
        forward, eval_loader(test_source, image_size, accelerator, batch_size, num_workers, mean, std), accelerator,
        f"k-NN {test_source.split}")
    top1, top5 = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, temperature)
    return {"knn_top1": top1, "knn_top5": top5, "k": k, "temperature": temperature,
            "train_samples": len(train_labels), "test_samples": len(test_labels),
            "skipped_images": skipped_train + skipped_test}
