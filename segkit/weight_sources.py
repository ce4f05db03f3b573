"""The built-in weight sources: ``torchvision://`` and ``timm://`` names (:mod:`segkit.weight_names`).

``torchvision://MODEL`` (the model's default weights), ``torchvision://MODEL.TAG`` or
``torchvision://ENUM.TAG`` (``resnet50.IMAGENET1K_V1``, ``ResNet50_Weights.IMAGENET1K_V1``): any
model of ``torchvision.models.list_models()``, found with torchvision's weight enums and read from
torch.hub's cache, ``$TORCH_HOME/hub/checkpoints/<file of the URL>`` (downloaded there by
``WeightsEnum.get_state_dict`` when missing).

``timm://ARCH`` (the default pretrained tag) or ``timm://ARCH.TAG`` (``resnet50c.gluon_in1k``): any
name of ``timm.list_pretrained()``. The file is looked for, in order, as
``$TORCH_HOME/hub/checkpoints/ARCH.TAG.safetensors`` (a copy of the Hugging Face file, for machines
without internet), as the file of the pretrained config's legacy URL in the same folder (timm's old
cache), and in the Hugging Face hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``,
``models--timm--ARCH.TAG/snapshots/<revision>/model.safetensors``), where ``huggingface_hub``
downloads it when missing: the ``hf_hub_id`` of timm's pretrained config, ``model.safetensors``
before ``pytorch_model.bin`` as timm itself does. The timm model is never built.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from torch import Tensor

from segkit.checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from segkit.errors import did_you_mean
from segkit.registry import WEIGHT_SOURCES
from segkit.weight_names import (
    NamedWeights,
    WeightSource,
    not_available_error,
    torch_checkpoints_dir,
)

__all__ = ["TorchvisionWeights", "TimmWeights", "read_weights_file"]


def read_weights_file(path: str) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a PyTorch file (read with ``weights_only=True``)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as exc:  # noqa: BLE001 - every failure here is a bad file
            raise CheckpointError(f"cannot read '{path}': it is truncated or not a safetensors file "
                                  f"({type(exc).__name__}: {exc}).") from None
    return extract_state_dict(read_checkpoint(path))


# ------------------------------------------------------------------------------------- torchvision
def _torchvision_weights(name: str) -> Any:
    """The weights enum member ``name`` stands for (``resnet50``, ``resnet50.IMAGENET1K_V1``,
    ``ResNet50_Weights.IMAGENET1K_V1``, ``ResNet50_Weights``)."""
    from torchvision.models import get_model_weights, list_models

    head, _, tag = name.partition(".")
    if "_Weights" in head:
        enums = {get_model_weights(m).__name__: get_model_weights(m) for m in list_models()}
        if head not in enums:
            raise CheckpointError(f"torchvision has no weights enum '{head}'." + did_you_mean(head, list(enums)))
        enum = enums[head]
    else:
        models = list_models()
        if head not in models:
            raise CheckpointError(f"torchvision has no model '{head}'." + (did_you_mean(head, models) or
                                  " Its models: torchvision.models.list_models()."))
        enum = get_model_weights(head)
    tag = tag or "DEFAULT"
    members = list(enum.__members__)
    if tag not in members:
        raise CheckpointError(f"torchvision's {enum.__name__} has no weights '{tag}'; it has "
                              f"{', '.join(members)}." + did_you_mean(tag, members))
    return enum[tag]


@WEIGHT_SOURCES.register("torchvision")
class TorchvisionWeights(WeightSource):
    """``torchvision://resnet50`` (default weights), ``torchvision://resnet50.IMAGENET1K_V1`` or
    ``torchvision://ResNet50_Weights.IMAGENET1K_V1``: torchvision's weights, from torch.hub's cache
    ``$TORCH_HOME/hub/checkpoints`` (downloaded there when missing)."""

    source = "torchvision"

    def resolve(self, name: str) -> NamedWeights:
        weights = _torchvision_weights(name)
        folder = torch_checkpoints_dir()
        file = os.path.basename(urlparse(weights.url).path)
        path = os.path.join(folder, file)
        if os.path.isfile(path):
            state = read_weights_file(path)
        else:
            try:
                state = weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - no network, a proxy, a full disk: all say where the file goes
                raise not_available_error(f"torchvision://{name} ({weights})", file=file, url=weights.url,
                                          folder=folder, reason=exc) from None
            state = extract_state_dict(state)
        return NamedWeights(f"torchvision://{name}", self.source, dict(state), path)


# ------------------------------------------------------------------------------------------- timm
def _timm_config(name: str) -> Any:
    """timm's pretrained config of ``name`` (``ARCH`` or ``ARCH.TAG``)."""
    try:
        import timm
    except ImportError:
        raise CheckpointError(f"timm://{name} needs the timm package: pip install timm") from None
    try:
        config = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # the architecture exists, the tag does not
        arch = name.partition(".")[0]
        tags = timm.list_pretrained(arch)
        raise CheckpointError(f"timm has no pretrained weights '{name}'; {arch} has {', '.join(tags)}."
                              + did_you_mean(name, tags)) from None
    if config is None:
        known = timm.list_pretrained()
        hint = did_you_mean(name, known + sorted({n.partition('.')[0] for n in known}))
        raise CheckpointError(f"timm has no pretrained weights '{name}'." + (hint or " Its names: timm.list_pretrained()."))
    if config.custom_load:
        raise CheckpointError(f"timm://{name}: timm loads these weights with model-specific code (custom_load); "
                              f"segkit reads only plain state dicts.")
    return config


