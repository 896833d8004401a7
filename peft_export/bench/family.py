"""The bench's decoder components on an export's decoder family, run the way ``SamSession`` runs prompts.

``split_image`` projects the image side once per image (``runtime.split_decoder.FamilyDecoder``
keeps it for the embedding): the bench runs it with the embedding, untimed, as the encoder is.
One timed call is then ``split_prompts`` (the component's prompts, "no mask" input, at most
``MAX_BATCH`` prompts a run) + ``split_masks``. As in the runtime, every decoder
component runs the family where the export has it; exports without it (made before it, or
TensorRT engines) are timed on ``decoder_lowres`` / Meta's ``decoder`` (``runners``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ..runtime.split_decoder import MAX_BATCH, SPLIT_GRAPHS, FamilyDecoder, takes_mask_input

FAMILY = "family"  # the runners' decoder name for the family (split_image + split_prompts + split_masks)


def pick(variants: Mapping[str, Any], precision: str) -> Optional[str]:
    """The runtime's rule for a decoder graph: the asked precision if the export has it, else fp32."""
    prec = precision if precision in variants else "fp32"
    return prec if prec in variants else None


def has_family(graphs: Mapping[str, Any]) -> bool:
    """Whether an export's graphs hold the family the runtime runs prompts through (a split_prompts
    that takes the mask input; older split graphs only served segment-everything)."""
    return all(graphs.get(k) for k in SPLIT_GRAPHS) and takes_mask_input(graphs.get("split_prompts"))


def meta_graph(chosen: Mapping[str, Any]) -> Optional[str]:
    """The runner's decoder graph of Meta's kind: ``decoder_lowres``, else ``decoder``, else None."""
    return next((k for k in ("decoder_lowres", "decoder") if k in chosen), None)


def decoders_used(family: bool, meta: Optional[str]) -> Dict[str, Optional[str]]:
    """What a runner's decoder components run, for the bench's details."""
    used = FAMILY if family else meta
    return {"one_prompt": used, "batch": used}


def no_mask(low_res_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """One "no mask" row (mask_input, has_mask_input), broadcast over every prompt, as the runtime feeds it."""
    return np.zeros((1, 1, low_res_size, low_res_size), np.float32), np.zeros((1,), np.float32)


class HostFamily:
    """The runtime's own ``FamilyDecoder`` over a run function (graph name, feeds) -> {output: array}."""

    def __init__(self, run: Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]], low_res_size: int) -> None:
        self.decoder = FamilyDecoder(run, SPLIT_GRAPHS)
        self._mask = no_mask(low_res_size)

    def context(self, embedding: np.ndarray) -> Dict[str, np.ndarray]:
        """split_image's outputs for ``embedding`` (run once, then kept)."""
        return self.decoder.context(embedding)

    def __call__(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(K,M,2) coords, (K,M) labels (Meta's layout) -> low-res logits (K,4,4g,4g), IoU (K,4)."""
        return self.decoder.decode(embedding, coords, labels, *self._mask)


def ort_run(sessions: Mapping[str, Any]) -> Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]]:
    """A run function over ONNX Runtime sessions by graph name (host arrays in and out)."""
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    return lambda key, feeds: dict(zip(names[key], sessions[key].run(None, feeds)))


class BoundFamily:
    """One component's family calls with ONNX Runtime IO binding: the context, the prompts and
    split_prompts' outputs stay in ``memory`` ("cuda"; "cpu" runs the same chain on the host), so no
    host copies are timed. split_prompts' outputs are allocated once (their shapes from one untimed
    run) and bound as split_masks' inputs."""

    def __init__(self, ort: Any, sessions: Mapping[str, Any], context: Mapping[str, np.ndarray], coords: np.ndarray,
                 labels: np.ndarray, low_res_size: int, memory: str = "cuda", max_batch: int = MAX_BATCH) -> None:
        def put(a: np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32), memory, 0)

        self._prompts, self._masks = sessions["split_prompts"], sessions["split_masks"]
        mask, has_mask = no_mask(low_res_size)
        shared = {**{k: put(v) for k, v in context.items()}, "mask_input": put(mask), "has_mask_input": put(has_mask)}
        host_shared = {**context, "mask_input": mask, "has_mask_input": has_mask}
        self.chain: list = []
        self._keep: list = list(shared.values())  # the OrtValues must outlive the bindings
        step = max(1, int(max_batch))
        for i in range(0, len(coords), step):
            c, lab = coords[i:i + step], labels[i:i + step]
            shapes = self._prompts.run(None, {**host_shared, "point_coords": np.asarray(c, np.float32),
                                              "point_labels": np.asarray(lab, np.float32)})
            outs = {o.name: ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), np.float32, memory, 0)
                    for o, a in zip(self._prompts.get_outputs(), shapes)}
            feeds = {**shared, "point_coords": put(c), "point_labels": put(lab)}
            io_p = self._prompts.io_binding()
            for k, v in feeds.items():
                io_p.bind_ortvalue_input(k, v)
            for k, v in outs.items():
                io_p.bind_ortvalue_output(k, v)
            io_m = self._masks.io_binding()
            io_m.bind_ortvalue_input("keys", outs["keys"])
            io_m.bind_ortvalue_input("mask_weights", outs["mask_weights"])
            io_m.bind_output("low_res_masks", memory, 0)
            self.chain.append((io_p, io_m, outs))
            self._keep += [feeds["point_coords"], feeds["point_labels"]]

    def __call__(self) -> None:
        for io_p, io_m, _ in self.chain:
            self._prompts.run_with_iobinding(io_p)
            self._masks.run_with_iobinding(io_m)
            if hasattr(io_m, "synchronize_outputs"):
                io_m.synchronize_outputs()

    def outputs(self) -> Tuple[np.ndarray, np.ndarray]:
        """The last call's low-res logits (K,4,4g,4g) and IoU (K,4), copied to the host."""
        low = np.concatenate([io_m.copy_outputs_to_cpu()[0] for _, io_m, _ in self.chain])
        iou = np.concatenate([outs["iou_predictions"].numpy() for _, _, outs in self.chain])
        return low, iou
