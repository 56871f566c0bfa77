"""Local pretrained weights for a backbone (``backbone.weights=PATH``): read safely, matched by name, loaded.

What a practitioner has on disk is a state dict in one of three layouts, often wrapped:

- **this project's** names (``stem.0.weight``, ``stages.0.0.conv1.weight``, ``blocks.0.attn.qkv.weight``);
  a run directory or its ``model.safetensors`` holds the whole method, whose ``backbone.*`` tensors are
  taken (the shortest prefix that fits wins, so ``backbone.`` beats ProSMIN's ``target.backbone.``);
- **torchvision's ResNet** names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, …,
  and a classifier ``fc`` that an encoder does not have); timm's ResNets use the same names;
- **timm's ViT** names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, …),
  which are this project's ViT names as they are (:mod:`probssl.nn.vit`).

Any prefix before the names (``module.`` of DDP, ``backbone.`` of lightly / solo-learn, ``encoder.``, a
nesting under ``state_dict`` / ``model`` / ``teacher``) is found by matching, not by a list. Files are
read without unpickling code: ``.safetensors`` with safetensors, ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``
with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.

A tensor whose shape differs is an error naming the key and both shapes, with two exceptions that the
field adapts as a matter of course: ViT position embeddings made for another image size are resampled
(:meth:`VisionTransformer.adapt_weight`), and an RGB first convolution loaded for grey images is summed
over its input channels (timm's ``adapt_input_conv``). Fewer than half of the backbone's tensors
matching means the file is for another architecture: an error, not a silently random encoder.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from probssl.config import ConfigError

__all__ = ["LAYOUTS", "WeightsError", "WeightsReport", "load_backbone_weights", "read_state_dict"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
NESTED_KEYS = ("state_dict", "model", "teacher")  # checkpoint dicts that wrap the weights
LAYOUTS = ("probssl", "torchvision-resnet")  # timm ViT names are probssl's ViT names
#: At least this fraction of the backbone's tensors must come from the file.
MIN_MATCHED = 0.5


class WeightsError(ConfigError):
    """A weights file that cannot be used for this backbone; the message says why and what to do."""


@dataclass
class WeightsReport:
    """What :func:`load_backbone_weights` did, for the run's record and a one-screen summary."""

    path: str
    sha256: str
    layout: str
    prefix: str
    loaded: int
    total: int  # tensors of the backbone's state dict
    missing: list[str] = field(default_factory=list)  # backbone tensors left at their initialisation
    unexpected: list[str] = field(default_factory=list)  # file tensors under the prefix not used
    adapted: list[str] = field(default_factory=list)  # resampled / channel-summed tensors
    elsewhere: int = 0  # file tensors outside the prefix (a method's heads, a target network)

    def lines(self) -> list[str]:
        """At most a handful of lines: counts, and the keys grouped by module."""
        where = f" under '{self.prefix}'" if self.prefix else ""
        out = [
            f"weights {self.path}: {self.loaded} of {self.total} tensors loaded ({self.layout} layout{where})"
        ]
        if self.adapted:
            out.append(f"  adapted: {', '.join(self.adapted)}")
        if self.missing:
            out.append(f"  missing (kept at their initialisation): {_summarise(self.missing)}")
        if self.unexpected:
            out.append(f"  unexpected (not loaded): {_summarise(self.unexpected)}")
        if self.elsewhere:
            out.append(
                f"  {self.elsewhere} other tensors of the file lie outside '{self.prefix}' (not loaded)"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _summarise(keys: list[str], limit: int = 6) -> str:
    """``layer4.* (15), fc.weight, fc.bias``: keys grouped by their first component (a group of one or two
    spelled out), a line at most."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    parts = [
        ", ".join(items) if len(items) <= 2 else f"{head}.* ({len(items)})"
        for head, items in list(groups.items())[:limit]
    ]
    if len(groups) > limit:
        parts.append(f"… {len(groups) - limit} more groups")
    return ", ".join(parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(content: Any, path: Path) -> dict[str, Tensor]:
    """The tensors of a plain state dict or of one nested under ``state_dict`` / ``model`` / ``teacher``."""
    if not isinstance(content, dict):
        raise WeightsError(
            f"{path} holds a {type(content).__name__}, not a state dict; save one with "
            "torch.save(model.state_dict(), PATH) or safetensors"
        )
    for key in NESTED_KEYS:
        if isinstance(content.get(key), dict) and not any(torch.is_tensor(v) for v in content.values()):
            return _unwrap(content[key], path)
    tensors = {k: v for k, v in content.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise WeightsError(
            f"{path} holds no tensors at its top level (keys: {', '.join(map(str, list(content)[:8]))}); "
            f"a state dict, or one nested under {' / '.join(NESTED_KEYS)}, is expected"
        )
    return tensors


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (or of a run directory's final weights), never unpickling code."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise WeightsError(
                f"{path} is a directory but not a probssl run (no config.yaml); pass a weights file"
            )
        from probssl.checkpoint import CheckpointError, load_model_state

        try:
            state, _ = load_model_state(path)
        except CheckpointError as err:
            raise WeightsError(f"cannot take the weights of run {path}: {err}") from None
        return state
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsError(
                f"{path} cannot be read as safetensors (truncated or damaged?): {err}"
            ) from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "truncated" in str(err):
                raise WeightsError(f"{path} cannot be read: it is truncated") from None
            raise WeightsError(
                f"{path} holds Python objects other than tensors ({_refused_global(str(err))}); it is not "
                "unpickled, since that could run code. Save only the state dict (torch.save("
                "model.state_dict(), PATH)) or convert it to .safetensors"
            ) from None
        except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as err:
            reason = " ".join(str(err).split())[:120] or type(err).__name__
            raise WeightsError(f"{path} cannot be read (truncated or damaged?): {reason}") from None
        return _unwrap(content, path)
    raise WeightsError(
        f"{path}: unknown weights format '{path.suffix}'; use .safetensors or {' / '.join(PICKLE_SUFFIXES)} "
        "(a state dict), or a probssl run directory"
    )


def _refused_global(message: str) -> str:
    """The line of torch's weights-only error that names what was refused (``GLOBAL posix.system``)."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return " ".join(line.split())
    return "not a plain state dict"


_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(.+)$")


def torchvision_resnet_name(key: str) -> str | None:
    """torchvision's ResNet name → this project's (``None`` for the classifier and unknown names)."""
    if key.startswith("conv1."):
        return "stem.0." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "stem.1." + key[len("bn1.") :]
    match = _TV_BLOCK.match(key)
    if match is None:
        return None
    stage, block, part, rest = match.groups()
    part = part.replace("bn", "norm").replace("downsample", "shortcut")
    return f"stages.{int(stage) - 1}.{block}.{part}.{rest}"


_TRANSLATE = {"probssl": lambda key: key, "torchvision-resnet": torchvision_resnet_name}


def _best_match(source: dict[str, Tensor], wanted: set[str]) -> tuple[str, str, dict[str, str]]:
    """(layout, prefix, {backbone key: file key}) with the most backbone keys found; ties go to the
    shorter prefix, then to the project's own layout."""
    candidates: dict[tuple[str, str], dict[str, str]] = {}
    for key in source:
        parts = key.split(".")
        for cut in range(len(parts)):
            prefix = ".".join(parts[:cut]) + ("." if cut else "")
            rest = ".".join(parts[cut:])
            for layout, translate in _TRANSLATE.items():
                name = translate(rest)
                if name in wanted:
                    candidates.setdefault((layout, prefix), {}).setdefault(name, key)
    if not candidates:
        return "probssl", "", {}
    order = {layout: i for i, layout in enumerate(_TRANSLATE)}
    (layout, prefix), found = max(
        candidates.items(), key=lambda item: (len(item[1]), -len(item[0][1]), -order[item[0][0]])
    )
    return layout, prefix, found


def _describe_keys(keys: list[str], limit: int = 3) -> str:
    return ", ".join(f"'{k}'" for k in keys[:limit]) + (", …" if len(keys) > limit else "")


def _adapt(net: nn.Module, key: str, tensor: Tensor, target: Tensor) -> tuple[Tensor, bool]:
    """The two shape changes the field makes when loading (module docstring); others stay as they are."""
    adapt = getattr(net, "adapt_weight", None)
    if adapt is not None:
        adapted = adapt(key, tensor)
        if adapted is not tensor:
            return adapted, True
    same_but_input = (
        tensor.dim() == 4 and tensor.shape[:1] + tensor.shape[2:] == target.shape[:1] + target.shape[2:]
    )
    if same_but_input and tensor.shape[1] == 3 and target.shape[1] == 1:
        return tensor.sum(dim=1, keepdim=True), True  # RGB filters on grey input: their channel sum
    return tensor, False


def load_backbone_weights(net: nn.Module, path: str | Path, backbone_name: str = "backbone") -> WeightsReport:
    """Load the matching tensors of ``path`` into ``net`` (in place) and report what was done."""
    path = Path(path).expanduser()
    source = read_state_dict(path)
    own = net.state_dict()
    layout, prefix, found = _best_match(source, set(own))
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    matched = [k for k in needed if k in found]
    if len(matched) < MIN_MATCHED * len(needed):
        raise WeightsError(
            f"{path} does not fit backbone '{backbone_name}': {len(matched)} of its {len(needed)} tensors "
            f"found among the file's {len(source)} ({_describe_keys(sorted(source))}; the backbone has "
            f"{_describe_keys(needed)}). It is for another architecture: choose the backbone it was "
            "saved from (--backbone), or another file"
        )
    state: dict[str, Tensor] = {}
    adapted: list[str] = []
    mismatched: list[str] = []
    for name in (k for k in own if k in found):  # the backbone's order: the first mismatch is the stem's
        file_key = found[name]
        tensor, changed = _adapt(net, name, source[file_key], own[name])
        if tuple(tensor.shape) != tuple(own[name].shape):
            mismatched.append(
                f"'{file_key}' is {tuple(tensor.shape)} in the file but {tuple(own[name].shape)} here"
            )
            continue
        if changed:
            adapted.append(f"{file_key} {tuple(source[file_key].shape)} → {tuple(tensor.shape)}")
        state[name] = tensor.to(own[name].dtype)
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise WeightsError(
            f"{path} does not fit backbone '{backbone_name}' as built: {mismatched[0]}{more}. Build the "
            "backbone the weights were saved from (its width, stem, patch size, or another backbone)"
        )
    net.load_state_dict(state, strict=False)
    digest_of = path if path.is_file() else path / "model.safetensors"
    used = set(found.values())
    under_prefix = [k for k in source if k.startswith(prefix)]
    unexpected = [k[len(prefix) :] for k in under_prefix if k not in used]
    return WeightsReport(
        path=str(path.absolute()),
        sha256=_sha256(digest_of) if digest_of.is_file() else "",  # a run with checkpoints only: none
        layout=layout,
        prefix=prefix,
        loaded=len(state),
        total=len(own),
        missing=[k for k in own if k not in state and not k.endswith("num_batches_tracked")],
        unexpected=unexpected,
        adapted=adapted,
        elsewhere=len(source) - len(under_prefix),
    )
