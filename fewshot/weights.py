"""Weights files: reading them without running pickled code, finding the backbone inside common checkpoint
layouts, loading them into a timm model with a report (or a refusal) of what did not fit, and their sha256.

``.safetensors`` files are read as tensors and string metadata; ``.pth``/``.pt``/``.bin`` only through
``torch.load(weights_only=True)`` after a header check, so a file holding other pickled objects is refused rather
than unpickled.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot.errors import FewshotError

if TYPE_CHECKING:
    from torch import nn

# checkpoint keys that wrap the backbone's state dict (DINO's teacher/student, DDP's module, ...), tried in order
_WRAPPERS = ("teacher", "student", "model", "state_dict", "model_state", "module", "net", "network")
_PREFIXES = ("module.", "backbone.", "_orig_mod.", "encoder.")  # wrapper prefixes stripped from every key
# A weights file may miss a few tensors (e.g. a norm the checkpoint never had); beyond this share of the model's
# parameters left at random init, the features would not be the checkpoint's: refuse unless strict=false.
MAX_MISSING_SHARE = 0.01


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and string metadata from a weights file, never executing pickled code."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as exc:
            raise FewshotError(f"'{path}' is not a readable safetensors file ({exc})") from None
        return state, meta
    import pickle

    import torch

    with open(path, "rb") as fh:
        magic = fh.read(4)
    # torch.save writes a zip archive (since 1.6) or, before that, a pickle (protocol ≥ 2 opens with 0x80); any other
    # file would reach the legacy unpickler and fail with whatever error its first bytes provoke
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise FewshotError(f"'{path}' is not a PyTorch checkpoint (no zip or pickle header); check the file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FewshotError(
            f"refusing to load '{path}': it holds pickled objects other than tensors, which could run code "
            f"({first[:120]}); convert it to safetensors with a trusted tool first"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as exc:  # damaged legacy pickles too
        raise FewshotError(f"'{path}' is not a readable PyTorch checkpoint ({exc})") from None
    return unwrap_state_dict(obj, path), {}


def unwrap_state_dict(obj: Any, path: Path | str = "checkpoint") -> dict[str, Any]:
    """Find the backbone's state dict inside common checkpoint layouts and strip wrapper prefixes."""
    import torch

    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise FewshotError(f"no tensors found in '{path}' (top-level keys: {list(obj)[:8]}); is it a checkpoint?")
        obj = inner
    if not isinstance(obj, dict):
        raise FewshotError(f"'{path}' holds a {type(obj).__name__}, not a state dict of tensors")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        state[key] = value
    return state


def load_state(model: Any, state: dict[str, Any], where: str, strict: bool = True) -> str:
    """Load ``state`` into ``model``; return a one-line report of missing/unexpected keys ('' when all fit).

    Refuses (one line) a load that leaves more than :data:`MAX_MISSING_SHARE` of the model's parameters at random
    init unless ``strict`` is False: such weights are not the checkpoint's model (e.g. 2-block weights in a 4-block
    ViT). Unexpected keys (weights the model has no place for, e.g. blocks dropped) are reported, not refused:
    checkpoints often carry heads and decoders the backbone does not use.
    """
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)  # e.g. interpolates position embeddings to the model's size
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise FewshotError(
            f"weights in '{where}' do not fit this architecture: {k} is {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model ({len(bad)} mismatched); pick the matching :arch= and options"
        )
    params = dict(model.named_parameters())
    missing = [k for k in own if k not in state]
    share = sum(params[k].numel() for k in missing if k in params) / max(1, sum(p.numel() for p in params.values()))
    if share > MAX_MISSING_SHARE and strict:
        raise FewshotError(
            f"weights in '{where}' leave {100 * share:.0f}% of the model's parameters at random init ({len(missing)} "
            f"tensors missing, e.g. {', '.join(missing[:3])}); pick the architecture options the weights were "
            "trained with (e.g. depth=), or add :strict=false to accept a partial load"
        )
    model.load_state_dict(state, strict=False)
    unexpected = [k for k in state if k not in own and not k.startswith("head")]  # projection heads are expected
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}; "
                     f"{100 * share:.1f}% of the parameters left at random init)")  # fmt: skip
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''}; "
            "not used)"
        )
    return "; ".join(parts)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """The sha256 of a model's state dict (names and values): the identity of weights that have no file."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
