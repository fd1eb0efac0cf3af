"""torch.hub.load from this repository (source="local": nothing is downloaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from googlenet.errors import UserError
from googlenet.model import GoogLeNet, list_variants

REPO = Path(__file__).resolve().parents[1]


def test_hub_load_builds_the_bn_network_with_the_asked_classes():
    model = torch.hub.load(str(REPO), "googlenet", source="local", num_classes=5, aux_logits=False)
    assert isinstance(model, GoogLeNet) and model.num_classes == 5
    assert model.spec.name == "bn" and model.aux1 is None
    assert model.fc.out_features == 5


def test_every_variant_has_an_entry_point_and_pretrained_is_a_clear_error():
    for variant in list_variants():
        model = torch.hub.load(str(REPO), f"googlenet_{variant}", source="local")
        assert model.spec.name == variant
        assert (
            model.num_classes
            == model.pretrained_cfg["num_classes"]
            == (10 if variant == "cifar" else 1000)
        )
    with pytest.raises(UserError, match="only googlenet / googlenet_bn have weights"):
        torch.hub.load(str(REPO), "googlenet_paper", source="local", pretrained=True)


def test_hubconf_imports_this_repositorys_package(tmp_path: Path):
    # From another folder, with no PYTHONPATH: the package comes from the repository's src/.
    code = (
        f"import torch; m = torch.hub.load({str(REPO)!r}, 'googlenet_article', source='local', "
        "num_classes=3); import googlenet; print(googlenet.__file__, m.num_classes)"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    path, classes = out.stdout.split()
    assert Path(path).is_relative_to(REPO / "src") and classes == "3"
