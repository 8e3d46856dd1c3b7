"""Build the shipped Fashion-MNIST subset in the Hugging Face datasets parquet layout.

Source: the Debian package `dataset-fashion-mnist` (Zalando SE, MIT licence), which installs the
original IDX files under /usr/share/datasets/fashion-mnist:

    apt-get install -y dataset-fashion-mnist
    python data/build_fashion_mnist.py                      # the shipped 10k/2k subset
    python data/build_fashion_mnist.py --train 60000 --test 10000 --out data/fashion_mnist_full

The first `--train` training images and the first `--test` test images are taken in file order
(both are close to class-balanced). Each image is stored as PNG bytes in an `image` column, with a
`label` ClassLabel column, so `datasets.load_dataset(<folder>)` reads it offline and the files are
self-contained. Row groups are small on purpose: `IterableDataset.reshard()` turns each one into a
shard, so 2, 4, 8 or 16 processes x workers each stream a disjoint part.
"""
import argparse
import gzip
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SOURCE = Path("/usr/share/datasets/fashion-mnist")
LICENSE_FILE = Path("/usr/share/doc/dataset-fashion-mnist/copyright")


def read_idx(path):
    """Read an IDX file (the MNIST container format: magic, dims, then raw uint8 data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images, labels, path, rows_per_group):
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array, mode="L").save(buf, format="PNG", optimize=True)
        return {"bytes": buf.getvalue(), "path": None}
    table = datasets.Dataset.from_dict(
        {"image": [png(a) for a in images], "label": [int(y) for y in labels]}, features=features)
    table.to_parquet(str(path), batch_size=rows_per_group)
    print(f"wrote {path} ({len(labels)} images, {path.stat().st_size / 1e6:.1f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SOURCE), help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--out", default=str(Path(__file__).parent / "fashion_mnist_small"))
    parser.add_argument("--train", type=int, default=10000, help="number of training images (first N)")
    parser.add_argument("--test", type=int, default=2000, help="number of test images (first N)")
    args = parser.parse_args()

    source = Path(args.source)
    if not (source / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"error: no Fashion-MNIST files in {source}; run `apt-get install -y dataset-fashion-mnist`")
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    splits = ""
    for split, prefix, n in (("train", "train", args.train), ("test", "t10k", args.test)):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        path = out / "data" / f"{split}-00000-of-00001.parquet"
        # 16 row groups per split: a shard count divisible by 1, 2, 4, 8 and 16 readers.
        write_split(images, labels, path, rows_per_group=-(-n // 16))
        splits += f"  - name: {split}\n    num_bytes: {path.stat().st_size}\n    num_examples: {n}\n"
    if LICENSE_FILE.exists():
        shutil.copy(LICENSE_FILE, out / "LICENSE")
    names = "".join(f"          '{i}': {c}\n" for i, c in enumerate(CLASSES))
    # The YAML header is a Hugging Face dataset card: `load_dataset` reads the features and the
    # split sizes from it, so a streaming reader knows the epoch length without a counting pass.
    (out / "README.md").write_text(
        "---\nlicense: mit\ntask_categories:\n- image-classification\n"
        "configs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*\n"
        "dataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n"
        "    dtype:\n      class_label:\n        names:\n" + names +
        "  splits:\n" + splits + "---\n\n"
        "# Fashion-MNIST subset\n\n"
        f"The first {args.train} training and first {args.test} test images of Fashion-MNIST\n"
        "(Xiao, Rasul, Vollgraf 2017; https://github.com/zalandoresearch/fashion-mnist), 28x28 grayscale,\n"
        "10 classes, stored as PNG bytes in Hugging Face datasets parquet files.\n\n"
        "Built by `data/build_fashion_mnist.py` from the Debian package `dataset-fashion-mnist`.\n"
        "Copyright 2017 Zalando SE, MIT licence: see LICENSE in this folder.\n")

if __name__ == "__main__":
    main()
