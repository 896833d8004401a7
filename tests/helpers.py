"""Test helpers: tiny random SAM models with random, non-zero adapters."""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch

from peft_export.peft.adapters import AdaptedModel, build_adapted_model
from peft_export.peft import PeftConfig

warnings.filterwarnings("ignore", message="no checkpoint given")

# Every mergeable method with options that exercise all its code paths.
MERGEABLE_CONFIGS = {
    "lora": dict(method="lora", rank=4, targets=("q", "k", "v", "mlp"), blocks="late", alpha=1.0),
    "lora-qv-alpha": dict(method="lora", rank=3, targets=("q", "v"), blocks="all", alpha=2.5),
    "fact": dict(method="fact", rank=4, blocks="all"),
    "ssf": dict(method="ssf", blocks="1-3"),
    "attention": dict(method="attention", blocks="late"),
    "bias": dict(method="bias", blocks="all"),
    "layernorm": dict(method="layernorm", blocks="0,2"),
    "full": dict(method="full", blocks="late"),
    "freeze-encoder": dict(method="freeze-encoder"),
}


def striped_disk_image(seed: int = 10) -> np.ndarray:
    """A 181x250 uint8 RGB image (odd, non-square size) with stripes, a bright disk and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:181, 0:250]
    image = np.stack([(yy * 1.3) % 256, (xx * 0.9) % 256, ((yy - 90) ** 2 + (xx - 120) ** 2 < 50**2) * 200.0], -1)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def randomize_trainables(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Random, non-zero values for every trainable tensor: zero-initialised adapters prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith(".scale") or name.endswith(".alpha"):
                p.copy_(1.0 + 4 * noise)  # multiplicative: around 1
            elif "w_b_linear" in name or "FacTv" in name or "up_proj" in name:
                p.copy_(noise * 4)
            else:
                p.add_(noise)


def make_adapted(config: dict, image_size: int | None = None, seed: int = 0) -> AdaptedModel:
    adapted = build_adapted_model(PeftConfig(**config), "tiny", None, image_size, seed=seed)
    randomize_trainables(adapted.model, seed=seed + 10)
    adapted.model.eval()
    return adapted


def hand_merge(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The merged state dict in float64, from the adapted model's raw tensors by the methods' formulas.

    Works on state-dict keys only (micro-sam's layout), never on our PEFT modules, so it is an
    independent reference for every merge test: LoRA W + alpha B A on the q/k/v slices and
    lin1/lin2, and on each mask-decoder Linear; FacT W_q + V S_q U, W_v + V S_v U (encoder qkv, and the
    q/k/v projections of a decoder attention); SSF W * s (per output channel), b * s + t;
    plain tensors (selective methods, decoder, untouched blocks) as they are.
    """
    s = {k: v.double() for k, v in state.items()}
    alpha = float(config.get("alpha", 1.0))
    out: dict[str, torch.Tensor] = {}
    for key, value in s.items():
        if re.search(r"\.(w_[ab]_linear(_\w+)?|FacT[uv]|[qkv]_FacTs)\.weight$|\.(scale|shift)$", key):
            continue  # adapter tensors: folded into the base keys below
        m = re.match(r"(.*)\.linear\.(weight|bias)$", key)
        if m and f"{m.group(1)}.w_a_linear.weight" in s:  # LoRA on one mask-decoder Linear: W + alpha B A
            prefix, kind = m.groups()
            w = value.clone()
            if kind == "weight":
                w += alpha * (s[f"{prefix}.w_b_linear.weight"] @ s[f"{prefix}.w_a_linear.weight"])
            out[f"{prefix}.{kind}"] = w
            continue
        m = re.match(r"(.*)\.attn\.([qkv])_proj\.linear\.(weight|bias)$", key)
        if m and f"{m.group(1)}.FacTu.weight" in s:  # FacT on a mask-decoder attention: W_p + V S_p U
            prefix, proj, kind = m.groups()
            w = value.clone()
            if kind == "weight":
                w += s[f"{prefix}.FacTv.weight"] @ s[f"{prefix}.{proj}_FacTs.weight"] @ s[f"{prefix}.FacTu.weight"]
            out[f"{prefix}.{proj}_proj.{kind}"] = w
            continue
        m = re.match(r"(.*)\.attn\.((?:q|k|v|out)_proj\.(?:weight|bias))$", key)
        if m and f"{m.group(1)}.FacTu.weight" in s:  # the attention's other projections, unwrapped
            out[f"{m.group(1)}.{m.group(2)}"] = value
            continue
        m = re.match(r"(.*)\.attn\.qkv\.qkv_proj\.(weight|bias)$", key)
        if m:
            prefix, kind = m.groups()
            w = value.clone()
            d = w.shape[0] // 3
            if kind == "weight":
                for i, t in enumerate("qkv"):
                    a = s.get(f"{prefix}.attn.qkv.w_a_linear_{t}.weight")
                    if a is not None:
                        w[i * d:(i + 1) * d] += alpha * (s[f"{prefix}.attn.qkv.w_b_linear_{t}.weight"] @ a)
                u = s.get(f"{prefix}.attn.qkv.FacTu.weight")
                if u is not None:
                    v = s[f"{prefix}.attn.qkv.FacTv.weight"]
                    w[:d] += v @ s[f"{prefix}.attn.qkv.q_FacTs.weight"] @ u
                    w[2 * d:] += v @ s[f"{prefix}.attn.qkv.v_FacTs.weight"] @ u
            out[f"{prefix}.attn.qkv.{kind}"] = w
            continue
        m = re.match(r"(.*)\.mlp\.mlp_layer\.lin([12])\.(weight|bias)$", key)
        if m:
            prefix, n, kind = m.groups()
            w = value.clone()
            if kind == "weight":
                w += alpha * (s[f"{prefix}.mlp.w_b_linear_{n}.weight"] @ s[f"{prefix}.mlp.w_a_linear_{n}.weight"])
            out[f"{prefix}.mlp.lin{n}.{kind}"] = w
            continue
        m = re.match(r"(.*)\.layer\.(weight|bias)$", key)
        if m and f"{m.group(1)}.scale" in s:
            prefix, kind = m.groups()
            scale, shift = s[f"{prefix}.scale"], s[f"{prefix}.shift"]
            if kind == "weight":
                out[f"{prefix}.weight"] = value * scale.view(-1, *([1] * (value.dim() - 1)))
            else:
                out[f"{prefix}.bias"] = value * scale + shift
            continue
        out[key] = value
    return out


def fake_cv2():
    """cv2.connectedComponentsWithStats from scipy, so segment_anything's small-region code runs without cv2."""
    import types

    import numpy as np
    from scipy import ndimage

    def connected(img, connectivity):
        labels, n = ndimage.label(img, structure=np.ones((3, 3)))
        stats = np.zeros((n + 1, 5), np.int64)
        stats[:, 4] = np.bincount(labels.ravel(), minlength=n + 1)
        return n + 1, labels, stats, None

    return types.SimpleNamespace(connectedComponentsWithStats=connected)


def import_blocker(blocked: tuple[str, ...], when: str = "True") -> str:
    """Python source for the head of a subprocess script: while ``when`` holds, importing any of the
    top-level packages ``blocked`` raises ImportError (the torch-free checks of runtime, napari, Dask)."""
    return (f"import sys\nBLOCKED = {tuple(blocked)!r}\n"
            f"if {when}:\n"
            "    class _Block:\n"
            "        def find_spec(self, name, path=None, target=None):\n"
            "            if name.split('.')[0] in BLOCKED:\n"
            "                raise ImportError(f'{name} is blocked')\n"
            "            return None\n"
            "    sys.meta_path.insert(0, _Block())\n")
