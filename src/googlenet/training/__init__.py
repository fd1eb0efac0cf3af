"""Training: the config and recipes, the loop, optimizer, speed-run tricks, fine-tuning, run
folders.

- config.py (+ recipes/*.toml): TrainConfig and how it is resolved
- loop.py: `train(config) -> RunResult`, the epoch and the step
- setup.py: the data sets, model, optimizer, loaders and run folder of a run
- state.py: the run's state, saved in checkpoints and restored on resume
- validation.py: `validate`, a run's per-epoch and final validation, val_predictions.csv
- optim.py: the schedule, SGD, weight averaging; speedrun.py: airbench's tricks in one place
- finetune.py (init, freeze), runs.py (run folders), distributed.py (DDP), interrupt.py

The public names below are imported on first use, so `googlenet.training.config` stays light.
"""

from __future__ import annotations

from googlenet import lazy

# Public name -> the module that defines it. (The old `googlenet.engine` path resolves here.)
_PUBLIC = {
    "train": "googlenet.training.loop",
    "RunResult": "googlenet.training.loop",
    "TrainingDiverged": "googlenet.training.state",
    "validate": "googlenet.training.validation",
    "ValPredictions": "googlenet.training.validation",
    "model_args": "googlenet.training.setup",
    "loader_workers": "googlenet.training.setup",
    "TrainConfig": "googlenet.training.config",
    "resolve_config": "googlenet.training.config",
}


__getattr__, __dir__ = lazy.names(__name__, _PUBLIC)

__all__ = sorted(_PUBLIC)
