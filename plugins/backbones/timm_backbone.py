"""Any timm model as a backbone, through timm's ``features_only`` feature extractors.

``TimmBackbone(model_name="convnext_tiny")`` is ``timm.create_model(model_name, features_only=True,
out_indices=..., pretrained=False, **model_kwargs)`` with its maps renamed by stride, so that every neck
and head reads them as it reads a ResNet's: stride 4 is ``c2``, 8 ``c3``, 16 ``c4``, 32 ``c5``. In general
a stride ``2**k`` is ``ck`` (``c1`` for stride 2, ``c6`` for 64) and another stride ``s<stride>`` (``s14``
for a ViT of 14-pixel patches); maps that would share a name (the blocks of a ViT, all of stride 16) add
their timm level to it (``c4_9``, ``c4_11``). Channels and strides are timm's ``feature_info``; maps that
timm gives channels-last (Swin) are returned as ``[N, C, H, W]``.

timm is an optional dependency: ``pip install 'segkit-cv[timm]'``. The module imports without it, and
building the backbone without it is an error that says so.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segkit.checkpoint import (BACKBONE_INFO_KEY, CONFIG_KEY, CheckpointError, extract_state_dict,
                               load_state_dict_checked, read_checkpoint)
from segkit.errors import UserError, did_you_mean
from segkit.ops import ShapeSpec
from segkit.ops.norm import hold_in_eval
from segkit.registry import BACKBONES
from segkit.weight_names import is_weight_name, resolve_weights, split_weight_name
from segkit.weight_sources import read_weights_file

__all__ = ["TimmBackbone", "import_timm", "level_names"]

INSTALL_HINT = "pip install 'segkit-cv[timm]'"
# Arguments TimmBackbone passes to timm itself: model_kwargs may not set them.
_OWN_ARGUMENTS = {"features_only": None, "pretrained": "pretrained", "out_indices": "out_indices",
                  "img_size": "img_size", "dynamic_img_size": "dynamic_img_size"}
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def import_timm() -> Any:
    """The ``timm`` module.

    Raises:
        UserError: timm is not installed (the message says how to install it).
    """
    try:
        import timm
    except ImportError:
        raise UserError(f"the TimmBackbone backbone needs the timm package, which is not installed: {INSTALL_HINT} "
                        f"(or pip install 'timm>=1.0,<2').") from None
    return timm


def level_names(strides: Sequence[int], levels: Sequence[int]) -> list[str]:
    """segkit's names of maps of the given strides at the given timm levels (``feature_info`` indices).

    Example:
        >>> level_names([4, 8, 16, 32], [0, 1, 2, 3])
        ['c2', 'c3', 'c4', 'c5']
        >>> level_names([16, 16, 14], [9, 11, 3])
        ['c4_9', 'c4_11', 's14']
    """
    base = [f"c{s.bit_length() - 1}" if s > 0 and s & (s - 1) == 0 else f"s{s}" for s in map(int, strides)]
    counts = Counter(base)
    return [f"{name}_{level}" if counts[name] > 1 else name for name, level in zip(base, levels)]


@BACKBONES.register()
class TimmBackbone(nn.Module):
    """A timm model's feature extractor (``features_only``) returning its maps named by stride.

    The maps are those of timm's ``feature_info`` levels in ``out_indices``, named ``c2`` (stride 4),
    ``c3`` (8), ``c4`` (16), ``c5`` (32); ``c1`` / ``c6`` for strides 2 / 64, ``s<stride>`` for a stride
    that is not a power of two, and ``<name>_<level>`` where several maps share a stride. ConvNeXt,
    Swin, EfficientNet, RegNet and ResNet give ``c2``..``c5`` by default.

    Input size: convolutional models take any size (segkit pads the batch to ``size_divisor``, 32).
    Models with a patch embedding of fixed size (Swin, ViT) are built with ``dynamic_img_size=True``
    when timm offers it, so that they too take any size that is a multiple of their patch size; a model
    without it takes only ``img_size`` inputs, and another size is refused with a message saying which
    (give the detector ``fixed_size``, or the segmentor a fixed crop).

    Args:
        model_name: any name of ``timm.list_models()`` (``convnext_tiny``, ``swin_tiny_patch4_window7_224``,
            ``efficientnet_b3``, ``regnety_032``, ``resnet50d``); an unknown name is refused with the
            nearest ones.
        out_indices: timm's levels to return (indices of the model's ``feature_info``, ascending, the
            ``out_indices`` of ``timm.create_model``); ``None``: timm's default levels whose stride is at
            least 4 (so ``c2``..``c5``, without the stride-2 map of ResNet / EfficientNet / RegNet).
        pretrained: the weights, loaded with ``torch.load(..., weights_only=True)`` (or as safetensors):
            a file holding a timm state dict of the whole model as timm saves it (the classifier is
            ignored), of its ``features_only`` model, or a segkit checkpoint (a ``TimmBackbone`` state
            dict, or a whole segkit model whose backbone is this one); or a weight name
            ``timm://ARCH.TAG`` (``timm://convnext_tiny.fb_in1k``) read from timm's caches
            (:mod:`segkit.weight_sources`). Keys of another model, missing keys and shapes that differ
            are errors naming the file.
        img_size: the input size the model is built for (timm's ``img_size``: an int or ``[h, w]``), for
            models with a patch embedding; a model without one refuses it.
        dynamic_img_size: ``None``: timm's ``dynamic_img_size=True`` where the model has it (any input
            size), nothing otherwise; ``True``: required (an error for a model without it); ``False``: the
            model's fixed ``img_size``.
        frozen_stages: ``-1`` trains everything; ``k`` freezes every module up to and including the one
            that computes level ``k`` (timm's ``feature_info`` index, as ``out_indices``), in the order
            the model registers its modules, which is the order it runs them in for the stage-structured
            timm models (stem, stages); parameters the model holds itself, such as a ViT's position
            embedding, are frozen with them. Frozen modules stay in eval mode.
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed) during training.
        model_kwargs: further arguments of ``timm.create_model`` (``drop_path_rate``, ``output_stride``,
            ...).

    Example:
        >>> net = TimmBackbone(model_name="convnext_atto")
        >>> {k: (s.channels, s.stride) for k, s in net.output_shape().items()}
        {'c2': (40, 4), 'c3': (80, 8), 'c4': (160, 16), 'c5': (320, 32)}
        >>> [tuple(v.shape) for v in net(torch.rand(1, 3, 64, 96)).values()][-1]
        (1, 320, 2, 3)
    """

    def __init__(
        self,
        *,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: str | None = None,
        img_size: int | Sequence[int] | None = None,
        dynamic_img_size: bool | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        timm = import_timm()
        _check_model_name(timm, model_name)
        kwargs = dict(model_kwargs or {})
        for key in kwargs:
            if key in _OWN_ARGUMENTS:
                own = _OWN_ARGUMENTS[key]
                raise ValueError(f"model_kwargs.{key} is set by TimmBackbone itself" +
                                 (f": give it as the backbone's argument '{own}'." if own else " (always on)."))
        if img_size is not None:
            kwargs["img_size"] = _size(img_size)
        if out_indices is not None:
            levels = [int(i) for i in out_indices]
            if not levels or any(i < 0 for i in levels) or len(set(levels)) != len(levels):
                raise ValueError(f"out_indices must be distinct non-negative timm levels, got {list(out_indices)}")
            kwargs["out_indices"] = tuple(sorted(levels))
        self.body, self.timm_kwargs = _create_features(timm, model_name, kwargs, dynamic_img_size)
        self.model_name = model_name
        self.arch = {"model_name": model_name}
        self.norm_eval = bool(norm_eval)

        info = self.body.feature_info
        strides, channels = info.reduction(), info.channels()
        levels = [int(i) % len(info) for i in info.out_indices]
        keep = [p for p, s in enumerate(strides) if out_indices is not None or s >= 4]
        if not keep:
            raise ValueError(f"timm's {model_name} has no default level of stride 4 or more (its levels have strides "
                             f"{strides}); choose them with out_indices.")
        names = level_names([strides[p] for p in keep], [levels[p] for p in keep])
        self._outputs = list(zip(names, keep))
        self._shapes = {name: ShapeSpec(int(channels[p]), int(strides[p])) for name, p in self._outputs}
        self._levels = {name: levels[p] for name, p in self._outputs}
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self._channels_last = getattr(fmt, "value", fmt) == "NHWC"
        # The wrapper timm puts around models that extract their maps themselves (FeatureGetterNet: ViT...).
        state_keys = list(self.body.state_dict())
        self._prefix = "model." if state_keys and all(k.startswith("model.") for k in state_keys) else ""
        self._patch_embed = next((m for m in self.body.modules() if hasattr(m, "strict_img_size")
                                  and hasattr(m, "patch_size")), None)
        if pretrained is not None:
            self.load_pretrained(pretrained)
        self.frozen_stages = int(frozen_stages)
        self._frozen, self._frozen_params = self._frozen_parts(self.frozen_stages)
        self._freeze()

    # ------------------------------------------------------------------------------------- shapes
    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned maps, from timm's ``feature_info``."""
        return dict(self._shapes)

    def timm_levels(self) -> dict[str, int]:
        """``{name: timm level}``: which ``feature_info`` index each returned map is."""
        return dict(self._levels)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The maps of the batch Tensor[N, 3, H, W] (normalised), ``[N, C, H / stride, W / stride]`` each.

        Raises:
            ValueError: a model of fixed input size gets another size, or a patch-embedding model a size
                that is not a multiple of its patch size.
        """
        if self._patch_embed is not None:
            self._check_size(tuple(x.shape[-2:]))
        maps = self.body(x)
        if isinstance(maps, Mapping):
            maps = list(maps.values())
        outputs: OrderedDict[str, Tensor] = OrderedDict()
        for name, position in self._outputs:
            feature = maps[position]
            outputs[name] = feature.permute(0, 3, 1, 2).contiguous() if self._channels_last else feature
        return outputs

    def _check_size(self, size: tuple[int, int]) -> None:
        embed = self._patch_embed
        fixed = tuple(embed.img_size) if embed.strict_img_size and embed.img_size is not None else None
        if fixed is not None and size != fixed:
            raise ValueError(
                f"TimmBackbone {self.model_name} was built for {fixed[0]}x{fixed[1]} inputs (timm's img_size) and got "
                f"a {size[0]}x{size[1]} batch. Give the model that input size (the detector's fixed_size, or a fixed "
                f"crop), set the backbone's img_size to the batch size, or use dynamic_img_size: true where the model "
                f"has it.")
        patch = tuple(embed.patch_size)
        if not getattr(embed, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
            raise ValueError(
                f"TimmBackbone {self.model_name} takes inputs whose sides are multiples of its patch size "
                f"{patch[0]}x{patch[1]}, got {size[0]}x{size[1]}: set the model's size_divisor to a multiple of it, "
                f"or model_kwargs.dynamic_img_pad: true where the model has it.")

    # ------------------------------------------------------------------------------------ weights
    def load_pretrained(self, path: str) -> None:
        """Load a file or a ``timm://`` name (see the class docstring) into the feature extractor.

        Raises:
            CheckpointError: the file cannot be read, holds another backbone or model, has keys the
                model does not have or lacks some it has, or a tensor's shape differs (the message
                names the file and the keys).
        """
        if is_weight_name(path):
            state, source = self._named_state(path)
        else:
            state, source = self._file_state(path)
        self._load_state(state, source)

    def _named_state(self, path: str) -> tuple[dict[str, Tensor], str]:
        scheme, name = split_weight_name(path)
        arch = self.model_name.partition(".")[0]
        if scheme != "timm":
            raise CheckpointError(f"TimmBackbone takes timm's weights: write the name as timm://{arch}.TAG "
                                  f"(timm.list_pretrained('{arch}*') lists the tags), not '{path}'.")
        if name.partition(".")[0] != arch:
            raise CheckpointError(f"pretrained weights '{path}' are timm's {name.partition('.')[0]} but the backbone is "
                                  f"{arch}: set model_name: {name.partition('.')[0]}, or choose weights timm://{arch}.TAG.")
        named = resolve_weights(path)
        return named.state_dict, f"pretrained weights '{path}' ({named.file})"

    def _file_state(self, path: str) -> tuple[dict[str, Tensor], str]:
        source = f"pretrained weights '{path}'"
        if str(path).endswith(".safetensors"):
            return read_weights_file(str(path)), source
        ckpt = read_checkpoint(path)
        backbone = ckpt.get(BACKBONE_INFO_KEY)
        if backbone is None and isinstance(ckpt.get(CONFIG_KEY), Mapping):
            backbone = (ckpt[CONFIG_KEY].get("model") or {}).get("backbone")
        if isinstance(backbone, Mapping):
            self._check_arch(backbone, path)
        state = extract_state_dict(ckpt)
        if any(k.startswith("backbone.body.") for k in state):  # a whole segkit model
            state = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
        elif all(k.startswith("body.") for k in state):  # a TimmBackbone's own state dict
            state = {k[len("body."):]: v for k, v in state.items()}
        return state, source

    def _check_arch(self, backbone: Mapping[str, Any], path: str) -> None:
        kind = backbone.get("type")
        if kind not in (None, "TimmBackbone"):
            raise CheckpointError(f"pretrained weights '{path}' are a {kind} backbone's, not a TimmBackbone's; give "
                                  f"them to a {kind} backbone, or choose weights of timm's {self.model_name}.")
        name = backbone.get("model_name")
        if name is not None and str(name).partition(".")[0] != self.model_name.partition(".")[0]:
            raise CheckpointError(f"pretrained weights '{path}' were made for timm's {name} but the backbone is "
                                  f"{self.model_name}: set model_name: {name}, or choose weights of {self.model_name}.")

    def _canonical(self, key: str) -> str:
        """A key as any of timm's layouts of this model names it (whole model, ``features_only`` model,
        flattened stages ``stages_0``): the wrapper's prefix removed, dots as underscores."""
        if self._prefix and key.startswith(self._prefix):
            key = key[len(self._prefix):]
        return key.replace(".", "_")

    def _load_state(self, state: Mapping[str, Tensor], source: str) -> None:
        own = self.body.state_dict()
        by_canonical = {self._canonical(k): k for k in own}
        whole_model = self._whole_model_keys()
        mapped: dict[str, Tensor] = {}
        unknown: list[str] = []
        for key, value in state.items():
            canonical = self._canonical(key)
            if canonical in by_canonical:
                mapped[by_canonical[canonical]] = value
            elif canonical not in whole_model:
                unknown.append(key)
        missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
        if unknown or missing:
            problems = [f"{len(keys)} {kind} key(s) {_few(keys)}" for kind, keys in
                        (("unknown", unknown), ("missing", missing)) if keys]
            raise CheckpointError(
                f"{source} do not fit timm's {self.model_name}: " + " and ".join(problems) + ". Expected a timm state "
                f"dict of {self.model_name} (timm.create_model('{self.model_name}').state_dict(), the classifier is "
                f"ignored), of its features_only model, or a segkit checkpoint of this backbone; weights in another "
                f"library's layout are converted by loading them into the timm model first (timm.create_model(name, "
                f"pretrained=True, pretrained_cfg_overlay=dict(file=PATH))) and saving its state_dict().")
        load_state_dict_checked(self.body, mapped, source=source, strict=False,
                                hint="check model_name and model_kwargs")

    def _whole_model_keys(self) -> set[str]:
        """The canonical keys of the whole timm model (classifier included), built without memory."""
        timm = import_timm()
        kwargs = {k: v for k, v in self.timm_kwargs.items() if k != "out_indices"}
        try:
            with torch.device("meta"):
                model = timm.create_model(self.model_name, pretrained=False, **kwargs)
        except Exception:  # noqa: BLE001 - a model whose construction computes on its tensors: build it for real
            model = timm.create_model(self.model_name, pretrained=False, **kwargs)
        return {k.replace(".", "_") for k in model.state_dict()}

    # ----------------------------------------------------------------------------------- freezing
    def _frozen_parts(self, frozen_stages: int) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules up to and including level ``frozen_stages``'s, and the parameters their enclosing
        modules hold themselves."""
        info = self.body.feature_info
        if not -1 <= frozen_stages < len(info):
            raise ValueError(f"frozen_stages must be in -1..{len(info) - 1} (timm's levels of {self.model_name}), "
                             f"got {frozen_stages}")
        if frozen_stages < 0:
            return [], []
        target = info.get("module", frozen_stages).replace(".", "_")
        names = [name for name, _ in self.body.named_modules() if name]
        level = next((n for n in names if self._canonical(n) == target), None)
        if level is None:
            raise ValueError(f"frozen_stages {frozen_stages}: level {frozen_stages} of {self.model_name} "
                             f"(module {info.get('module', frozen_stages)}) is not part of the feature extractor; "
                             f"choose a level up to the last of out_indices.")
        start = names.index(level)
        end = next((i for i in range(start + 1, len(names)) if not names[i].startswith(level + ".")), len(names))
        modules = dict(self.body.named_modules())
        enclosing = [n for n in names[:start] if level.startswith(n + ".")]
        frozen = [modules[n] for n in names[:end] if n not in enclosing]
        params = [p for n in ["", *enclosing] for p in modules[n].parameters(recurse=False)]
        return frozen, params

    def _freeze(self) -> None:
        for module in self._frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        for p in self._frozen_params:
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> TimmBackbone:
        """Set training mode, keeping frozen modules (and all BatchNorms with ``norm_eval``) in eval mode."""
        super().train(mode)
        if mode:
            hold_in_eval(self._frozen, self, norm_eval=self.norm_eval)
        return self


def _check_model_name(timm: Any, model_name: str) -> None:
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        names = timm.list_models()
        raise ValueError(f"timm has no model '{model_name}'." + (did_you_mean(str(model_name), names) or
                         " Its models: timm.list_models()."))


def _create_features(timm: Any, model_name: str, kwargs: dict[str, Any],
                     dynamic_img_size: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(model_name, features_only=True, pretrained=False, **kwargs)`` and the keyword
    arguments it was built with, ``dynamic_img_size`` added where asked or (``None``) where the model has it."""
    options = dict(kwargs)
    if dynamic_img_size is not False:
        options["dynamic_img_size"] = True
    while True:
        try:
            return timm.create_model(model_name, features_only=True, pretrained=False, **options), options
        except TypeError as exc:
            match = _UNEXPECTED.search(str(exc))
            if match is None:
                raise
            argument = match.group(1)
            if argument == "dynamic_img_size" and dynamic_img_size is None:
                options.pop("dynamic_img_size")
                continue
            where = "model_kwargs." + argument if argument in kwargs and argument != "img_size" else argument
            raise ValueError(f"timm's {model_name} takes no argument '{argument}' (set by the backbone's {where})"
                             + (": its input size is free." if argument in ("img_size", "dynamic_img_size") else
                                ".")) from None
        except (IndexError, AssertionError):
            raise ValueError(_levels_message(timm, model_name, options)) from None
        except RuntimeError as exc:
            raise ValueError(f"timm cannot build {model_name} as a feature extractor (features_only=True): "
                             f"{exc}") from None


def _levels_message(timm: Any, model_name: str, options: Mapping[str, Any]) -> str:
    kwargs = {k: v for k, v in options.items() if k != "out_indices"}
    with torch.device("meta"):
        info = timm.create_model(model_name, pretrained=False, **kwargs).feature_info
    levels = ", ".join(f"{i}: stride {level['reduction']}" for i, level in enumerate(info))
    if "out_indices" not in options:
        return (f"timm's default levels of {model_name} are not all there with these model_kwargs; choose "
                f"out_indices among its levels, {levels}.")
    return f"out_indices {list(options['out_indices'])} are not all levels of timm's {model_name}, whose levels are {levels}."


def _size(value: int | Sequence[int]) -> tuple[int, int]:
    sizes = (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(sizes) != 2 or any(s < 1 for s in sizes):
        raise ValueError(f"img_size must be a positive integer or [height, width], got {value}")
    return sizes  # type: ignore[return-value]


def _few(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
