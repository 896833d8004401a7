"""The click decoder as the site ships it: two exact rewrites for onnxruntime-web's wasm kernels.

- **The image's context as initializers.** ``click_decoder`` takes ``split_image``'s outputs
  (10 MB at image size 1024) as inputs, which onnxruntime-web would copy into the wasm heap on
  every click. The site's copy declares them as initializers whose bytes live in an external
  file, ``context.bin``, that the page supplies from memory when it opens a session for an image
  (``externalData``): copied once per image, and every click reads them in place.
- **LayerNorm as element-wise ops.** onnxruntime-web's LayerNormalization kernel takes ~3.5 ms
  per 4096 x 256 tensor on two threads where mean, centring, variance and scaling as separate
  ops take ~2 ms (the graph has three such norms per click). The variance is spelled
  ``Mul(d, d)``, not ``Pow``: ONNX Runtime's LayerNorm fusion would fold ``Pow`` back.

Both keep the function: the same arithmetic in float32 (the norm's rounding differs at the
1e-7 level). ``tests/test_web.py`` checks the rewritten graph against the export's on ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import PeftExportError

CONTEXT_FILE = "context.bin"


def decompose_layer_norms(model: onnx.ModelProto) -> int:
    """Replace every LayerNormalization over the last axis (one output) in place; returns how many."""
    graph = model.graph
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "LayerNormalization" or attrs.get("axis", -1) != -1 or len(node.output) != 1:
            nodes.append(node)
            continue
        p = f"{node.name or 'ln'}/decomposed{count}/"
        count += 1
        x, gamma = node.input[0], node.input[1]
        beta = node.input[2] if len(node.input) > 2 and node.input[2] else None
        graph.initializer.append(numpy_helper.from_array(np.asarray(attrs.get("epsilon", 1e-5), np.float32), p + "eps"))
        scaled = p + "scaled" if beta else node.output[0]
        nodes += [
            helper.make_node("ReduceMean", [x], [p + "mean"], axes=[-1]),
            helper.make_node("Sub", [x, p + "mean"], [p + "centred"]),
            helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squares"]),
            helper.make_node("ReduceMean", [p + "squares"], [p + "var"], axes=[-1]),
            helper.make_node("Add", [p + "var", p + "eps"], [p + "var_eps"]),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
            helper.make_node("Reciprocal", [p + "std"], [p + "inv_std"]),
            helper.make_node("Mul", [p + "centred", p + "inv_std"], [p + "normed"]),
            helper.make_node("Mul", [p + "normed", gamma], [scaled]),
        ]
        if beta:
            nodes.append(helper.make_node("Add", [scaled, beta], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def inputs_to_external_initializers(model: onnx.ModelProto, names: Sequence[str]) -> List[Dict]:
    """Turn the float32 inputs ``names`` (static shapes) into initializers stored in CONTEXT_FILE,
    one after the other in this order. Returns their layout: name, shape, offset and length in bytes."""
    graph = model.graph
    by_name = {i.name: i for i in graph.input}
    layout, offset = [], 0
    for name in names:
        spec = by_name[name].type.tensor_type
        shape = [d.dim_value for d in spec.shape.dim]
        if spec.elem_type != TensorProto.FLOAT or not all(shape):
            raise ValueError(f"{name}: a context input must be float32 with a static shape")
        length = int(np.prod(shape)) * 4
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", CONTEXT_FILE), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        graph.initializer.append(tensor)
        layout.append({"name": name, "shape": shape, "offset": offset, "length": length})
        offset += length
    keep = [i for i in graph.input if i.name not in set(names)]
    del graph.input[:]
    graph.input.extend(keep)
    return layout


def upscaling_products(path: Path) -> List[str]:
    """The click decoder's output-upscaling MatMuls with a stored 2-D weight (256 -> 4x64, 64 -> 4x32)."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.name.startswith("/upscaling/") and n.input[1] in weights]


def web_int8_recipe(path: Path):
    """int8 for the site's click decoder: only the output upscaling's two products (41 % of a click's
    multiply-adds, ~12 % of its time in onnxruntime-web); the attentions, whose other operand changes
    per click, and the small token-side layers stay fp32 (quantising them too costs agreement with
    fp32 and gains nothing in wasm)."""
    from ..export.quantize import Int8Recipe

    only = tuple(upscaling_products(path))
    if len(only) != 2:
        raise PeftExportError(f"{path}: --precision int8 expects the click decoder's two output-upscaling "
                              f"MatMuls, found {list(only) or 'none'}; use --precision fp32 or re-export")
    return Int8Recipe(only=only)


def write_web_click_decoder(source: Path, target: Path, context_names: Sequence[str]) -> List[Dict]:
    """``click_decoder`` (fp32 or int8) -> the site's copy (module docstring); returns the context layout."""
    model = onnx.load(str(source))
    decompose_layer_norms(model)
    layout = inputs_to_external_initializers(model, context_names)
    # Saved as is: onnx.save would try to resolve the external tensors, which exist only in the page.
    Path(target).write_bytes(model.SerializeToString())
    return layout
