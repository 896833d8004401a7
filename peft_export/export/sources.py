"""Named model sources of an export of several adapters: ``--adapter NAME=RUN`` and
``--micro-sam "NAME=CKPT[;peft=lora;rank=32;blocks=6-11;targets=q,k,v,mlp]"``.

A micro-sam checkpoint does not record its PEFT method; its options come after ``;`` in its
own entry, and whatever an entry leaves out comes from the command's ``--peft``, ``--rank``,
``--blocks``, ``--targets`` and ``--adaptformer-residual``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import PeftExportError
from ..peft.adapters import ADAPTER_META, ADAPTER_WEIGHTS, AdaptedModel, load_model_source, micro_sam_peft_config
from .sharing import ADAPTER_NAME, check_adapter_name

MICRO_SAM_KEYS = ("peft", "rank", "blocks", "targets", "adaptformer-residual")


def split_name(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a text that is itself an existing path, or whose left part
    is not a name, has no name."""
    if "=" in text and not Path(text).exists():
        name, rest = text.split("=", 1)
        if name and os.sep not in name and "/" not in name:
            return name, rest
    return None, text


def _default(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name in (ADAPTER_META, ADAPTER_WEIGHTS) else (p.name if p.is_dir() else p.stem)


def default_name(path: str, option: str) -> str:
    """An unnamed source is named after its run directory (or checkpoint file stem)."""
    name = _default(path)
    if not ADAPTER_NAME.fullmatch(name or ""):
        raise PeftExportError(f"{option} {path}: cannot use {name!r} as its name; name it with {option} NAME={path}")
    return name


def _micro_sam_entry(text: str, defaults: dict) -> tuple[str, dict]:
    """``CKPT;key=value;...`` -> (CKPT, options), the options over ``defaults``."""
    path, *pairs = text.split(";")
    opts = dict(defaults)
    for pair in pairs:
        if not pair.strip():
            continue
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or key not in MICRO_SAM_KEYS:
            raise PeftExportError(
                f"--micro-sam {text}: {pair.strip()!r} is not one of {', '.join(k + '=' for k in MICRO_SAM_KEYS)}"
            )
        opts[key] = value.strip()
    if opts.get("rank") not in (None, ""):
        try:
            opts["rank"] = int(opts["rank"])
        except ValueError:
            raise PeftExportError(f"--micro-sam {text}: rank={opts['rank']!r} is not a whole number") from None
    residual = opts.get("adaptformer-residual")
    opts["adaptformer-residual"] = residual if isinstance(residual, bool) else str(residual).lower() in ("1", "true", "yes")
    return path, opts


def load_named_sources(
    adapters: Sequence[str] = (),
    micro_sams: Sequence[str] = (),
    checkpoint: str | Path | None = None,
    micro_sam_defaults: dict | None = None,
    model_type: str | None = None,
    image_size: int | None = None,
    force: bool = False,
) -> dict[str, AdaptedModel]:
    """{name: adapted model} of ``--adapter [NAME=]RUN`` and ``--micro-sam [NAME=]CKPT[;options]`` entries.

    Names must be unique (refused naming both entries); every entry is parsed and named
    before any model is loaded.
    """
    plans: list[tuple[str, str, str, dict | None]] = []  # (name, option, path, micro-sam options)
    seen: dict[str, str] = {}
    for option, texts in (("--adapter", adapters), ("--micro-sam", micro_sams)):
        for text in texts:
            name, rest = split_name(str(text))
            opts = None
            if option == "--micro-sam":
                rest, opts = _micro_sam_entry(rest, micro_sam_defaults or {})
            if name is not None:
                name = check_adapter_name(name, f"{option} {text}")
            elif len(adapters) + len(micro_sams) == 1 and not ADAPTER_NAME.fullmatch(_default(rest)):
                name = "adapter"  # one source: a one-model export, where the name is not used
            else:
                name = default_name(rest, option)
            if name in seen:
                raise PeftExportError(f"{option} {text}: name {name!r} is also used by {seen[name]}; "
                                      "give each adapter its own NAME=")
            seen[name] = f"{option} {text}"
            if not Path(rest).exists():
                raise PeftExportError(f"{option} {text}: {rest} does not exist")
            plans.append((name, option, rest, opts))
    out: dict[str, AdaptedModel] = {}
    for name, option, path, opts in plans:
        if opts is None:
            out[name] = load_model_source(adapter=path, checkpoint=checkpoint, image_size=image_size, force=force,
                                          model_type=model_type)
        else:
            cfg = micro_sam_peft_config(path, opts.get("peft"), opts.get("rank") or None, opts.get("blocks") or "all",
                                        opts.get("targets") or "q,v", opts["adaptformer-residual"])
            out[name] = load_model_source(micro_sam=path, micro_sam_config=cfg, model_type=model_type,
                                          image_size=image_size)
    return out
