"""The finetuning loop: micro-sam's prompts and loss on PEFT-adapted SAM, resumable, DDP-ready.

    summary = finetune(TrainConfig(out="run", data="demo", model_type="tiny", peft="lora"))

One step: ``batch_size`` patches per rank (patch ``(step * world + rank) * batch + b`` of
the seeded PatchSampler, so every rank sees other patches and a resumed run the same
ones); the image encoder runs once per step; then per image up to ``objects_per_image``
objects are prompted with a point (even steps, multimask) or a box (odd steps), followed
by ``sub_iterations`` corrective rounds that add one positive and one negative point from
the error region and feed the previous logits back as mask input with probability
``mask_input_prob``. The decoder iterations backpropagate into a detached copy of the
image embedding, so their graphs are freed one by one and the encoder backward runs once.
With ``instance_decoder`` micro-sam's AIS decoder trains on the same embedding (``ais``).

Longer than 400 lines because it is one class: the step, checkpoint/resume and validation
methods share one run's state (model, optimizer, scheduler, sampler, best metric), which
split modules would have to pass around by hand.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from ..data import PatchSampler, Sample
from ..errors import PeftExportError
from ..fsutil import atomic_file
from ..models.family import is_sam2, model_image_size
from ..peft import count_trainable_parameters
from ..peft.adapters import AdaptedModel, build_adapted_model, save_adapter
from ..runtime.preprocess import to_uint8  # rounding shared with evaluation and inference
from . import losses
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import (
    CONFIG_FILE,
    DEFAULT_EPOCHS,
    LOG_FILE,
    PLOT_FILE,
    RESUME_OVERRIDES,
    TrainConfig,
    check_config,
    option_name,
    resume_differences,
)
from .distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    average_gradients,
    barrier,
    broadcast_object,
    gather_object,
    init_distributed,
    shutdown,
)
from .embedding_cache import EmbeddingCache, check_encoder_frozen, fixed_tiles
from .encoder import encode_with_frozen_prefix, first_trainable_block, frozen_trunk, preprocess_patches, trainable_tail
from .host_memory import keep_freed_memory
from .monitor import Monitor
from .threads import use_free_cores
from .ais import InstanceDecoderTraining
from .plots import plot_training
from .prompting import corrective_points, initial_prompts
from .sam2_path import Sam2Frame, backward_features, features_leaf, preprocess_sam2_patches, sam2_full_resolution
from .validation import fit_patch_size, load_split, validate, validation_set

# Mask pixels per decoder pass on the CPU when --objects-per-pass is not given: 2 objects a pass at
# 1024 x 1024, 8 at 512 x 512, 32 at 256 x 256 (Trainer._image_loss).
CPU_PIXELS_PER_PASS = 2 * 1024 * 1024


def default_objects_per_pass(device: torch.device, label_shape: tuple[int, int], n_objects: int) -> int:
    """All objects at once on a GPU; on the CPU as many as make ``CPU_PIXELS_PER_PASS`` mask pixels."""
    if device.type != "cpu":
        return max(n_objects, 1)
    return max(1, CPU_PIXELS_PER_PASS // (label_shape[0] * label_shape[1]))

# ----------------------------------------------------------------------------- helpers

def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PeftExportError(f"--device {name}: CUDA is not available")
        if dist_info is not None and dist_info.enabled:
            device = torch.device("cuda", dist_info.local_rank)
    return device



class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a resumable checkpoint after this step (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Holds the state of one run; ``run()`` trains and returns the summary."""

    def __init__(self, config: TrainConfig, adapted: AdaptedModel | None = None,
                 samples: tuple[list[Sample], list[Sample]] | None = None,
                 on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 monitor: Monitor | None = None):
        """``adapted``: train this model instead of building one from the config (``improve``: an export's
        model with new decoder layers); ``samples``: (training, validation) samples instead of the
        config's files; ``on_event``: called with each log entry (steps and validations) as it is
        written; ``should_stop``: polled after each step, True stops the run like Ctrl-C does;
        ``monitor``: a learning curve on held-out samples that does not steer the run (``monitor``;
        the summary's ``seconds`` then leave its measurements out)."""
        self.config = config
        self.dist = DistInfo()
        self.prebuilt = adapted
        self.samples = samples
        self.on_event = on_event
        self.should_stop = should_stop
        self.monitor = monitor
        self.emb_cache: EmbeddingCache | None = None
        self.adapted: AdaptedModel | None = None
        self.ais: InstanceDecoderTraining | None = None  # --instance-decoder
        self.n_train_images: int | None = None

    # -- setup ------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    def _resolve_config(self) -> TrainConfig:
        c = self.config
        out = Path(c.out)
        if c.resume:
            if c.overwrite:
                raise PeftExportError("--resume and --overwrite: give one (continue the run, or replace it)")
            saved = out / CONFIG_FILE
            if not saved.is_file():
                raise PeftExportError(f"{out}: nothing to resume ({CONFIG_FILE} not found)")
            stored = TrainConfig.from_dict(json.loads(saved.read_text()))
            diffs = resume_differences(stored, c)
            if diffs:
                raise PeftExportError(
                    f"{out}: --resume continues the stored run with its own settings, but you asked for "
                    f"{'; '.join(diffs)}. Drop these options, or start a new run with another --out "
                    f"(only {', '.join(option_name(n) for n in RESUME_OVERRIDES)} may change on --resume)")
            for name in RESUME_OVERRIDES:
                value = getattr(c, name)
                if name in ("iterations", "epochs"):
                    if c.iterations is None and c.epochs is None:
                        continue  # keep the stored length
                setattr(stored, name, value)
            stored.resume, stored.out = True, str(out)
            c = stored
        elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not c.overwrite:
            raise PeftExportError(f"{out}: run directory exists and is not empty (pass --resume to continue "
                                  "it or --overwrite to replace it)")
        check_config(c)
        return c

    def _prepare_out_dir(self, c: TrainConfig) -> None:
        out = Path(c.out)
        if self.dist.is_main and not c.resume:
            if out.exists() and c.overwrite:
                if out.is_dir():
                    shutil.rmtree(out)
                else:
                    out.unlink()
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / CONFIG_FILE, overwrite=True) as tmp:
                tmp.write_text(json.dumps(c.to_dict(), indent=2))
        barrier(self.dist)

    def _build_model(self, c: TrainConfig) -> None:
        peft_cfg = c.peft_config()
        with warnings.catch_warnings():
            if not self.dist.is_main:
                warnings.simplefilter("ignore")
            self.adapted = self.prebuilt or build_adapted_model(peft_cfg, c.model_type, c.checkpoint, c.image_size,
                                                                seed=c.seed, instance_decoder=c.instance_decoder)
        self.adapted.intensity = dict(c.intensity)
        self.sam = self.adapted.model.to(self.device).train()
        self.sam2 = is_sam2(self.sam)  # SAM 2's image path: training.sam2_path
        self.params = [p for p in self.sam.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.sam.named_parameters() if p.requires_grad]
        self.clip_groups = [list(self.params)]
        if c.instance_decoder:  # its tensors follow SAM's in self.params; param_names names SAM's only
            self.ais = InstanceDecoderTraining(self.adapted.instance_decoder.to(self.device).train(),
                                               c.min_object_size)
            self.params += self.ais.parameters()
            self.clip_groups.append(self.ais.parameters())
        if not self.params:
            raise PeftExportError(f"--peft {c.peft}: nothing to train (encoder, prompt encoder and decoder frozen)")
        if self.sam2:
            from .sam2_path import first_trainable_hiera_block

            self.first_trainable = first_trainable_hiera_block(self.sam)
        else:
            self.first_trainable = first_trainable_block(self.sam)
        self.trainable_counts = count_trainable_parameters(self.sam)
        if self.ais is not None:
            n = sum(p.numel() for p in self.ais.parameters())
            self.trainable_counts = {**self.trainable_counts, "instance_decoder": n,
                                     "total": self.trainable_counts["total"] + n}

    def _setup_cache(self, c: TrainConfig, train: Sequence[Sample]) -> None:
        self.cache: dict[int, torch.Tensor] | None = None
        if c.cache_embeddings:
            self.emb_cache = EmbeddingCache(self.sam, c.embedding_store)
            self.sam.image_encoder.eval()  # frozen: BatchNorm (TinyViT) keeps its running statistics
            self.cache_note = ("embeddings: each training view encoded once, kept in memory"
                               + (f" and in {c.embedding_store}" if c.embedding_store else ""))
            self._log(self.cache_note)
            return
        if not c.cache_frozen_trunk:
            self.cache_note = "off"
            return
        why = None
        if self.sam2:
            why = "SAM 2 runs its frozen Hiera blocks without autograd instead"
        elif c.augment:
            why = "random flips/rotations change every patch (use --no-augment)"
        elif any(max(s.label.shape) > c.patch_size for s in train):
            why = "images larger than the patch are cropped at random positions"
        elif self.first_trainable is None or self.first_trainable == 0:
            why = "no encoder block before the first adapted one is frozen"
        if why:
            self.cache_note = f"not used: {why}"
        else:
            self.cache = {}
            self.cache_note = f"used: output of the {self.first_trainable} frozen block(s) cached per image"
        self._log(f"cache of the frozen trunk {self.cache_note}")

    # -- one step ---------------------------------------------------------------

    def _autocast(self):
        c = self.config
        if c.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if c.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _encode(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        c = self.config
        if self.sam2:
            from .sam2_path import encode_sam2

            return encode_sam2(self.sam, x, self.first_trainable)
        if self.cache is None:
            return encode_with_frozen_prefix(self.sam, x, self.first_trainable, c.grad_checkpointing)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            h = frozen_trunk(self.sam, x[missing], self.first_trainable)
            for i, hi in zip(missing, h):
                self.cache[keys[i]] = hi
        h = torch.stack([self.cache[k] for k in keys])
        return trainable_tail(self.sam, h, self.first_trainable, c.grad_checkpointing)

    def _decode(self, emb: torch.Tensor, coords, labels, boxes, mask_input, multimask: bool):
        sam = self.sam
        if self.sam2:
            from ..models.sam2 import decode

            return decode(sam, emb, coords, labels, boxes, mask_input, multimask)
        points = (coords, labels) if coords is not None else None
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)

    def _image_loss(self, emb: torch.Tensor, label: np.ndarray, input_size: tuple[int, int], use_box: bool,
                    rng: np.random.Generator, scale: float) -> tuple[float, float, float]:
        """All prompting iterations for one image; backpropagates each iteration at once.

        Objects go through the decoder ``objects_per_pass`` at a time, each pass backpropagated
        before the next: the decoder treats objects independently and the loss is a mean over
        them, so the gradient is the same sum, while only one pass's full-resolution masks
        and activations are alive (~200 MB per object at 1024 px). On the CPU two objects a
        pass at 1024 px cost ~2 % more time than five (``default_objects_per_pass``).
        """
        c, sam, dev = self.config, self.sam, self.device
        H, W = label.shape
        transform = Sam2Frame(model_image_size(sam)) if self.sam2 else ResizeLongestSide(sam.image_encoder.img_size)
        objs = initial_prompts(label, c.objects_per_image, rng)
        gt_np = objs.masks
        n_obj = len(gt_np)
        gt = torch.from_numpy(gt_np).to(dev).float().unsqueeze(1)
        n_iter = 1 + c.sub_iterations
        pts = np.zeros((n_obj, 0, 2), np.float32) if use_box else objs.points
        lbl = np.zeros((n_obj, 0), np.int64) if use_box else np.ones((n_obj, 1), np.int64)
        boxes = transform.apply_boxes_torch(torch.from_numpy(objs.boxes).to(dev), (H, W)) if use_box else None
        mask_input = None
        totals = np.zeros(3)
        per_pass = c.objects_per_pass or default_objects_per_pass(dev, (H, W), n_obj)
        for it in range(n_iter):
            multimask = it == 0 and not use_box
            coords = None
            if pts.shape[1]:
                coords = (transform.apply_coords_torch(torch.from_numpy(pts).to(dev), (H, W)),
                          torch.from_numpy(lbl).to(dev))
            preds, prevs = [], []
            for lo in range(0, n_obj, per_pass):
                part = slice(lo, lo + per_pass)
                share = len(gt_np[part]) / n_obj
                with self._autocast():
                    low, iou_pred = self._decode(
                        emb, *((coords[0][part], coords[1][part]) if coords else (None, None)),
                        boxes[part] if boxes is not None else None,
                        mask_input[part] if mask_input is not None else None, multimask)
                if self.sam2:
                    masks = sam2_full_resolution(low.float(), (H, W))
                else:
                    masks = losses.full_resolution_logits(low.float(), sam.image_encoder.img_size, input_size, (H, W))
                loss, dice_l, iou_l, best = losses.sam_loss(masks, iou_pred, gt[part])
                loss_scaled = loss * (share * scale / n_iter)
                if loss_scaled.requires_grad:
                    self._backward(loss_scaled)
                totals += share * np.array([float(loss.detach()), float(dice_l.detach()), float(iou_l.detach())])
                if it + 1 < n_iter:
                    with torch.no_grad():
                        idx = torch.arange(len(best), device=dev)
                        preds.append((masks[idx, best] > 0).cpu().numpy())
                        prevs.append(low[idx, best].detach().float().unsqueeze(1))
                del masks, low, iou_pred, loss, loss_scaled  # not alive while the next pass allocates its own
            if it + 1 < n_iter:
                new_pts, new_lbl = corrective_points(np.concatenate(preds), gt_np, rng)
                pts = np.concatenate([pts, new_pts], axis=1)
                lbl = np.concatenate([lbl, new_lbl], axis=1)
                mask_input = torch.cat(prevs) if rng.random() < c.mask_input_prob else None
        return tuple(totals / n_iter)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _batch(self, step: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        c, W, r = self.config, self.dist.world_size, self.dist.rank
        patches, labels, keys = [], [], []
        for b in range(c.batch_size):
            index = (step * W + r) * c.batch_size + b
            image, label = self.sampler.sample(index)
            patches.append(to_uint8(image))
            labels.append(label)
            keys.append(self.sampler.image_index(index))
        return patches, labels, keys

    def _train_step(self, step: int) -> dict:
        c = self.config
        patches, labels, keys = self._batch(step)
        rng = np.random.default_rng([c.seed, step, self.dist.rank, 11])
        use_box = step % 2 == 1
        if self.emb_cache is not None:
            emb, input_size = self.emb_cache.embed(self.sam, patches, self.device)
        else:
            if self.sam2:
                x, input_size = preprocess_sam2_patches(self.sam, patches, self.device), None
            else:
                x, input_size = preprocess_patches(self.sam, patches, self.device)
            with self._autocast():
                emb = self._encode(x, keys)
        # The decoder iterations backpropagate into this leaf; the encoder backward runs once.
        emb_leaf = features_leaf(emb) if self.sam2 else emb.detach().requires_grad_(emb.requires_grad)
        totals = np.zeros(3)
        for i, label in enumerate(labels):
            totals += self._image_loss(emb_leaf.select(i) if self.sam2 else emb_leaf[i:i + 1], label, input_size,
                                       use_box, rng, 1.0 / len(labels))
        totals /= len(labels)
        if self.ais is not None:  # AIS decoder on the same embedding, into the same leaf (SAM 2: image_embed)
            with self._autocast():
                totals = np.append(totals, self.ais.step_loss(emb_leaf, labels, input_size, self._backward))
        if self.sam2:
            backward_features(emb, emb_leaf)
        elif emb.requires_grad and emb_leaf.grad is not None:
            emb.backward(emb_leaf.grad)
        stats = all_reduce_mean(torch.tensor(totals, dtype=torch.float64), self.dist)
        loss, dice_l, iou_l = (float(v) for v in stats[:3])
        instance_l = float(stats[3]) if self.ais is not None else None
        if not math.isfinite(loss) or (instance_l is not None and not math.isfinite(instance_l)):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": loss, "finite": False}
        average_gradients(self.params, self.dist)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if c.grad_clip and c.grad_clip > 0:
            for group in self.clip_groups:  # SAM and the AIS decoder separately
                torch.nn.utils.clip_grad_norm_(group, c.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "dice_loss": dice_l, "iou_loss": iou_l, "prompt": "box" if use_box else "point",
                "instance_loss": instance_l, "finite": True}

    # -- bookkeeping --------------------------------------------------------------

    def _write_log(self, entry: dict) -> None:
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.on_event is not None:
                self.on_event(entry)

    def _truncate_log(self, step: int) -> None:
        """A resumed run drops log lines written after its checkpoint."""
        if not self.dist.is_main or not self.log_path.is_file():
            return
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a crash mid-write tears only the last line
                    self._log(f"warning: {self.log_path}: dropping a half-written last line (from the crash)")
                    break
                raise PeftExportError(f"{self.log_path}: line {i + 1} is not JSON (the log is damaged; "
                                      "remove it or start a new run without --resume)") from None
            if entry.get("step", 0) <= step:
                keep.append(line)
        with atomic_file(self.log_path, overwrite=True) as tmp:  # a crash now keeps the old log whole
            tmp.write_text("".join(line + "\n" for line in keep))

    def _state(self) -> dict:
        return {"best_metric": self.best_metric, "best_step": self.best_step, "best_val": self.best_val,
                "es_best": self.es_best, "bad_count": self.bad_count}

    def _save_last(self, step: int) -> None:
        rngs = gather_object(rng_state(), self.dist)
        if not self.dist.is_main:
            return
        trainables = {n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)}
        if not all(torch.isfinite(t).all() for t in trainables.values()):
            self._log("warning: trainable tensors are not finite; the last checkpoint is not updated")
            return
        save_checkpoint(self.config.out, {
            "step": step, "trainables": trainables, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs, "state": self._state(),
            "instance_decoder": self.ais.state() if self.ais is not None else None,
            "sampler": {"seed": self.sampler.seed, "samples_per_epoch": len(self.sampler),
                        "next_index": (step * self.dist.world_size) * self.config.batch_size},
            "config": self.config.to_dict(),
        })

    def _restore(self, payload: dict) -> int:
        own = dict(self.sam.named_parameters())
        missing = [n for n in self.param_names if n not in payload["trainables"]]
        if missing:
            raise PeftExportError(f"{self.config.out}: checkpoint lacks trainable tensor {missing[0]}")
        with torch.no_grad():
            for n in self.param_names:
                own[n].copy_(payload["trainables"][n])
        if self.ais is not None:
            if not payload.get("instance_decoder"):
                raise PeftExportError(f"{self.config.out}: checkpoint has no instance decoder to resume")
            self.ais.load_state(payload["instance_decoder"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        rngs = payload["rng"]
        if len(rngs) != self.dist.world_size:
            self._log(f"warning: checkpoint from {len(rngs)} process(es), resuming with {self.dist.world_size}: "
                      "the result will differ from an uninterrupted run")
        set_rng_state(rngs[min(self.dist.rank, len(rngs) - 1)])
        for k, v in payload["state"].items():
            setattr(self, k, v)
        return int(payload["step"])

    def _validate(self, step: int, scheduled: bool) -> dict | None:
        c = self.config
        metrics = None
        if self.dist.is_main and self.val_set:
            t0 = time.perf_counter()
            metrics = validate(self.sam, self.val_set, c.seed, c.val_objects,
                               predictor=self.emb_cache.predictor(self.sam) if self.emb_cache is not None else None)
            if self.ais is not None:
                metrics.update(self.ais.validate(self.sam, self.val_set, metrics))
            metrics["seconds"] = round(time.perf_counter() - t0, 3)
        metrics = broadcast_object(metrics, self.dist)
        improved = False
        value = metrics.get("selection_score", metrics["mean_dice"]) if metrics else None
        if value is not None and (self.best_metric is None or value > self.best_metric):
            self.best_metric, self.best_step, self.best_val = value, step, metrics
            improved = True
        if value is not None and scheduled:
            # Only scheduled validations steer the lr and early stopping, so a run cut
            # into pieces (each ending with a validation) takes the same path.
            self.scheduler.step(value)
            if self.es_best is None or value > self.es_best:
                self.es_best, self.bad_count = value, 0
            else:
                self.bad_count += 1
        if self.dist.is_main:
            if improved or (not self.val_set):
                self._save_best(step)
            self._write_log({"type": "val", "step": step, "epoch": step / self.steps_per_epoch, "metrics": metrics,
                             "best": improved, "scheduled": scheduled,
                             "lr": self.optimizer.param_groups[0]["lr"]})
        return metrics

    def _curve_point(self, step: int, t_start: float) -> None:
        """A learning-curve point (``monitor``), measured by the main process; the training seconds so far
        leave every measurement out, and the encoding the embedding cache did so far is recorded apart."""
        m, self.curve_step = self.monitor, step
        if self.dist.is_main:
            cache = self.emb_cache
            extra = {"encode_seconds": round(cache.seconds, 3), "encoded": cache.encoded} if cache is not None else None
            m.measure(self.sam, self.monitor_set, self.config.seed, step, time.perf_counter() - t_start - m.seconds,
                      extra)
        barrier(self.dist)

    def _save_best(self, step: int) -> None:
        c = self.config
        training = {**c.to_dict(), "best_step": self.best_step if self.val_set else step,
                    "best_metric": self.best_metric,
                    "metric": "mean of point Dice, box Dice and AIS mSA on validation" if self.ais is not None
                    else "mean of point and box Dice on validation",
                    "world_size": self.dist.world_size, "effective_batch_size": c.batch_size * self.dist.world_size,
                    "trainable_parameters": self.trainable_counts, "step": step,
                    "train_images": self.n_train_images}
        validation = {"metrics": self.best_val, "files": [name for _, _, name in self.val_set],
                      "protocol": {"prompts": ["point", "box"], "seed": c.seed, "max_objects_per_image": c.val_objects,
                                   "patch_size": c.patch_size, "min_object_size": c.min_object_size,
                                   "point_multimask": True}}
        save_adapter(self.adapted, c.out, extra={"training": training, "validation": validation}, overwrite=True)

    # -- run ------------------------------------------------------------------------

    def run(self) -> dict:
        c = self._resolve_config()
        self.config = c
        train, val = self.samples if self.samples is not None else load_split(c)  # data problems before any write
        self.n_train_images = len(train)  # recorded in adapter.json (the web page says what the model saw)
        c = self.config = fit_patch_size(c, train, self._log)
        device = _resolve_device(c.device)
        if c.peft == "qlora":
            from ..peft.qlora import require_qlora_device

            require_qlora_device(device)
        use_cuda = device.type == "cuda"
        self.dist = init_distributed(use_cuda)
        if not use_cuda and (c.threads is not None or self.dist.world_size == 1):
            use_free_cores(c.threads, self._log)  # DDP ranks share the cores: torchrun sets OMP_NUM_THREADS
        try:
            with keep_freed_memory(enabled=not use_cuda):  # CPU steps stop re-faulting their pages (host_memory)
                return self._run(c, train, val)
        finally:
            shutdown(self.dist)

    def _run(self, c: TrainConfig, train: list[Sample], val: list[Sample]) -> dict:
        t_start = time.perf_counter()
        self.device = _resolve_device(c.device, self.dist)
        if c.precision == "fp16" and self.device.type != "cuda":
            raise PeftExportError("--precision fp16: needs CUDA (use fp32 or bf16 on the CPU)")
        torch.manual_seed(c.seed + self.dist.rank)
        if c.cache_embeddings:  # fixed tiles instead of random crops: a tile's views are encoded once
            train = fixed_tiles(train, c.patch_size, c.min_object_size)
        self.sampler = PatchSampler.from_samples(train, patch_size=c.patch_size, min_object_size=c.min_object_size,
                                                 augment=c.augment, seed=c.seed)
        self.val_set = validation_set(val, c.patch_size, c.min_object_size, c.seed)
        self._build_model(c)  # bad --rank / --blocks / checkpoint: refused before anything is written
        if c.cache_embeddings:
            check_encoder_frozen(self.sam)  # refused before anything is written too
        self._prepare_out_dir(c)
        out = Path(c.out)
        self.log_path = out / LOG_FILE
        if not self.val_set:
            self._log("warning: no validation set (add --val-data or --val-fraction with several files): "
                      "the adapter of the last step is kept")
        self._setup_cache(c, train)
        per_step = c.batch_size * self.dist.world_size
        self.steps_per_epoch = max(1, math.ceil(len(self.sampler) / per_step))
        total = c.iterations or (c.epochs or DEFAULT_EPOCHS) * self.steps_per_epoch
        val_every = c.val_every or self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=c.lr_factor,
                                                                    patience=c.lr_patience)
        self.scaler = torch.amp.GradScaler("cuda") if c.precision == "fp16" else None
        self.best_metric = self.best_step = self.best_val = self.es_best = None
        self.bad_count = 0
        step = 0
        if c.resume:
            step = self._restore(load_checkpoint(out))
            self._truncate_log(step)
            self._log(f"resuming {out} at step {step}")
        elif self.dist.is_main and self.log_path.exists():
            self.log_path.unlink()
        if self.dist.is_main:
            counts = self.trainable_counts
            self._log(f"training {c.model_type} ({model_image_size(self.sam)}px) with {c.peft}: "
                      f"{counts['total']:,} trainable parameters (encoder {counts['image_encoder']:,}"
                      + (f", AIS decoder {counts['instance_decoder']:,}" if self.ais is not None else "") + "); "
                      f"{len(train)} training / {len(self.val_set)} validation images; {total} steps; "
                      f"effective batch size {per_step} ({c.batch_size} x {self.dist.world_size} process(es)); "
                      f"device {self.device}, {c.precision}")
        if self.monitor is not None:
            self.monitor.points.clear()
            self.monitor.seconds = 0.0
            self.monitor_set = validation_set(self.monitor.samples, c.patch_size, c.min_object_size, c.seed)
            self._curve_point(step, t_start)  # the starting model
        if step == 0 and c.validate_at_start:
            self._validate(0, scheduled=False)
        bar = None
        if c.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
        status, message = "completed", ""
        last_val_step = step
        try:
            with _StopFlag() as stop:
                while step < total:
                    t0 = time.perf_counter()
                    res = self._train_step(step)
                    if not res["finite"]:
                        status = "nan"
                        message = (f"loss is {res['loss']} at step {step + 1}: training stopped; the best adapter "
                                   f"(step {self.best_step}) in {out} is kept. Try a lower --lr or --precision fp32.")
                        break
                    step += 1
                    entry = {"type": "step", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                             "loss": res["loss"], "dice_loss": res["dice_loss"], "iou_loss": res["iou_loss"],
                             "prompt": res["prompt"], "lr": self.optimizer.param_groups[0]["lr"],
                             **({"instance_loss": res["instance_loss"]} if self.ais is not None else {}),
                             "seconds": round(time.perf_counter() - t0, 4),
                             "peak_memory_mb": round(_peak_memory_mb(self.device), 1)}
                    self._write_log(entry)
                    if self.monitor is not None and self.monitor.due(step, total):
                        self._curve_point(step, t_start)
                    if step % val_every == 0 or step == total:
                        self._validate(step, scheduled=step % val_every == 0)
                        last_val_step = step
                        self._save_last(step)
                        if self.dist.is_main:
                            plot_training(self.log_path, out / PLOT_FILE)
                    elif c.save_every and step % c.save_every == 0:
                        self._save_last(step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{res['loss']:.4f}", val=(f"{self.best_metric:.4f}"
                                        if self.best_metric is not None else "-"))
                    if self.val_set and self.bad_count >= c.patience:
                        status = "early_stopped"
                        self._log(f"\nearly stopping at step {step}: no better validation Dice in {c.patience} "
                                  "validations")
                        if last_val_step != step:
                            self._save_last(step)
                        break
                    if any_rank(stop.requested or bool(self.should_stop and self.should_stop()), self.dist):
                        status = "interrupted"
                        if last_val_step != step:
                            self._save_last(step)
                        break
        finally:
            if bar is not None:
                bar.close()
        if self.monitor is not None and status == "early_stopped" and self.curve_step != step:
            self._curve_point(step, t_start)
        if self.dist.is_main and status in ("completed", "early_stopped", "interrupted", "nan"):
            if self.log_path.exists():
                plot_training(self.log_path, out / PLOT_FILE)
        summary = {
            "out": str(out), "status": status, "steps": step, "total_steps": total,
            "best_step": self.best_step, "best_metric": self.best_metric, "best_validation": self.best_val,
            "effective_batch_size": per_step, "world_size": self.dist.world_size, "rank": self.dist.rank,
            "trainable_parameters": self.trainable_counts, "cache_frozen_trunk": self.cache_note,
            "embeddings": ({"encoded": self.emb_cache.encoded, "reused": self.emb_cache.reused}
                           if self.emb_cache is not None else None),
            "instance_decoder": self.ais is not None,
            "seconds": round(time.perf_counter() - t_start - (self.monitor.seconds if self.monitor else 0.0), 2),
            "device": str(self.device),
            "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
            **({"monitor": self.monitor.record()} if self.monitor is not None else {}),
        }
        if status == "nan":
            raise PeftExportError(message)
        return summary


def finetune(config: TrainConfig) -> dict:
    """Train a PEFT adapter as ``peftexport finetune`` does; returns the run summary.

    Writes into ``config.out``: adapter.safetensors + adapter.json (best validation Dice),
    last/checkpoint.pt (resumable), train_config.json, train_log.jsonl, training.png.
    """
    return Trainer(config).run()
