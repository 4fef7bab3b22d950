"""``mtseg predict``: a trained checkpoint applied to image files, with pictures a person reads.

    mtseg predict --checkpoint s3://bucket/runs/demo/checkpoint_000012 photos/ cat.jpg s3://bucket/more/ --out preds/

For every readable image (decoded as training decodes it, downscaled first when a side
exceeds ``data.max_image_side``)::

    <out>/<name>_overlay.png        for a person: fused segmentation, instance outlines, a legend of the classes present
    <out>/<name>_<task>.png         for a person: each other task's picture, as its task draws it
    <out>/<name>_semantic.png       for a program: the fused class of every pixel (below)
    <out>/<name>_instances.json     for a program: the image's instances as COCO results (compressed RLE)
    <out>/<name>_panoptic.png       for a program, panoptic models: COCO's panoptic PNG (segment id = R + 256 G + 256^2 B)
    <out>/<name>_panoptic.json      ... and its COCO annotation entry (file_name, segments_info with category ids)

plus ``coco_results.json`` (all instances) and ``summary.json`` (images, and every skipped
file or image-less input with the reason). Images go through the validation transform, the model
and the fusion (:func:`mtseg.train.loop.predict_batch`, the code validation uses); every output
is resized back to the image's own size (nearest neighbour for labels).

``<name>_semantic.png`` is a single-channel 8-bit PNG (PIL mode ``P``) holding the dataset's own
label ids: the COCO ``category_id`` of each pixel's class (for data from ``mtseg data import-masks``,
the mask value it read). Pixels of no class hold :func:`void_label`: 0 (background; COCO has no
category 0) in an instances label space, 255 (void) in a panoptic one. Its palette is the
dataset's colours (those the overlay uses), so viewers show it in colour while ``np.asarray(Image.open(f))``
gives the ids. A label space whose ids do not fit (an id above 255, or one equal to the void
value) is refused before any image is read.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs
from tqdm import tqdm

from mtseg import storage
from mtseg.config import Config
from mtseg.data.categories import CategoryIndex
from mtseg.errors import MtsegError

# torch, PIL and the model code are imported where used: `mtseg <any command>` builds this
# module's argument parser, and should not pay seconds of torch import for it.
if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

#: File name endings a directory or prefix listing picks up (named files are always tried); their
#: formats are what the message for a file that is no image names (tests read one file of each).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

#: Instances drawn in the overlay (the COCO results keep every instance, as COCOeval wants).
OVERLAY_SCORE_THRESHOLD = 0.5

#: Files read and decoded ahead of the model, in threads (decoding and S3 reads release the GIL).
READ_THREADS = 4


class PredictError(MtsegError, ValueError):
    """Bad input to ``mtseg predict`` / ``mtseg evaluate``; the message says what was wrong."""


# ---------------------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``; PredictError if CUDA is asked for and absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PredictError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(name)
    raise PredictError(f"--device {name!r}: expected auto, cpu or cuda")


# ---------------------------------------------------------------------------- inference


@dataclass
class ImagePrediction:
    """One image's outputs, at the image's own size.

    Attributes:
        semantic: (H, W) int64 fused class map (0 = background).
        maps: ``{task: task.output_map(...)}`` of every task fusion does not replace.
        instances: COCO result dicts (``segmentation`` compressed RLE at (H, W)).
        panoptic: for a panoptic label space with an instance head, the (H, W) segment-id map
            and its COCO ``segments_info`` (:func:`mtseg.fusion.fuse_panoptic`); else None.
    """

    image_id: int
    semantic: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    instances: list[dict] = field(default_factory=list)
    panoptic: tuple[np.ndarray, list[dict]] | None = None


class Predictor:
    """A trained model plus the pre- and post-processing that maps images to :class:`ImagePrediction`.

    Args:
        model: from :func:`mtseg.train.checkpoint.build_inference_model`, on ``device``.
        checkpoint_uri: where the weights came from (recorded in outputs).
    """

    def __init__(self, cfg: Config, categories: CategoryIndex, model: nn.Module, device: torch.device, checkpoint_uri: str = ""):
        import torch

        from mtseg.data.transforms import build_transform
        from mtseg.tasks import build_tasks

        self.cfg = cfg
        self.categories = categories
        self.model = model
        self.device = torch.device(device)
        self.checkpoint_uri = checkpoint_uri
        self.tasks = build_tasks(cfg, categories)
        self._resize_in = build_transform(cfg.data.image_size, train=False)

    @classmethod
    def from_checkpoint(cls, uri: str, *, device: str = "auto", data_uri: str | None = None) -> Predictor:
        """Load ``uri`` (see :func:`mtseg.train.checkpoint.load_for_inference`) onto ``device`` (see :func:`pick_device`)."""
        from mtseg.train.checkpoint import build_inference_model, load_for_inference

        dev = pick_device(device)
        loaded = load_for_inference(uri, data_uri=data_uri)
        model = build_inference_model(loaded.cfg, loaded.categories, loaded.model_state, dev)
        return cls(loaded.cfg, loaded.categories, model, dev, checkpoint_uri=loaded.uri)

    def predict(self, images: Sequence[torch.Tensor], image_ids: Sequence[int]) -> list[ImagePrediction]:
        """Run a batch of decoded images of any sizes.

        Args:
            images: uint8 (3, H, W) RGB tensors (:func:`mtseg.data.transforms.decode_image`).
            image_ids: the id each image gets in its COCO results.

        Returns:
            One :class:`ImagePrediction` per image, every map at that image's size.
        """
        import torch

        from mtseg.data.pipeline import to_torch
        from mtseg.fusion import fuse_panoptic, fused_predictions, instances_to_coco
        from mtseg.tasks.base import resize_map
        from mtseg.train.loop import _autocast, predict_batch

        if len(images) != len(image_ids):
            raise ValueError(f"predict: {len(images)} images but {len(image_ids)} ids")
        if not images:
            return []
        # The validation resize and the stream's own uint8 -> float conversion: the model gets
        # exactly the input it gets in `mtseg evaluate` and training validation.
        resized = torch.stack([self._resize_in(im) for im in images])
        batch = {"image": to_torch({"image": resized.numpy()})["image"].to(self.device)}
        if self.cfg.model.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(self.device, self.cfg.train.amp):
            outputs, semantic, instances = predict_batch(self.model, batch, self.tasks, self.cfg, self.categories)
        outputs = {k: v.float().cpu() for k, v in outputs.items()}
        semantic = semantic.cpu()
        fused = fused_predictions(semantic)  # drawn in the overlay
        preds = []
        for i, (image, image_id) in enumerate(zip(images, image_ids)):
            size = (int(image.shape[1]), int(image.shape[2]))
            pred = ImagePrediction(image_id=int(image_id), semantic=resize_map(semantic[i : i + 1], size, "nearest")[0].numpy())
            for name, task in self.tasks.items():
                values = None if name in fused else task.output_map(outputs[name][i], size)
                if values is not None:
                    pred.maps[name] = values
            if instances is not None:
                pred.instances = instances_to_coco(instances[i], int(image_id), self.categories, orig_size=size)
                if self.categories.panoptic:
                    pred.panoptic = fuse_panoptic(
                        semantic[i], instances[i], self.categories, min_area=self.cfg.tasks.panoptic_min_area, orig_size=size
                    )
            preds.append(pred)
        return preds


# ---------------------------------------------------------------------------- pictures


def render(
    image: np.ndarray,
    pred: ImagePrediction,
    categories: CategoryIndex,
    tasks: dict,
    score_threshold: float = OVERLAY_SCORE_THRESHOLD,
) -> dict[str, Image.Image]:
    """The pictures of one prediction on its (H, W, 3) uint8 image: ``{"overlay": ..., task: ...}`` (PIL).

    Args:
        image: the image the prediction is of.
        pred: its prediction (maps at the image's size).
        categories: the label space (class names and colours).
        tasks: :attr:`Predictor.tasks`; each draws its own map.
        score_threshold: the overlay outlines instances scoring at least this.

    Returns:
        ``{"overlay": fused classes in the dataset's colours + instance outlines + a legend of
        the classes present, task: that task's picture}``.
    """
    from PIL import Image

    from mtseg.render import Picture, class_picture, outlines

    fused = class_picture(image, pred.semantic, categories)
    overlay = Picture(outlines(fused.pixels, pred.instances, score_threshold), fused.entries, fused.colours)
    pictures = {"overlay": overlay.image()}
    for name, values in pred.maps.items():
        picture = tasks[name].draw(image, values, categories)
        if isinstance(picture, Picture):
            picture = picture.image()
        pictures[name] = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    return pictures


# ---------------------------------------------------------------------------- outputs a program reads


def void_label(categories: CategoryIndex) -> int:
    """The value of a pixel of no class in ``<name>_semantic.png``: 255 (void) for a panoptic label
    space, whose class index 0 is void; 0 (background) otherwise, as COCO has no category 0."""
    return 255 if categories.panoptic else 0


def label_id_table(categories: CategoryIndex) -> np.ndarray:
    """Class index -> dataset label id, as ``<name>_semantic.png`` stores them.

    Returns:
        (num_classes,) uint8: :func:`void_label` at 0, ``categories.coco_id_of(i)`` at ``i >= 1``.

    Raises:
        PredictError: an id does not fit in 8 bits, or equals the void value.
    """
    void = void_label(categories)
    ids = [void, *categories.coco_ids]
    clash = [i for i in categories.coco_ids if i == void or not 0 <= i <= 255]
    if clash:
        kind = "panoptic (void = 255)" if categories.panoptic else "instances (background = 0)"
        raise PredictError(
            f"the dataset's category ids {clash} do not fit the 8-bit class-index PNG of a {kind} label space: "
            f"ids must be 0..255 and differ from {void}"
        )
    return np.array(ids, np.uint8)


def semantic_png(semantic: np.ndarray, categories: CategoryIndex) -> Image.Image:
    """The fused class map as label ids (:func:`label_id_table`), a palette PNG image (mode ``P``).

    Args:
        semantic: (H, W) class indices (:attr:`ImagePrediction.semantic`).
        categories: the label space.

    Returns:
        A single-channel image of the same size whose palette gives each label id its class's
        colour (the overlay's; black for void/background and unused ids).
    """
    from PIL import Image

    from mtseg.render import class_colours

    table = label_id_table(categories)
    if semantic.size and (semantic.min() < 0 or semantic.max() >= len(table)):
        raise ValueError(f"semantic_png: class indices {semantic.min()}..{semantic.max()} outside 0..{len(table) - 1}")
    ids = np.ascontiguousarray(table[semantic.astype(np.int64)])
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    colours = np.zeros((256, 3), np.uint8)
    colours[table[1:]] = class_colours(categories)[1 : len(table)]
    image.putpalette(colours.tobytes())
    return image


def prediction_files(name: str, pred: ImagePrediction, categories: CategoryIndex) -> dict[str, bytes]:
    """The files a program reads for one image.

    Args:
        name: the image's output stem.
        pred: its prediction.
        categories: the label space.

    Returns:
        ``{file name: content}``: ``<name>_semantic.png`` (:func:`semantic_png`),
        ``<name>_instances.json`` (COCO results) and, for a panoptic prediction, COCO's
        ``<name>_panoptic.png`` with ``<name>_panoptic.json`` (its annotation entry:
        ``file_name`` and ``segments_info``, as in a ``panoptic_<split>.json``).
    """
    from mtseg.data.coco_panoptic import annotation_entry, write_png

    files = {
        f"{name}_semantic.png": _png(semantic_png(pred.semantic, categories)),
        f"{name}_instances.json": json.dumps(pred.instances).encode(),
    }
    if pred.panoptic is not None:
        ids, segments = pred.panoptic
        files[f"{name}_panoptic.png"] = write_png(ids)
        files[f"{name}_panoptic.json"] = json.dumps(annotation_entry(pred.image_id, f"{name}_panoptic.png", segments)).encode()
    return files


# ---------------------------------------------------------------------------- inputs


def find_images(inputs: Sequence[str]) -> list[str]:
    """Expand files (tried whatever their name), directories and ``s3://`` prefixes (their
    :data:`IMAGE_EXTENSIONS` files, recursively, sorted) into image sources, in order, each once;
    PredictError for no inputs or a missing one. An input holding no image file adds nothing."""
    return _find_images(inputs)[0]


def _find_images(inputs: Sequence[str]) -> tuple[list[str], list[dict]]:
    """:func:`find_images`, plus a ``{"source", "error"}`` for each input holding no image file."""
    if not inputs:
        raise PredictError("no images given: name image files, directories or s3:// prefixes")
    sources: dict[object, str] = {}  # the file itself -> the first path naming it
    empty: list[dict] = []
    for item in inputs:
        item = str(item)
        fs, path = storage.resolve(item)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            sources.setdefault(_file_identity(item), item)
            continue
        if info.type == pafs.FileType.Directory and not storage.is_s3(item):
            listed = _walk(path)
        else:
            listed = storage.list_files(item, recursive=True)  # an S3 prefix is no object of its own
        if info.type != pafs.FileType.Directory and not listed:
            raise PredictError(f"{item}: no such file or directory")
        found = sorted(f for f in listed if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            empty.append({"source": item, "error": f"{item}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found"})
        for f in found:
            sources.setdefault(_file_identity(f), f)
    return list(sources.values()), empty


def _file_identity(source: str) -> object:
    """What makes two sources one file: for a local one (device, inode), whatever path or link reaches it."""
    if storage.is_s3(source):
        return source
    st = os.stat(storage.resolve(source)[1])
    return (st.st_dev, st.st_ino)


def _walk(directory: str) -> list[str]:
    """The regular files below a local ``directory``, following links into each real directory once.

    A listing that follows links blindly loops through a link to an ancestor (``sub/up -> ..``)
    until the OS refuses: 7 images became 287 predictions, 40 levels deep.
    """
    seen = {_file_identity(directory)}

    def first_visit(path: str) -> bool:
        key = _file_identity(path)
        if key in seen:
            return False
        seen.add(key)
        return True

    def fail(e: OSError):
        raise PredictError(f"{e.filename}: cannot list ({e.strerror})")

    files = []
    for parent, dirs, names in os.walk(directory, onerror=fail, followlinks=True):
        # Sorted, so that of two paths to one directory the same one is walked on every machine.
        dirs[:] = [d for d in sorted(dirs) if first_visit(os.path.join(parent, d))]
        files.extend(p for p in (os.path.join(parent, n) for n in names) if os.path.isfile(p))  # not a broken link
    return files


def read_image(source: str, *, max_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read and decode one image (local or ``s3://``) as training does; ValueError naming the source if it cannot.

    Returns:
        ``(pixels, (height, width))``: uint8 (3, h, w) pixels and the file's own size.
    """
    from mtseg.data.transforms import load_image

    try:
        data = storage.read_bytes(source)
    except (storage.StorageError, OSError) as e:
        raise ValueError(f"{source}: {e}") from None
    try:
        return load_image(data, max_side=max_side)
    except (ValueError, OSError) as e:
        if data and not _known_image_format(data):
            # The decoder's own reason would name only the formats torchvision reads, not the ones mtseg converts.
            raise ValueError(f"{source}: not an image mtseg reads ({_image_formats()} or another format Pillow opens)") from None
        raise ValueError(f"{source}: {e}") from None


def _known_image_format(data: bytes) -> bool:
    """Whether Pillow recognises the format of ``data`` (it knows every format the decoder reads, and more)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):  # reads the header only
            pass
    except UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001 - a format Pillow knows, in a file it refuses (too large, broken header)
        return True
    return True


def _image_formats() -> str:
    """The formats of :data:`IMAGE_EXTENSIONS` as Pillow names them: ``JPEG, PNG, ...``."""
    from PIL import Image

    names = Image.registered_extensions()
    return ", ".join(dict.fromkeys(names[ext] for ext in IMAGE_EXTENSIONS))


def _output_names(sources: Sequence[str]) -> list[str]:
    """A distinct file stem per source (``name``, ``name-2``, ... when names repeat)."""
    used: set[str] = set()
    names = []
    for src in sources:
        stem = os.path.splitext(posixpath.basename(src.rstrip("/")))[0] or "image"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------- the command


@dataclass
class PredictSummary:
    """What ``predict_images`` did: ``images`` ``[{"image_id", "source", "name", "height", "width",
    "instances", "files"}]``, ``skipped`` ``[{"source", "error"}]``, the ``out`` directory, wall ``seconds``."""

    images: list[dict]
    skipped: list[dict]
    out: str
    seconds: float


def _png(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def predict_images(
    checkpoint: str,
    inputs: Sequence[str],
    out: str,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    max_image_side: int | None = None,
    data_uri: str | None = None,
    score_threshold: float = OVERLAY_SCORE_THRESHOLD,
    progress: bool = True,
    predictor: Predictor | None = None,
) -> PredictSummary:
    """Predict every image of ``inputs`` and write the pictures, class-index PNGs and COCO results into ``out``.

    Args:
        checkpoint: checkpoint or run directory, local or ``s3://``.
        inputs: see :func:`find_images`.
        out: output directory, local or ``s3://``.
        device: see :func:`pick_device`.
        batch_size, max_image_side: default the run's ``data.batch_size``, ``data.max_image_side``.
        data_uri: dataset to read the label space from when the checkpoint lacks it.
        progress: a tqdm bar on a terminal; in a log, a plain line every tenth of the images.
        predictor: an already loaded model (then ``checkpoint``/``device`` are not used).

    Returns:
        A :class:`PredictSummary`; its content is also written to ``<out>/summary.json``.

    Raises:
        PredictError: bad input or ``out``, found before the model is loaded.
        mtseg.storage.StorageError: a malformed URI or an ``out`` that cannot be written.
    """
    t0 = time.monotonic()
    # Everything a user can get wrong fails here, before minutes of loading and inference.
    if batch_size is not None and batch_size < 1:
        raise PredictError(f"--batch-size: must be >= 1, got {batch_size}")
    if max_image_side is not None and max_image_side < 16:
        raise PredictError(f"--max-image-side: must be >= 16, got {max_image_side}")
    out = storage.check_uri(out)
    try:
        storage.check_access(out)
    except storage.StorageError as e:
        raise PredictError(f"--out {e}") from None
    sources, skipped = _find_images(inputs)
    for entry in skipped:  # inputs holding no image file: skipped as an unreadable file is, so the exit code says so
        print(f"[predict] skipping {storage.redact(entry['error'])}", file=sys.stderr)
    if predictor is None:
        predictor = Predictor.from_checkpoint(checkpoint, device=device, data_uri=data_uri)
    label_id_table(predictor.categories)  # ids that cannot go into the class-index PNG fail before any image
    batch_size = batch_size if batch_size is not None else predictor.cfg.data.batch_size
    max_side = max_image_side if max_image_side is not None else predictor.cfg.data.max_image_side
    names = _output_names(sources)
    in_log = not sys.stderr.isatty()  # a bar redrawn with \r would fill a log with one line per update
    bar = tqdm(total=len(sources), desc="[predict]", unit="img", disable=not progress or in_log)
    log_every, t_images = max(1, len(sources) // 10), time.monotonic()
    images: list[dict] = []
    all_results: list[dict] = []
    chunks = [list(range(i, min(i + batch_size, len(sources)))) for i in range(0, len(sources), batch_size)]

    def _read(i: int):
        try:
            return read_image(sources[i], max_side=max_side)
        except ValueError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        pending = [pool.submit(_read, i) for i in chunks[0]] if chunks else []
        for n, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            # Read the next batch while this one runs through the model.
            pending = [pool.submit(_read, i) for i in chunks[n + 1]] if n + 1 < len(chunks) else []
            ok, original = [], {}
            for i, item in zip(chunk, decoded):
                if isinstance(item, Exception):
                    skipped.append({"source": sources[i], "error": str(item)})
                    tqdm.write(f"[predict] skipping {storage.redact(str(item))}", file=sys.stderr)
                    continue
                image, size = item
                ok.append((i, image))
                if size != tuple(image.shape[1:]):
                    original[i] = size
                    tqdm.write(
                        f"[predict] {storage.redact(sources[i])}: {size[1]}x{size[0]} downscaled to "
                        f"{image.shape[2]}x{image.shape[1]} (max image side {max_side}); outputs are at that size",
                        file=sys.stderr,
                    )
            # Ids follow input order, so a file keeps its id whatever else fails.
            preds = predictor.predict([im for _, im in ok], [i + 1 for i, _ in ok])
            for (i, image), pred in zip(ok, preds):
                pictures = render(image.permute(1, 2, 0).numpy(), pred, predictor.categories, predictor.tasks, score_threshold)
                written = {f"{names[i]}_{kind}.png": _png(picture) for kind, picture in pictures.items()}
                data = prediction_files(names[i], pred, predictor.categories)
                if set(data) & set(written):  # a task named like an output (semantic is fused, so never drawn)
                    raise PredictError(f"a task's picture would overwrite {sorted(set(data) & set(written))}")
                written.update(data)
                files = list(written)
                for file, content in written.items():
                    storage.write_bytes(storage.join(out, file), content)
                all_results.extend(pred.instances)
                images.append(
                    {
                        "image_id": pred.image_id,
                        "source": sources[i],
                        "name": names[i],
                        "height": int(image.shape[1]),
                        "width": int(image.shape[2]),
                        "instances": len(pred.instances),
                        "files": files,
                    }
                )
                if i in original:
                    images[-1]["downscaled_from"] = {"height": original[i][0], "width": original[i][1]}
            bar.update(len(chunk))
            bar.set_postfix(skipped=len(skipped))
            done = chunk[-1] + 1
            if progress and in_log and (done == len(sources) or done // log_every > (done - len(chunk)) // log_every):
                rate = (done - len(skipped)) / max(time.monotonic() - t_images, 1e-9)
                print(f"[predict] {done}/{len(sources)} images, {len(skipped)} skipped, {rate:.1f} img/s", file=sys.stderr)
    bar.close()
    storage.write_bytes(storage.join(out, "coco_results.json"), json.dumps(all_results).encode())
    summary = PredictSummary(images=images, skipped=skipped, out=out, seconds=time.monotonic() - t0)
    record = {
        "checkpoint": predictor.checkpoint_uri or checkpoint,
        "images": images,
        "skipped": skipped,
        "categories": predictor.categories.to_categories(),
        "seconds": round(summary.seconds, 3),
    }
    storage.write_bytes(storage.join(out, "summary.json"), (json.dumps(record, indent=1) + "\n").encode())
    return summary
