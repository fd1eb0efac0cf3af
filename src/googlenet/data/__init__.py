"""Data: CIFAR, image folders, shards, the batch loader and augmentation."""
