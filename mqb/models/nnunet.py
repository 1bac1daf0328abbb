"""nnU-Net v2 ``3d_fullres`` networks, built by ``dynamic-network-architectures`` (the package nnU-Net v2 uses).

:func:`plain_conv_unet` builds ``PlainConvUNet`` with nnU-Net's fixed settings: Conv3d with bias,
InstanceNorm3d(eps 1e-5, affine), no dropout, LeakyReLU(0.01, inplace), conv -> norm -> nonlin, strided-conv
downsampling, transposed-conv upsampling, concatenation skips (upsampled tensor first) and a 1x1x1 head per decoder
stage. With ``deep_supervision=False`` (the default, as nnU-Net's predictor) forward returns one full-resolution
tensor [B, out, D, H, W] (``decoder.seg_layers.{n-2}``); the decoder is swapped for :class:`AllHeadsUNetDecoder`,
which also runs the coarse heads, so that calibration reaches every layer (same outputs, same keys).

:func:`from_plans` rebuilds the network from a trained model's ``plans.json`` (``nnUNetPlans.json``), so its
``checkpoint_final.pth`` (weights under ``network_weights``) loads strictly. :func:`nnunet` is the Hydra entry point
(``conf/model/nnunet.yaml``): the explicit plan, or ``plans=PATH``.

Reference plan (``conf/model/nnunet.yaml``): nnunetv2 2.8.1's planner on a BTCV-like fingerprint (median spacing
[3.0, 0.76, 0.76] mm): 6 stages, features [32, 64, 128, 256, 320, 320], kernels [[1,3,3]] + [[3,3,3]]*5, strides
[[1,1,1],[1,2,2],[2,2,2],[2,2,2],[2,2,2],[1,2,2]], 2 convs per stage, patch [48, 192, 192]: 30,713,158 parameters
with 14 outputs (31,122,758 if the last stride is [2,2,2]). Each input axis must be divisible by the product of
the strides along it (8 x 32 x 32 for this plan). Axes are in nnU-Net's order: nnU-Net transposes the image so the
lowest-resolution axis (z for CT) comes first, which is why the first-stage kernel is 1x3x3.

State-dict aliases: ``state_dict()`` has 292 entries for this plan but only 108 distinct tensors. Each conv unit
registers its conv and norm both as ``.conv`` / ``.norm`` and inside ``.all_modules`` (``all_modules.0`` is
``conv``, ``all_modules.1`` is ``norm``), and the decoder keeps a reference to the encoder, so every ``encoder.*``
key reappears as ``decoder.encoder.*``. nnU-Net saves all 292 and they load strictly (the aliases are real module
paths); a dict holding only the canonical names must be expanded to the aliases first (they are the same tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

#: The BTCV-like reference plan (see the module doc).
BTCV_FEATURES: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
BTCV_KERNELS: tuple[tuple[int, int, int], ...] = ((1, 3, 3),) + ((3, 3, 3),) * 5
BTCV_STRIDES: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))

#: Network classes a plans file may name (``architecture.network_class_name``).
NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": PlainConvUNet,
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": ResidualEncoderUNet,
}

#: torch.nn classes a plans file may name in ``arch_kwargs`` (the keys listed in ``_kw_requires_import``).
#: Either spelling is accepted: ``torch.nn.LeakyReLU`` or ``torch.nn.modules.activation.LeakyReLU``.
_IMPORTABLE: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.GroupNorm,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU,
)  # fmt: skip
ALLOWED_IMPORTS: dict[str, type[nn.Module]] = {
    name: cls for cls in _IMPORTABLE for name in (f"torch.nn.{cls.__name__}", f"{cls.__module__}.{cls.__name__}")
}


class AllHeadsUNetDecoder(UNetDecoder):
    """DNA's ``UNetDecoder`` that evaluates every seg head in every forward, with the same outputs and keys.

    Without deep supervision DNA evaluates only the full-resolution head, so ``decoder.seg_layers.0..n-3`` never
    run and :func:`mqb.quant.calibrate` would refuse them as never reached. Running them (1x1x1 convs at low
    resolution, negligible cost) keeps every quantizable layer calibrated; the returned tensor is unchanged.
    """

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs: list[torch.Tensor] = []
        for s, (up, stage, head) in enumerate(zip(self.transpconvs, self.stages, self.seg_layers, strict=True)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            outputs.append(head(x))
        outputs.reverse()  # full resolution first, as DNA
        return outputs if self.deep_supervision else outputs[0]


def _finish(net: nn.Module, initialize: bool) -> nn.Module:
    """nnU-Net's init (``network.initialize``: He a=1e-2, biases 0) and the all-heads decoder."""
    if initialize:
        net.apply(net.initialize)
    if type(net.decoder) is UNetDecoder:
        net.decoder.__class__ = AllHeadsUNetDecoder
    return net


