"""SAM 2's propagation as the volume room's second method: ``Sam2Session.propagate``,
``segment_object_in_volume(..., method="sam2")`` (``segment_object_with_sam2``) and ``peftexport predict
--propagate`` on a SAM 2 export, each against the direct ``Sam2Propagator`` run on the same frames (whose
fidelity to sam2's SAM2VideoPredictor is tests/test_sam2_video.py's), and the refusals of what a SAM 2 export
cannot do in the volume room.

The model: a random hiera_t at image size 256 exported with its memory graphs (``merge-and-export --video``);
the volume: 7 synthetic nuclei planes of 48 x 64.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile

pytest.importorskip(
    "sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from helpers import import_blocker  # noqa: E402
from volume_helpers import sam2_video_export  # noqa: E402
from peft_export.cli.main import app  # noqa: E402
from peft_export.data.synthetic_volume import synthetic_volume  # noqa: E402
from peft_export.errors import PeftExportError  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402
from peft_export.runtime.sam2_session import Sam2Session  # noqa: E402
from peft_export.runtime.sam2_video import Sam2Propagator  # noqa: E402
from peft_export.volume.sam2_propagate import annotation_prompts  # noqa: E402
from peft_export.volume import (  # noqa: E402
    VolumeEmbeddings,
    propagation_methods,
    segment_object_in_volume,
    stack_from_array,
)

SHAPE = (7, 48, 64)


@pytest.fixture(scope="module")
def sam2_export(tmp_path_factory):
    """A random hiera_t exported with its memory graphs, and the same export without them."""
    return sam2_video_export(tmp_path_factory)


@pytest.fixture(scope="module")
def volume():
    """(uint16 stack, its uint8 version, 3D labels) of a small nuclei volume."""
    image, gt = synthetic_volume(SHAPE, seed=2, n_objects=(2, 3), radius=(6.0, 10.0))
    as_uint8 = np.round(image.astype(np.float64) / image.max() * 255).astype(np.uint8)
    return image, as_uint8, gt


def reference(export, frames, prompts, direction="both"):
    """The direct Sam2Propagator: each frame's mask as the last pass over it leaves it."""
    masks = {}
    for z, logits in Sam2Propagator(export).propagate(frames, {1: prompts}, direction=direction):
        masks[z] = logits[1] > 0
    return masks


def annotated(gt):
    """The object crossing the middle plane, and its masks on planes 2 and 4."""
    mid = len(gt) // 2
    ids, counts = np.unique(gt[mid][gt[mid] > 0], return_counts=True)
    obj = ids[np.argmax(counts)]
    masks = {2: gt[2] == obj, 4: gt[4] == obj}
    assert all(m.sum() > 20 for m in masks.values())
    return masks


@pytest.mark.slow
def test_volume_api_equals_sam2_propagator(sam2_export, volume):
    """``segment_object_in_volume`` on a SAM 2 session (method "auto" -> "sam2") gives the masks of SAM 2's own
    propagation with the annotated masks as its conditioning frames; the annotated planes are kept as drawn."""
    export, _ = sam2_export
    _, stack, gt = volume
    session = SamSession(export)
    assert isinstance(session, Sam2Session) and session.has_memory_graphs
    assert propagation_methods(session) == ("sam2",)
    masks = annotated(gt)
    calls = []
    vol = VolumeEmbeddings(session, stack_from_array(stack))
    seg, span = segment_object_in_volume(vol, masks, progress=lambda done, total: calls.append((done, total)))
    want = reference(export, list(stack), {z: {"mask": m} for z, m in masks.items()})
    assert seg.shape == stack.shape and seg.dtype == np.uint8
    for z in range(len(stack)):
        expected = masks[z] if z in masks else want[z]
        np.testing.assert_array_equal(seg[z], expected.astype(np.uint8), err_msg=f"plane {z}")
    found = np.flatnonzero(seg.any(axis=(1, 2)))
    assert span == (found[0], found[-1])
    areas = [int(seg[z].sum()) for z in range(len(stack)) if z not in masks]
    assert len(set(areas)) > 2 and 0 < min(areas) < stack[0].size  # not one trivial mask everywhere
    # SAM 2 visits planes 2..6 forward, then 2..0 backward: 8 visits, each reported
    assert calls == [(i, 8) for i in range(1, 9)]


@pytest.mark.slow
def test_stop_planes_and_cancel(sam2_export, volume):
    """``stop_lower`` + ``stop_upper``: nothing outside the annotated planes, and between them the forward
    pass of SAM 2 (tracking ends at the top annotated plane without changing it); a cancel returns the
    planes done so far."""
    export, _ = sam2_export
    _, stack, gt = volume
    session = SamSession(export)
    masks = annotated(gt)
    vol = VolumeEmbeddings(session, stack_from_array(stack))
    calls = []
    seg, span = segment_object_in_volume(vol, masks, stop_lower=True, stop_upper=True,
                                         progress=lambda done, total: calls.append((done, total)))
    want = reference(export, list(stack), {z: {"mask": m} for z, m in masks.items()}, direction="forward")
    assert not seg[:2].any() and not seg[5:].any()
    np.testing.assert_array_equal(seg[3], want[3].astype(np.uint8))
    assert calls == [(1, 3), (2, 3), (3, 3)] and span == (2, 4)  # planes 2, 3, 4 and no further

    stop = threading.Event()

    def progress(done, total):
        if done == 2:
            stop.set()

    part, _ = segment_object_in_volume(vol, {2: masks[2]}, progress=progress, cancel=stop)
    assert part[2:4].any(axis=(1, 2)).all() and not part[4:].any() and not part[:2].any()


