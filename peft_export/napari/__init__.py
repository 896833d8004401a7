"""Stage 11, napari: the torch-free napari plugin (npe2 manifest ``napari.yaml``): segment with an export,
on 2D images, z-stacks and movies; improve the export from committed objects (in a separate process).

May import: runtime, predict, volume, improve.protocol, data, errors, fsutil (numpy, onnxruntime, napari and Qt only; never torch; tests enforce it).
"""