def _counts(value: int | Sequence[int]) -> int | list[int]:
    return value if isinstance(value, int) else [int(c) for c in value]


def plain_conv_unet(
    in_channels: int = 1,
    out_channels: int = 14,
    features_per_stage: Sequence[int] = BTCV_FEATURES,
    kernel_sizes: Sequence[Sequence[int]] = BTCV_KERNELS,
    strides: Sequence[Sequence[int]] = BTCV_STRIDES,
    n_conv_per_stage: int | Sequence[int] = 2,
    n_conv_per_stage_decoder: int | Sequence[int] = 2,
    deep_supervision: bool = False,
    initialize: bool = True,
) -> PlainConvUNet:
    """nnU-Net v2's ``PlainConvUNet`` (3D) with nnU-Net's fixed settings; ``len(features_per_stage)`` stages.

    ``strides[0]`` is the stride of the first stage (``[1,1,1]`` in every nnU-Net plan). ``initialize`` applies
    nnU-Net's He init (a=1e-2, biases 0), as ``get_network_from_plans`` does.
    """
    n = len(features_per_stage)
    if len(kernel_sizes) != n or len(strides) != n:
        raise ValueError(
            f"plain_conv_unet: features_per_stage ({n} stages), kernel_sizes ({len(kernel_sizes)}) and strides "
            f"({len(strides)}) must have one entry per stage"
        )
    net = PlainConvUNet(
        input_channels=in_channels,
        n_stages=n,
        features_per_stage=[int(f) for f in features_per_stage],
        conv_op=nn.Conv3d,
        kernel_sizes=[[int(k) for k in ks] for ks in kernel_sizes],
        strides=[[int(s) for s in st] for st in strides],
        n_conv_per_stage=_counts(n_conv_per_stage),
        num_classes=out_channels,
        n_conv_per_stage_decoder=_counts(n_conv_per_stage_decoder),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
    return _finish(net, initialize)  # type: ignore[return-value]


def _load_configuration(path: Path, configuration: str) -> dict[str, Any]:
    """``configurations[configuration]`` of a plans file, with ``inherits_from`` resolved."""
    if not path.is_file():
        raise ValueError(f"nnU-Net plans file {str(path)!r} does not exist")
    try:
        plans = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"nnU-Net plans file {str(path)!r} is not valid JSON: {err}") from None
    configs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configs, dict):
        raise ValueError(f"nnU-Net plans file {str(path)!r} has no 'configurations' object")
    chain: list[str] = []
    name: str | None = configuration
    merged: dict[str, Any] = {}
    while name is not None:
        if name in chain:
            raise ValueError(f"nnU-Net plans file {str(path)!r}: configurations.{name}.inherits_from is circular")
        if not isinstance(configs.get(name), dict):
            raise ValueError(
                f"nnU-Net plans file {str(path)!r} has no configuration 'configurations.{name}'; "
                f"available: {', '.join(sorted(configs))}"
            )
        chain.append(name)
        merged = {**configs[name], **merged}  # the child overrides its parent
        name = configs[name].get("inherits_from")
    merged.pop("inherits_from", None)
    return merged


def _resolve_import(value: Any, where: str) -> type[nn.Module] | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ALLOWED_IMPORTS:
        return ALLOWED_IMPORTS[value]
    raise ValueError(
        f"{where} = {value!r} is not allowed: mqb imports only these torch.nn classes from a plans file: "
        f"{', '.join(sorted({c.__name__ for c in ALLOWED_IMPORTS.values()}))} (as torch.nn.<Name>)"
    )


