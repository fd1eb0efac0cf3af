"""One short `article` epoch on synthetic data through the real engine: proves the CUDA path
(autocast, channels_last, checkpoints) and prints training images/s before a full GPU run.

usage: PYTHONPATH=src python3 bench/gpu_smoke.py [N_IMAGES]
"""

import sys
import time

import torch

from googlenet.data import ArrayDataset
from googlenet.training.config import resolve_config
from googlenet.training.loop import train

n = int(sys.argv[1]) if len(sys.argv) > 1 else 12800
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), flush=True)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), flush=True)
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
labels = torch.randint(0, 10, (n,), generator=g)
classes = [str(i) for i in range(10)]
train_set = ArrayDataset(images, labels, classes)
val_set = ArrayDataset(images[: n // 5], labels[: n // 5], classes)
cfg = resolve_config("article", None, ["epochs=2", "out=/tmp/googlenet-smoke"])
t0 = time.perf_counter()
result = train(cfg, train_set=train_set, val_set=val_set, progress=False)
for row in result.history:
    print(
        f"epoch {row['epoch']}: {row['images_per_s']:.0f} img/s train, "
        f"epoch {row['epoch_s']:.1f}s, val_acc {row['val_acc']:.1f}%"
    )
print(f"total {time.perf_counter() - t0:.1f}s")
