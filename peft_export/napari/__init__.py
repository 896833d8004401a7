"""Stage 11, napari: the torch-free napari plugin (npe2 manifest ``napari.yaml``): segment with an export.

May import: runtime, predict, data, errors, fsutil (numpy, onnxruntime, napari and Qt only; never torch; tests enforce it).
"""
