"""The run machinery of the HVP training scripts, beside the copyable core (`hvp_utils.py`).

What a run needs around the method's step, written once for the four scripts:

- `config`: the shared flags (`RunConfig`), `parse_config` (presets, recipes), one-line errors.
- `data`: `open_source` (Hub id; image folder, parquet, webdataset .tar or save_to_disk folder;
  .parquet/.tar/.arrow/CSV/JSON files, globs and {a,b}/{000..009} lists; any other `datasets`
  format) and `BatchStream`, which splits a split row-exactly over processes and loader workers.
- `models`: `create_backbone` (timm names, small stems, DINO-style position-embedding resampling).
- `checkpoints`: safetensors checkpoints with a manifest and fall-back, the timm-loadable export,
  `load_backbone` from any source.
- `knn`: weighted k-NN on frozen features.
- `hub`: model cards and the background Hub push.
- `lifecycle`: `Run`, the set-up, resume, signals, logging and finish of a training run (its
  `steps()` yields a `Step` per optimizer step), and `torch_threads`, its CPU thread rule.

The scripts' `main()` and `eval/` use it; `hvp_utils` never imports it.
"""
from .config import (  # noqa: F401
    check_run_config, dataset_key, DEFAULT_DATASET, HVPError, mix_seed, parse_config, progress_bar, REPO_DIR,
    run_main, RunConfig)
from .data import (  # noqa: F401
    BatchStream, decode_image, default_workers, epoch_batches, epoch_ranges, make_loader, open_image,
    open_source, Source, training_batches, usable_cores)
from .models import check_arch, create_backbone, is_vit_arch, set_pos_embed_resample  # noqa: F401
from .checkpoints import (  # noqa: F401
    checkpoint_problem, cleanup_partial_checkpoints, download_hub_backbone, export_backbone, init_backbone,
    latest_checkpoint, load_backbone, load_checkpoint, save_checkpoint)
from .knn import eval_loader, EvalTransform, extract_features, knn_accuracy, knn_classify  # noqa: F401
from .hub import HUB_CUSTOM_LIBRARY, HUB_DATASETS, HUB_LICENSE, HubPusher, model_card  # noqa: F401
from .lifecycle import (  # noqa: F401
    make_accelerator, on_main, resolve_precision, Run, RunLock, save_view_grid, Step, torch_threads)