@pytest.mark.slow
def test_predict_propagate_on_a_sam2_export_without_torch(sam2_export, volume, tmp_path):
    """``predict EXPORT stack.tif --propagate --points z,y,x`` on a SAM 2 export (torch and sam2 blocked):
    the click is SAM 2's conditioning frame, the uint16 stack is mapped to uint8 with one range for all
    planes, and each plane's mask is the direct Sam2Propagator's on the frames ``peftexport propagate``
    maps the same way."""
    from peft_export.predict.propagate import stack_to_uint8

    export, _ = sam2_export
    image, _, gt = volume
    tifffile.imwrite(tmp_path / "stack.tif", image, metadata={"axes": "ZYX"})
    masks = annotated(gt)
    ys, xs = np.nonzero(masks[4])
    y, x = int(np.median(ys)), int(np.median(xs))
    args = ["predict", str(export), str(tmp_path / "stack.tif"), "--propagate", "--points", f"4,{y},{x}",
            "-o", str(tmp_path / "obj.tif")]
    script = import_blocker(("torch", "torchvision", "sam2", "onnx")) + (
        f"sys.argv = ['peftexport'] + {args!r}\nfrom peft_export.cli.main import main\nmain()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "annotated 4, propagation sam2)" in res.stdout, res.stdout
    got = tifffile.imread(tmp_path / "obj.tif")
    assert got.shape == image.shape
    frames = stack_to_uint8(list(image), SamSession(export)._intensity_rule)
    want = reference(export, frames, {4: {"points": [[x, y]], "labels": [1]}})
    for z in range(len(image)):
        a, b = got[z] > 0, want[z]
        assert (a & b).sum() >= 0.99 * max((a | b).sum(), 1), z
    assert got.any(axis=(1, 2)).sum() > 1  # carried beyond the clicked plane
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output  # an existing result is kept


@pytest.mark.slow
def test_what_a_sam2_export_cannot_do_in_the_volume_room(sam2_export, volume, tmp_path, tmp_path_factory):
    """One ``error:`` line, exit 2, nothing written: an export without memory graphs asked to propagate,
    the prompts method's options, tiles and embeddings store, and the method named for the wrong export
    (automatic 3D and tracking run on SAM 2: test_volume_sam2_auto.py)."""
    from tiled_helpers import ais_export_dir

    export, plain = sam2_export
    image, stack, gt = volume
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, image, metadata={"axes": "ZYX"})
    out = tmp_path / "o.tif"
    session = SamSession(plain)
    assert not session.has_memory_graphs and propagation_methods(session) == ()
    no_memory = f"{plain}: this export has no memory graphs, so it cannot propagate"
    with pytest.raises(PeftExportError, match=no_memory):
        session.propagate(list(stack), {1: {2: {"mask": annotated(gt)[2]}}})
    with pytest.raises(PeftExportError, match=no_memory):
        segment_object_in_volume(VolumeEmbeddings(session, stack_from_array(stack)), annotated(gt))
    sam = ais_export_dir(tmp_path_factory)  # a SAM export
    assert propagation_methods(SamSession(sam)) == ("prompts",)
    cases = [
        (plain, ("--propagate", "--points", "2,20,20"), no_memory),
        (export, ("--propagate", "--points", "2,20,20", "--tile", "32"), "--tile/--halo/--scale: SAM 2's propagation "
         "resizes each whole plane"),
        (export, ("--propagate", "--points", "2,20,20", "--projection", "box"), "--projection: an option of "
         "--propagation prompts"),
        (export, ("--propagate", "--points", "2,20,20", "--embeddings", tmp_path / "e.zarr"), "keeps no plane "
         "embeddings"),
        (export, ("--propagate", "--points", "2,20,20", "--propagation", "prompts"), "runs on SAM exports"),
        (export, ("--3d", "--points", "2,20,20"), "add --propagate"),
        (sam, ("--propagate", "--points", "2,20,20", "--propagation", "sam2"), "needs a SAM 2 export with memory "
         "graphs"),
    ]
    for where, args, says in cases:
        res = CliRunner().invoke(app, ["predict", str(where), str(path), *map(str, args), "-o", str(out)])
        assert res.exit_code == 2 and says in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, (args, res.output)
        assert not out.exists() and not (tmp_path / "e.zarr").exists()


def test_annotations_become_sam2_conditioning_prompts():
    """Masks as {plane: mask} or as a Z x H x W stack (its non-empty planes), prompts as points / boxes; an
    empty mask is no annotation; planes outside the volume and masks of another size are refused."""
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    stack = np.zeros((3, 4, 5), np.uint8)
    stack[1] = mask
    for given in ({1: mask, 2: np.zeros((4, 5))}, stack):
        prompts = annotation_prompts(given, 3, (4, 5))
        assert list(prompts) == [1] and list(prompts[1]) == ["mask"]
        np.testing.assert_array_equal(prompts[1]["mask"], mask)
    clicks = annotation_prompts({0: {"points": np.array([[1.0, 2.0]])}, 2: {"box": [0, 0, 3, 3]}}, 3, (4, 5))
    assert clicks[0]["labels"].tolist() == [1] and clicks[2] == {"box": [0, 0, 3, 3]}
    with pytest.raises(PeftExportError, match="plane 3: outside the volume"):
        annotation_prompts({3: mask}, 3, (4, 5))
    with pytest.raises(PeftExportError, match=r"shape \(5, 5\), the planes are \(4, 5\)"):
        annotation_prompts({0: np.ones((5, 5))}, 3, (4, 5))
    with pytest.raises(PeftExportError, match="no annotated plane"):
        annotation_prompts(np.zeros((3, 4, 5)), 3, (4, 5))
