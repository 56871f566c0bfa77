"""``backbone=timm:<name>``: any timm architecture as an encoder, built without downloading anything.

timm is the library of the field's image encoders (ConvNeXt, EfficientNet, DeiT, Swin, the DINOv2 ViTs);
rather than rewrite them, a run can name one. It is built with ``pretrained=False`` (nothing is fetched:
weights come only from ``backbone.weights``, e.g. a timm checkpoint on disk, whose names are timm's own
and load as they are) and ``num_classes=0``, so its forward returns the pooled features
(``num_features`` wide). Models that take an image size (ViTs) are built for the run's.

timm needs a torchvision that imports, which the pinned CPU torch of the main environment lacks:
``pip install 'probssl[timm]'`` in an environment with a matching torch / torchvision pair
(``make test-vision`` builds one).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from probssl.config import ConfigError

__all__ = ["build_timm_backbone"]


def _import_timm() -> Any:
    try:
        import timm
    except Exception as err:  # noqa: BLE001  (an ImportError, or torchvision failing inside timm's import)
        reason = " ".join(str(err).split())[:120]
        raise ConfigError(
            f"backbone=timm:... needs timm ({type(err).__name__}: {reason}); install it with "
            "pip install 'probssl[timm]' beside a torch whose torchvision imports (make test-vision builds "
            "such an environment), or choose a built-in backbone (probssl list)"
        ) from None
    return timm


def build_timm_backbone(name: str, in_channels: int, image_size: int, **options: Any) -> nn.Module:
    """A timm model as a backbone: [B, in_channels, H, W] → [B, num_features]; ``.out_dim``, ``.options``.

    ``options`` are passed to ``timm.create_model`` (e.g. ``drop_path_rate``), except ``weights``.
    """
    timm = _import_timm()
    weights = options.pop("weights", None)
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown timm model '{name}'; similar names: {', '.join(near) or '(none)'}")
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_channels, **options}
    try:
        try:
            net = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # architectures without an image size (CNNs)
            net = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"timm cannot build '{name}' with {options or 'its defaults'}: {err}") from None
    net.out_dim = int(net.num_features)
    net.options = dict(options)
    if weights is not None:
        from probssl.nn.weights import load_backbone_weights

        net.weights_report = load_backbone_weights(net, weights, f"timm:{name}")
    return net
