"""Data: CIFAR, image folders, shards, the batch loader and augmentation.

- build: a run's data sets from its config (training), and its validation set rebuilt from a
  checkpoint's record (evaluate, the report), by the same functions
- arrays: ArrayDataset (in memory), the seeded stratified samples (limits, hold-out), the
  normalisation statistics, the data folder
- cifar: CIFAR-10/100 in every official layout, and their download
- folders, listing: folders of class sub-folders, listed fast and decoded when read
- shards: WebDataset shards, written from a folder and streamed into training
- loader, augment: the batch loader and its batch-wise augmentation

The names below are the package's public face, imported on first use (PEP 562), so importing
one submodule does not load the others.
"""

from __future__ import annotations

from googlenet import lazy

# Public name -> the module that defines it.
_PUBLIC = {
    **dict.fromkeys(
        ["DATA_ENV", "MAX_BAD", "ArrayDataset", "check_unreadable", "hold_out", "norm_stats",
         "resolve_data_root", "split_indices", "stratified_indices"],
        "googlenet.data.arrays",
    ),
    "Augment": "googlenet.data.augment",
    **dict.fromkeys(
        ["DataConfig", "Data", "setup_data", "load_data", "load_split", "hold_out_split",
         "recorded_val_set", "eval_batches"],
        "googlenet.data.build",
    ),
    **dict.fromkeys(
        ["ARCHIVES", "Archive", "RestrictedUnpickler", "download_cifar", "load_cifar", "md5sum",
         "restricted_loads"],
        "googlenet.data.cifar",
    ),
    **dict.fromkeys(
        ["ImageFolderDataset", "list_image_folder", "load_image_folder",
         "map_classes", "prepare_image"],
        "googlenet.data.folders",
    ),
    **dict.fromkeys(["Listing", "list_folder", "user_cache_dir"], "googlenet.data.listing"),
    **dict.fromkeys(["BatchLoader", "mix_seed"], "googlenet.data.loader"),
    **dict.fromkeys(
        ["ShardLoader", "ShardSet", "load_shards", "read_index", "write_shards"],
        "googlenet.data.shards",
    ),
}  # fmt: skip


__getattr__, __dir__ = lazy.names(__name__, _PUBLIC)

__all__ = sorted(_PUBLIC)