def _architecture_kwargs(config: dict[str, Any], where: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """Network class and constructor kwargs of a new-format (``architecture``) or older-format configuration."""
    arch = config.get("architecture")
    if arch is not None:
        if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
            raise ValueError(f"{where}.architecture must be an object with 'arch_kwargs'")
        class_name = arch.get("network_class_name")
        if class_name not in NETWORK_CLASSES:
            raise ValueError(
                f"{where}.architecture.network_class_name = {class_name!r} is not supported; supported: "
                f"{', '.join(NETWORK_CLASSES)}"
            )
        kwargs = dict(arch["arch_kwargs"])
        requires = arch.get("_kw_requires_import", [])
        if not isinstance(requires, list) or not all(isinstance(k, str) for k in requires):
            raise ValueError(f"{where}.architecture._kw_requires_import must be a list of arch_kwargs names")
        for key in requires:
            if key not in kwargs:
                raise ValueError(f"{where}.architecture._kw_requires_import names {key!r}, missing from arch_kwargs")
            kwargs[key] = _resolve_import(kwargs[key], f"{where}.architecture.arch_kwargs.{key}")
        return NETWORK_CLASSES[class_name], kwargs
    # Older nnU-Net v2 plans (before the 'architecture' entry): UNet_class_name and the plan's sizes.
    required = ("UNet_base_num_features", "n_conv_per_stage_encoder", "n_conv_per_stage_decoder",
                "pool_op_kernel_sizes", "conv_kernel_sizes")  # fmt: skip
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{where} has neither 'architecture' nor the older plan keys; missing {where}.{missing[0]}")
    class_name = config.get("UNet_class_name", "PlainConvUNet")
    classes = {c.__name__: c for c in NETWORK_CLASSES.values()}
    if class_name not in classes:
        raise ValueError(f"{where}.UNet_class_name = {class_name!r} is not supported; supported: {', '.join(classes)}")
    kernels = config["conv_kernel_sizes"]
    dims = {len(k) for k in kernels} if isinstance(kernels, list) and kernels else set()
    if dims not in ({2}, {3}):
        raise ValueError(f"{where}.conv_kernel_sizes must be a non-empty list of 2D or 3D kernel sizes")
    dim = dims.pop()
    n = len(kernels)
    base = int(config["UNet_base_num_features"])
    cap = int(config.get("unet_max_num_features", 320 if dim == 3 else 512))
    per_stage = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
    kwargs = {
        "n_stages": n,
        "features_per_stage": [min(base * 2**i, cap) for i in range(n)],
        "conv_op": nn.Conv3d if dim == 3 else nn.Conv2d,
        "kernel_sizes": kernels,
        "strides": config["pool_op_kernel_sizes"],
        per_stage: config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
    }
    return classes[class_name], kwargs


def from_plans(
    plans_path: str | os.PathLike[str],
    configuration: str = "3d_fullres",
    in_channels: int = 1,
    out_channels: int = 14,
    deep_supervision: bool = False,
    initialize: bool = True,
) -> nn.Module:
    """The network of ``configurations[configuration]`` in an nnU-Net v2 plans file.

    Current format (recent nnunetv2): ``architecture = {network_class_name, arch_kwargs, _kw_requires_import}``; the
    class must be PlainConvUNet or ResidualEncoderUNet of ``dynamic_network_architectures``, and the
    ``arch_kwargs`` named in ``_kw_requires_import`` may only name allow-listed ``torch.nn`` classes (nothing
    else is imported). Older format: ``UNet_class_name``, ``UNet_base_num_features``, ``unet_max_num_features``,
    ``n_conv_per_stage_encoder`` / ``_decoder``, ``pool_op_kernel_sizes``, ``conv_kernel_sizes``, with nnU-Net's
    fixed settings. ``inherits_from`` is followed. ``in_channels`` / ``out_channels`` are the image channels and
    the segmentation heads (labels including background), which nnU-Net takes from ``dataset.json``.

    Raises:
        ValueError: the file is missing or not JSON, or a key is missing or invalid (the message names the file
            and the key).
    """
    path = Path(plans_path)
    config = _load_configuration(path, configuration)
    where = f"nnU-Net plans file {str(path)!r}: configurations.{configuration}"
    network_class, kwargs = _architecture_kwargs(config, where)
    kwargs.pop("deep_supervision", None)  # nnU-Net sets it at build time, not in the plan
    try:
        net = network_class(input_channels=in_channels, num_classes=out_channels, deep_supervision=deep_supervision,
                            **kwargs)  # fmt: skip
    except (TypeError, ValueError, AssertionError, IndexError, KeyError) as err:
        raise ValueError(f"{where}: {network_class.__name__} cannot be built from the plan: {err}") from None
    return _finish(net, initialize)


def nnunet(
    in_channels: int = 1,
    out_channels: int = 14,
    plans: str | os.PathLike[str] | None = None,
    configuration: str = "3d_fullres",
    features_per_stage: Sequence[int] = BTCV_FEATURES,
    kernel_sizes: Sequence[Sequence[int]] = BTCV_KERNELS,
    strides: Sequence[Sequence[int]] = BTCV_STRIDES,
    n_conv_per_stage: int | Sequence[int] = 2,
    n_conv_per_stage_decoder: int | Sequence[int] = 2,
    deep_supervision: bool = False,
) -> nn.Module:
    """Hydra entry point: ``from_plans(plans, configuration)`` if ``plans`` is set (the explicit architecture
    arguments are then ignored), else ``plain_conv_unet`` with the explicit plan (default: the BTCV plan)."""
    if plans is not None:
        return from_plans(plans, configuration, in_channels, out_channels, deep_supervision)
    return plain_conv_unet(in_channels, out_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage,
                           n_conv_per_stage_decoder, deep_supervision)  # fmt: skip
