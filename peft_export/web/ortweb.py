"""onnxruntime-web's files in a site: which, where they come from, how a wheel carries them.

A site runs the decoder with onnxruntime-web's wasm backend and needs three files of the
version pinned in the repository's ``package.json`` (``ORT_FILES``, ~14 MB, nearly all of it
the ``.wasm``); the WebGPU/JSEP builds (another 28 MB) are not used. They are never fetched
from a CDN by the page, and they are not committed here (other projects' code is not copied
into the repository): they come from npm and are looked up in this order:

1. ``$PEFTEXPORT_ORT_WEB``: a folder holding the files (e.g. ``node_modules/onnxruntime-web/dist``).
2. ``peft_export/web/ort/``: package data. ``python -m peft_export.web.ortweb`` fills it from
   ``node_modules`` (after ``npm ci``); a wheel built after that carries the files, so its users
   need no npm.
3. ``node_modules/onnxruntime-web/dist`` in the source tree: an editable install after ``npm ci``.

Run as ``python -m peft_export.web.ortweb [--from DIR]`` it does step 2 (the packaging step).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from ..errors import PeftExportError

ORT_WEB_VERSION = "1.30.0"  # the pin in package.json (a test keeps the two equal)
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ENV_VAR = "PEFTEXPORT_ORT_WEB"
PACKAGE_DIR = Path(__file__).resolve().parent / "ort"
SOURCE_TREE_DIST = Path(__file__).resolve().parents[2] / "node_modules" / "onnxruntime-web" / "dist"
NOTICE = "NOTICE.txt"
FETCH_HINT = (
    "run `npm ci` in the peftexport source tree (then `python -m peft_export.web.ortweb` to put the files "
    f"into the package before building a wheel), or set {ENV_VAR} to a folder holding {', '.join(ORT_FILES)}"
)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ORT_FILES)


def _npm_version(dist: Path) -> Optional[str]:
    """The version in ``onnxruntime-web/package.json`` beside a ``dist`` folder, if there is one."""
    meta = dist.parent / "package.json"
    try:
        return str(json.loads(meta.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def _recorded_version(folder: Path) -> Optional[str]:
    """The version a filled package folder records in its NOTICE.txt (first line)."""
    try:
        first = (folder / NOTICE).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return first.rsplit(" ", 1)[-1] if first.startswith("onnxruntime-web ") else None


def find_ort_files() -> tuple[Path, str]:
    """(folder holding ``ORT_FILES``, where it was found); PeftExportError naming the fix if none."""
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env)
        if not _complete(folder):
            missing = [n for n in ORT_FILES if not (folder / n).is_file()]
            raise PeftExportError(f"{ENV_VAR}={env}: missing onnxruntime-web file(s) {', '.join(missing)}")
        return folder, f"${ENV_VAR}"
    if _complete(PACKAGE_DIR):
        return PACKAGE_DIR, "package data"
    if _complete(SOURCE_TREE_DIST):
        version = _npm_version(SOURCE_TREE_DIST)
        if version != ORT_WEB_VERSION:
            raise PeftExportError(
                f"{SOURCE_TREE_DIST}: onnxruntime-web {version} is installed, package.json pins {ORT_WEB_VERSION} "
                "(run `npm ci`)"
            )
        return SOURCE_TREE_DIST, "node_modules"
    raise PeftExportError(f"onnxruntime-web: its files are not installed ({FETCH_HINT})")


def notice_text(version: str = ORT_WEB_VERSION) -> str:
    return (
        f"onnxruntime-web {version}\n"
        f"{', '.join(ORT_FILES)}: copied unchanged from the npm package onnxruntime-web {version}\n"
        "(Microsoft, MIT License; the license text is the LICENSE file of the onnxruntime repository).\n"
    )


def copy_ort_files(dst: Path) -> Path:
    """Copy ``ORT_FILES`` and a notice into ``dst`` (created); returns ``dst``."""
    src, _ = find_ort_files()
    dst.mkdir(parents=True, exist_ok=True)
    for name in ORT_FILES:
        shutil.copyfile(src / name, dst / name)
    version = _recorded_version(src) or _npm_version(src) or ORT_WEB_VERSION
    (dst / NOTICE).write_text(notice_text(version))
    return dst


def vendor_into_package(src: Optional[Path] = None, dst: Path = PACKAGE_DIR) -> Path:
    """The packaging step: fill ``dst`` (``peft_export/web/ort/``) from ``src`` (default: node_modules)."""
    src = Path(src) if src is not None else SOURCE_TREE_DIST
    dst = Path(dst)
    if not _complete(src):
        raise PeftExportError(f"{src}: no onnxruntime-web files ({FETCH_HINT})")
    version = _npm_version(src)
    if version is not None and version != ORT_WEB_VERSION:
        raise PeftExportError(f"{src}: onnxruntime-web {version}, but package.json pins {ORT_WEB_VERSION} (run `npm ci`)")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ORT_FILES:
        shutil.copyfile(src / name, tmp / name)
    (tmp / NOTICE).write_text(notice_text(version or ORT_WEB_VERSION))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m peft_export.web.ortweb",
        description="Copy onnxruntime-web's files from node_modules into peft_export/web/ort/ (before building a wheel).",
    )
    parser.add_argument("--from", dest="src", type=Path, default=None,
                        help=f"onnxruntime-web's dist folder (default: {SOURCE_TREE_DIST})")
    args = parser.parse_args(argv)
    try:
        dst = vendor_into_package(args.src)
    except PeftExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = sum((dst / n).stat().st_size for n in ORT_FILES)
    print(f"copied onnxruntime-web {ORT_WEB_VERSION} ({size / 1e6:.1f} MB) into {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
