"""Insight: see inside the network, and the run report.

- branches: branch usage (energy shares per inception branch) and ablation
- gradcam: where the evidence for a class lies
- features: the first layer's filters and feature visualisation
- plots: the PNG pictures of all of these
- explain: `googlenet explain` (the files written for a checkpoint and some images)
- report: RUN/report.html

The analysis functions are re-exported here; `googlenet.explain` (the old module path) is this
package.
"""

from googlenet.insight.branches import (
    BRANCHES,
    BranchUsage,
    ablate,
    branch_energy,
    inception_blocks,
    resolve_layer,
)
from googlenet.insight.explain import ExplainOptions, class_index, data_batches, explain_files
from googlenet.insight.features import (
    FourierImage,
    channel_activation,
    channel_source,
    filters_grid,
    visualise_feature,
)
from googlenet.insight.gradcam import DEFAULT_BLOCK, denormalize, gradcam
from googlenet.insight.plots import (
    ablation_png,
    branch_usage_png,
    features_png,
    gradcam_png,
    overlay,
    png_bytes,
)
from googlenet.insight.report import build_report, report_after_training, write_report

__all__ = [
    "BRANCHES",
    "DEFAULT_BLOCK",
    "BranchUsage",
    "ExplainOptions",
    "FourierImage",
    "ablate",
    "ablation_png",
    "branch_energy",
    "branch_usage_png",
    "build_report",
    "channel_activation",
    "channel_source",
    "class_index",
    "data_batches",
    "denormalize",
    "explain_files",
    "features_png",
    "filters_grid",
    "gradcam",
    "gradcam_png",
    "inception_blocks",
    "overlay",
    "png_bytes",
    "report_after_training",
    "resolve_layer",
    "visualise_feature",
    "write_report",
]