def _hf_download(repo: str, filenames: list[str]) -> tuple[str | None, BaseException | None]:
    """The local path of the first of ``filenames`` in the Hugging Face repo (from the cache, or
    downloaded into it), or ``(None, the error)``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    error: BaseException | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, revision=revision or None), None
        except LocalEntryNotFoundError as exc:  # offline, or the hub unreachable, and not cached
            error = error or exc
        except EntryNotFoundError as exc:  # the repo has no such file: try the next
            error = error or exc
        except Exception as exc:  # noqa: BLE001 - network and hub errors all say where the file goes
            return None, exc
    return None, error


@WEIGHT_SOURCES.register("timm")
class TimmWeights(WeightSource):
    """``timm://resnet50c.gluon_in1k`` or ``timm://seresnext50_32x4d`` (default tag): timm's weights,
    from ``$TORCH_HOME/hub/checkpoints/ARCH.TAG.safetensors`` or the Hugging Face hub cache
    (downloaded there when missing), as the pretrained config's ``hf_hub_id`` names them."""

    source = "timm"

    def resolve(self, name: str) -> NamedWeights:
        config = _timm_config(name)
        full = f"{config.architecture}.{config.tag}" if config.tag else config.architecture
        folder = torch_checkpoints_dir()
        legacy = os.path.basename(urlparse(config.url).path) if config.url else None
        for file in (f"{full}.safetensors", f"{full}.pth", f"{full}.bin", legacy):
            if file and os.path.isfile(os.path.join(folder, file)):
                path = os.path.join(folder, file)
                return NamedWeights(f"timm://{name}", self.source, read_weights_file(path), path)
        if config.hf_hub_id:
            filenames = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors",
                                                                                 "pytorch_model.bin"]
            path, error = _hf_download(config.hf_hub_id, filenames)
            url = f"https://huggingface.co/{config.hf_hub_id.partition('@')[0]}/resolve/main/{filenames[0]}"
        else:
            path, error, url = self._url_download(config.url, folder)
        if path is None:
            raise not_available_error(f"timm://{name} ({full})", file=f"{full}{os.path.splitext(url)[1]}", url=url,
                                      folder=folder, reason=error or "no source", alternative=_hf_alternative(config))
        return NamedWeights(f"timm://{name}", self.source, read_weights_file(path), path)

    @staticmethod
    def _url_download(url: str | None, folder: str) -> tuple[str | None, BaseException | None, str]:
        if not url:
            return None, None, "(no URL in timm's pretrained config)"
        from torch.hub import download_url_to_file

        path = os.path.join(folder, os.path.basename(urlparse(url).path))
        try:
            os.makedirs(folder, exist_ok=True)
            download_url_to_file(url, path, progress=True)
        except Exception as exc:  # noqa: BLE001 - no network, a proxy, a full disk
            return None, exc, url
        return path, None, url


def _hf_alternative(config: Any) -> str:
    if not config.hf_hub_id:
        return ""
    from huggingface_hub import constants

    repo = config.hf_hub_id.partition("@")[0]
    return (f"Or copy the Hugging Face cache folder models--{repo.replace('/', '--')} of a machine that downloaded "
            f"it (`hf download {repo} model.safetensors`) into {constants.HF_HUB_CACHE} ($HF_HUB_CACHE).")
