"""Frozen CLIP on open_clip: one entry point, `create_clip(model, pretrained)`.

`pretrained` is an open_clip tag (`openai`, `laion2b_s34b_b79k`, ...), a local checkpoint path, or
None (untrained, logged as a warning). A tag is never silently replaced by random weights: when the
weights are neither cached nor reachable it fails within seconds with a UserError that says how to
pass a local checkpoint. The returned model is always frozen and in eval mode (the FedCLIP
reference calls `train()` on CLIP every round, which drifts BatchNorm statistics of ResNet CLIPs;
identical for ViTs - spec fedclip §8.1, documented deviation).

The package's own model configs (`model_configs/*.json`, e.g. `fedplatform-tiny`, a 2-layer ViT
at 32 px with 512-d embeddings for tests and the quickstart) are registered with open_clip at import.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F

from fedplatform.errors import UserError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

FEDCLIP_TEMPLATE = "a picture of a {}"
CLIP2FL_TEMPLATE = "a photo of a {}"
PROBE_TIMEOUT_S = 3.0
"""Seconds allowed to reach the weights host before a tag is declared unreachable."""
OFFLINE_ENV = "FEDPLATFORM_OFFLINE"
"""Set to 1 to skip the network probe and use cached weights only (as HF_HUB_OFFLINE=1 does)."""
UNTRAINED_SEED = 0
"""Seed of an untrained CLIP's random weights (identical in every process; part of its identity)."""
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Metadata entries of OpenAI's TorchScript checkpoints that are not parameters."""


@dataclass(frozen=True)
class ClipInfo:
    """What was loaded: `weights` identifies the weights for cache keys ("tag:openai",
    "sha256:<hex>" of a checkpoint file, or "untrained:seed0"); `pretrained` is the MLflow tag
    `clip_pretrained`."""

    model: str
    pretrained: bool
    weights: str
    source: str | None
    embed_dim: int
    precision: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed_dim(model: str) -> int:
    """CLIP embedding width from the model config (spec fedclip §8.9: not from a trial batch)."""
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise UserError(f"clip.model={model!r} is not an open_clip model; known: {', '.join(open_clip.list_models())}")
    return int(cfg["embed_dim"])


def preprocess_config(model: str, pretrained: str | None) -> dict[str, Any]:
    """The eval preprocessing `create_clip` will use (size (H, W), mean, std, interpolation,
    resize_mode, ...), without building the model: open_clip's defaults, updated by a hub tag's own
    config, at the vision tower's image size - as `open_clip.create_model` derives it."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    if pretrained is not None and not is_checkpoint_path(pretrained):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model, pretrained) or {})
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
    return cfg


def is_checkpoint_path(pretrained: str) -> bool:
    """A `pretrained` value is a path when it names an existing file or looks like one."""
    return os.path.exists(pretrained) or os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(model: str, pretrained: str | None) -> str:
    """"tag:<tag>", "sha256:<hex>" (checkpoint file content) or "untrained:seed0" - without loading."""
    if pretrained is None:
        return f"untrained:seed{UNTRAINED_SEED}"
    if is_checkpoint_path(pretrained):
        if not os.path.isfile(pretrained):
            raise UserError(f"clip.pretrained={pretrained!r} looks like a checkpoint path but no such file exists")
        return f"sha256:{file_sha256(pretrained)}"
    return f"tag:{pretrained}"


def create_clip(model: str, pretrained: str | None, device: str | torch.device = "cpu",
                precision: str = "fp32") -> tuple[torch.nn.Module, Any, Any, ClipInfo]:
    """(frozen eval-mode CLIP, its eval preprocessing, its tokenizer, ClipInfo).

    model: open_clip model name (ViT-B-32, RN50, fedplatform-tiny, ...). pretrained: open_clip tag,
    local checkpoint path (a state dict of that model, optionally under "state_dict", or an
    OpenAI TorchScript archive), or None for random weights. precision: open_clip precision
    ("fp32", "fp16", "bf16", "amp")."""
    dim = embed_dim(model)
    device = torch.device(device)
    if pretrained is None:
        log.warning("CLIP %s is UNTRAINED (clip.pretrained is null): random weights, zero-shot accuracy is chance", model)
        clip, preprocess = _create(model, None, device, precision)
        info = ClipInfo(model, False, weights_identity(model, None), None, dim, precision)
    elif is_checkpoint_path(pretrained):
        identity = weights_identity(model, pretrained)
        clip, preprocess = _create(model, None, device, precision)
        _load_checkpoint(clip, pretrained, model)
        info = ClipInfo(model, True, identity, str(Path(pretrained).resolve()), dim, precision)
    else:
        with _hf_offline() if _locate_tag(model, pretrained) else nullcontext():
            clip, preprocess = _create(model, pretrained, device, precision)
        info = ClipInfo(model, True, f"tag:{pretrained}", pretrained, dim, precision)
    clip.eval()
    clip.requires_grad_(False)
    return clip, preprocess, open_clip.get_tokenizer(model), info


def _create(model: str, pretrained: str | None, device: torch.device, precision: str):
    # open_clip logs its own "initialized randomly" warning for untrained models; ours says it once.
    # Random weights are drawn from a fixed seed: every process (Ray actors included) must build
    # the same untrained CLIP, and the caller's RNG stream is left untouched.
    oc_log = logging.getLogger()
    level = oc_log.level
    if pretrained is None:
        oc_log.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device,
                                                                        precision=precision)
    finally:
        oc_log.setLevel(level)
    return clip, preprocess


def require_weights(model: str, pretrained: str | None) -> None:
    """Fail now, with the UserError loading would give, when this machine cannot load the CLIP:
    an unknown model or tag, a missing checkpoint file, hub weights neither cached nor reachable.
    Run on the driver before any actor starts, so the message is not buried in an actor's death."""
    embed_dim(model)
    if pretrained is None:
        return
    if is_checkpoint_path(pretrained):
        weights_identity(model, pretrained)
        st = os.stat(pretrained)
        _check_checkpoint(model, os.path.realpath(pretrained), st.st_size, st.st_mtime_ns)
    else:
        _locate_tag(model, pretrained)


