"""Weight caches for tests: torch.hub's and Hugging Face's under a temporary folder, offline, with
randomly initialised stand-ins planted where the libraries look for the real files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch
import torchvision

HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_caches(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch.hub and Hugging Face caches under ``root``, offline; a download attempt raises."""
    import huggingface_hub.constants as hf_constants
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, when imported.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def no_download(url, *args, **kwargs):
        raise OSError(f"test: no network ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return root


def torchvision_file(name: str) -> Path:
    weights = torchvision.models.get_weight(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def plant_torchvision(name: str, state: dict[str, torch.Tensor]) -> Path:
    """Save ``state`` where torch.hub keeps the file of the weights enum ``name`` (``ResNet18_Weights.IMAGENET1K_V1``)."""
    path = torchvision_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def plant_hf(repo: str, state: dict[str, torch.Tensor], filename: str = "model.safetensors") -> Path:
    """Save ``state`` in the Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(HF_COMMIT)
    snapshot = folder / "snapshots" / HF_COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / filename))
    return snapshot / filename


def random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random values of ``model``'s shapes (built on any device), small enough for a finite forward."""
    torch.manual_seed(0)

    def value(key: str, like: torch.Tensor) -> torch.Tensor:
        if not like.is_floating_point():
            return torch.zeros(like.shape, dtype=like.dtype)
        return torch.rand(like.shape) + 0.5 if key.endswith("running_var") else torch.randn(like.shape) * 0.05

    return {k: value(k, v) for k, v in model.state_dict().items()}


def plant_standin(name: str) -> dict[str, torch.Tensor]:
    """Random weights of the model ``name`` stands for, built by its library and planted in its cache."""
    scheme, _, model_name = name.partition("://")
    if scheme == "torchvision":
        weights = torchvision.models.get_weight(model_name) if "_Weights" in model_name else None
        if weights is None:
            arch, _, tag = model_name.partition(".")
            weights = torchvision.models.get_model_weights(arch)[tag or "DEFAULT"]
        builder = model_name.partition(".")[0] if "_Weights" not in model_name else _builder_of(weights)
        detectors = torchvision.models.list_models(module=torchvision.models.detection)
        extra = {"weights_backbone": None} if builder in detectors else {}  # no ImageNet download for the build
        with torch.device("meta"):
            model = torchvision.models.get_model(builder, weights=None, **extra)
        state = random_state(model)
        plant_torchvision(str(weights), state)
    else:
        import timm

        config = timm.models.get_pretrained_cfg(model_name)
        with torch.device("meta"):
            model = timm.create_model(config.architecture, pretrained=False)
        state = random_state(model)
        plant_hf(config.hf_hub_id, state)
    return state


def _builder_of(weights: Any) -> str:
    """The torchvision model builder whose weights enum holds ``weights``."""
    for name in torchvision.models.list_models():
        if weights in list(torchvision.models.get_model_weights(name)):
            return name
    raise ValueError(f"no torchvision model takes {weights}")
