"""Stage 7c, volume: z-stacks and time-lapses, torch-free. Stack I/O (multi-page TIFF, zarr,
OME-Zarr; ZYX, TYX, CZYX), every plane embedded once (in memory or a zarr store; background,
progress, cancel), one object propagated through z (micro-sam's ``segment_mask_in_volume``, or on
SAM 2 exports SAM 2's memory: ``sam2_propagate``),
automatic 3D instances (per-plane AIS / segment-everything, SAM and SAM 2 sessions alike, then the multicut
merge across z),
tracking with divisions (laptrack) with napari and Cell Tracking Challenge outputs, and slab by
slab processing of volumes larger than memory (Dask).

May import: runtime, predict, data, errors, fsutil (numpy; zarr, scipy, scikit-image, bioimage-cpp, laptrack, dask lazily; never torch).

    from peft_export.runtime import SamSession
    from peft_export.volume import VolumeEmbeddings, open_stack, segment_object_in_volume, segment_volume, track
    session = SamSession("export")
    volume = VolumeEmbeddings(session, open_stack("stack.tif"), store="stack.embeddings.zarr")
    volume.compute(progress=print)                      # or volume.start() in the background
    labels = segment_volume(session, volume)            # automatic 3D
    mask, (z0, z1) = segment_object_in_volume(volume, {12: mask_on_plane_12})
"""

from .automatic import MODES, Cancelled, segment_frames, segment_planes, segment_volume
from .embeddings import EmbeddingJob, PlaneTiles, VolumeEmbeddings, stack_intensity
from .mask_prompts import PROJECTIONS
from .merge import MERGE_DEFAULTS, merge_instance_segmentation_3d
from .propagate import PROPAGATION_DEFAULTS, masks_from_prompts, segment_object_in_volume
from .sam2_propagate import PROPAGATION_METHODS, propagation_methods, segment_object_with_sam2
from .stacks import Stack, open_stack, stack_from_array
from .tracking import TrackingResult, link_frames, track, write_ctc

__all__ = [
    "Cancelled", "EmbeddingJob", "MERGE_DEFAULTS", "MODES", "PROJECTIONS", "PROPAGATION_DEFAULTS",
    "PROPAGATION_METHODS", "PlaneTiles", "Stack", "TrackingResult", "VolumeEmbeddings", "link_frames",
    "masks_from_prompts", "merge_instance_segmentation_3d", "open_stack", "propagation_methods", "segment_frames",
    "segment_object_in_volume", "segment_object_with_sam2", "segment_planes", "segment_volume", "stack_from_array",
    "stack_intensity", "track", "write_ctc",
]