@lru_cache(maxsize=8)
def _check_checkpoint(model: str, path: str, size: int, mtime_ns: int) -> None:
    """Load a local checkpoint into the model once on the driver (cached per file version): an
    unreadable or mismatched file is a UserError here, not an actor dying later."""
    if not os.access(path, os.R_OK):
        raise UserError(f"clip.pretrained={path!r} is not readable (permissions); make it readable or use another file")
    clip, _ = _create(model, None, torch.device("cpu"), "fp32")
    _load_checkpoint(clip, path, model)


def _locate_tag(model: str, tag: str) -> bool:
    """A known tag whose weights are reachable (open_clip downloads them) or in the local cache
    (checked offline, without HTTP or retries: well under a second when they are not there).
    Returns whether this machine is offline (the model must then be built from the cache only)."""
    known = open_clip.list_pretrained_tags_by_model(model)
    if tag not in known:
        listed = ", ".join(known) if known else "none (use a local checkpoint path or null)"
        raise UserError(f"clip.pretrained={tag!r} is not a known open_clip tag for {model}; known tags: {listed}")
    cfg = open_clip.get_pretrained_cfg(model, tag)
    hosts = [urlparse(u).hostname for u in (cfg.get("url") or "",) if u]
    if cfg.get("hf_hub"):
        hosts.insert(0, "huggingface.co")
    offline = _env_true(OFFLINE_ENV) or _env_true("HF_HUB_OFFLINE") or not any(_reachable(h) for h in hosts if h)
    if not offline:
        return False
    hint = (f"CLIP weights {model}/{tag} are not in the local cache and {', '.join(h for h in hosts if h)} cannot "
            f"be reached (no network). Download them on a machine with network access (e.g. "
            f"open_clip.create_model('{model}', pretrained='{tag}')) and pass the checkpoint file as a local "
            f"path: clip.pretrained=/path/to/{model}-{tag}.pt (or copy the Hugging Face cache, "
            f"~/.cache/huggingface, to this machine)")
    if not cfg.get("hf_hub"):  # URL-only weights: urllib has no timeout, so check the cache first
        url = cfg.get("url", "")
        if not (Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)).is_file():
            raise UserError(hint)
        return True
    with _hf_offline():
        try:
            found = open_clip.pretrained.download_pretrained(cfg)
        except Exception as exc:  # noqa: BLE001 - any lookup failure offline means "not cached"
            raise UserError(f"{hint} [{type(exc).__name__}]") from None
    if not found:
        raise UserError(hint)
    return True


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(host: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to host:443 opens within `timeout` s (DNS included, bounded by a thread)."""
    ok: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


@contextmanager
def _hf_offline():
    """Make huggingface_hub use its local cache only (no HTTP, no retries) for a block."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old, old_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _load_checkpoint(clip: torch.nn.Module, path: str, model: str) -> None:
    """Load a local checkpoint strictly; anything that is not a state dict of `model` is a UserError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - maybe an OpenAI TorchScript archive
        try:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"clip.pretrained={path!r} cannot be read as a PyTorch checkpoint ({type(exc).__name__}); "
                            f"expected a state dict of CLIP {model}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"clip.pretrained={path!r} is not a CLIP state dict for {model} (not a mapping of tensors)")
    sd = {k.removeprefix("module."): v for k, v in obj.items() if k not in _JIT_EXTRA_KEYS}
    own = clip.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {sorted(shapes)[0]})")
        raise UserError(f"clip.pretrained={path!r} is not a CLIP state dict for {model}: {'; '.join(parts)}")
    clip.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


@torch.no_grad()
def clip_with_prototypes(model: str, pretrained: str | None, class_names: Sequence[str], template: str,
                         clean_names: bool = False, device="cpu"):
    """`create_clip` plus the class text prototypes: (clip, preprocess, info, [C, d] on `device`)."""
    clip, preprocess, tokenizer, info = create_clip(model, pretrained, device)
    return clip, preprocess, info, text_prototypes(clip, tokenizer, class_names, template, clean_names)


def text_prototypes(clip: torch.nn.Module, tokenizer, class_names: Sequence[str], template: str,
                    clean_names: bool = False) -> torch.Tensor:
    """t_k = normalize(float(encode_text(tokenize(template.format(name_k))))): L2-normalised float32
    [C, d] on the model's device. clean_names turns underscores into spaces (the FedCLIP reference
    keeps folder names as they are, e.g. "Alarm_Clock")."""
    names = [n.replace("_", " ") if clean_names else n for n in class_names]
    device = next(clip.parameters()).device
    tokens = tokenizer([template.format(n) for n in names]).to(device)
    return F.normalize(clip.encode_text(tokens).float(), dim=-1)
