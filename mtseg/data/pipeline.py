"""The data stream: parquet shards -> decode -> joint augmentation -> task targets -> batches.

One function does the per-image work, :class:`SampleTransform`, and two drivers feed it:

* Ray Data (:func:`read_split` + :func:`build_stream`): ``read_parquet`` of the shard files a
  manifest lists, from a local directory or S3 through the pyarrow filesystem of
  :func:`mtseg.storage.resolve`, then ``map_batches`` on CPU workers. The streaming executor
  keeps a bounded number of blocks in flight, so memory does not grow with the number of
  shards; nothing here materializes the dataset. Train workers take their part with
  ``streaming_split`` / ``get_dataset_shard`` and ``iter_torch_batches``.
* plain pyarrow (:func:`iter_local_batches`): the same transform over the shards read row
  group by row group, for the evaluator and for tests that run without Ray.

Rows become the training-batch contract (numpy in the stream, torch after :func:`to_torch`):
``image`` float32 (B, 3, S, S) in [0, 1]; ``semantic``/``supercategory`` int64 (B, S, S);
``boundary``/``thing_mask`` float32 (B, S, S); ``center`` float32 (B, 1, S, S); ``offset``
float32 (B, 2, S, S); ``image_id`` int64 (B,); ``orig_size`` int64 (B, 2) as (height, width).
Validation uses the same code with ``train=False`` (a plain resize, no randomness).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtseg import storage
from mtseg.data.categories import CategoryIndex
from mtseg.data.manifest import read_manifest, shard_uris
from mtseg.data.targets import build_targets, decode_annotations
from mtseg.data.transforms import apply_joint, build_transform, decode_image, sample_seed, to_float_image

if TYPE_CHECKING:  # Ray is imported lazily: the non-Ray path must not pay for it
    import ray.data

    from mtseg.config import Config

#: Shard columns the stream reads (``file_name`` is for people, not for training).
READ_COLUMNS = ("image_id", "height", "width", "image", "annotations")

#: Keys of a batch, in contract order.
BATCH_KEYS = (
    "image", "semantic", "supercategory", "boundary", "center", "offset", "thing_mask", "image_id", "orig_size",
)

#: Rows per ``map_batches`` call: small, so a task's working set (decoded full-size images
#: and masks) stays small, and large enough to amortise the per-call overhead.
MAP_BATCH_SIZE = 16

#: Rows per block entering the map: the unit of parallelism of decode + targets.
REPARTITION_ROWS = 64

#: Rows per pyarrow record batch on the local path.
LOCAL_READ_BATCH = 64


@dataclass(frozen=True)
class SampleTransform:
    """Decode + joint augmentation + targets for shard rows; picklable, so Ray ships it to workers.

    Call it on a batch of shard rows (a ``pyarrow.Table`` / ``RecordBatch`` with the
    :data:`READ_COLUMNS`, as ``map_batches(batch_format="pyarrow")`` hands it) to get the
    batch contract as numpy arrays; :meth:`sample` does one image.

    Attributes:
        categories: the label space (from the split's manifest).
        image_size: output side, pixels.
        train: random crop + flip when True, a plain resize when False.
        scale_min: smallest crop area fraction (train).
        hflip: random horizontal flip (train).
        boundary_width: boundary target thickness, pixels.
        center_sigma: center heatmap sigma, pixels.
        epoch: mixed into each image's random seed.
        seed: base seed; each image's draws come from (seed, epoch, image_id).
    """

    categories: CategoryIndex
    image_size: int
    train: bool
    scale_min: float = 0.5
    hflip: bool = True
    boundary_width: int = 2
    center_sigma: float = 2.0
    epoch: int = 0
    seed: int = 0
    _transform: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once per process (and again after unpickling on a Ray worker, see __setstate__).
        object.__setattr__(
            self, "_transform", build_transform(self.image_size, train=self.train, scale_min=self.scale_min, hflip=self.hflip)
        )

    @classmethod
    def from_config(cls, categories: CategoryIndex, cfg: "Config", *, train: bool, epoch: int = 0, seed: int = 0) -> "SampleTransform":
        """The transform a config asks for.

        Args:
            categories: the label space.
            cfg: uses ``data.image_size``, ``data.scale_min``, ``data.hflip``,
                ``tasks.boundary_width``, ``tasks.center_sigma``.
            train: training (augmented) or validation (resize only).
            epoch: epoch number, mixed into the random draws.
            seed: base seed.

        Returns:
            A :class:`SampleTransform`.
        """
        return cls(
            categories=categories,
            image_size=cfg.data.image_size,
            train=train,
            scale_min=cfg.data.scale_min,
            hflip=cfg.data.hflip,
            boundary_width=cfg.tasks.boundary_width,
            center_sigma=cfg.tasks.center_sigma,
            epoch=epoch,
            seed=seed,
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_transform", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def sample(self, image: bytes, annotations: Sequence[dict] | None, image_id: int, height: int, width: int) -> dict[str, np.ndarray]:
        """One image's arrays of the batch contract (without the batch dimension).

        Args:
            image: encoded image bytes.
            annotations: the row's annotations (may be empty or None).
            image_id: COCO image id.
            height: original height, from the row.
            width: original width, from the row.

        Returns:
            Dict with every key of :data:`BATCH_KEYS`.

        Raises:
            ValueError: the image does not decode or its size differs from (height, width),
                or an annotation is malformed; the message names the image id.
        """
        try:
            pixels = decode_image(image)
            if tuple(pixels.shape[1:]) != (height, width):
                raise ValueError(f"decoded size {tuple(pixels.shape[1:])} differs from the row's {(height, width)}")
            masks, labels, crowd = decode_annotations(annotations, height, width, self.categories)
        except ValueError as e:
            raise ValueError(f"image {image_id}: {e}") from None
        seed = sample_seed(self.seed, self.epoch, image_id) if self.train else None
        pixels, masks = apply_joint(self._transform, pixels, masks, seed=seed)
        out = build_targets(
            masks, labels, crowd, self.categories, boundary_width=self.boundary_width, center_sigma=self.center_sigma
        )
        out["image"] = to_float_image(pixels)
        out["image_id"] = np.int64(image_id)
        out["orig_size"] = np.array([height, width], np.int64)
        return out

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
        """Transform a batch of shard rows into the batch contract (numpy, stacked)."""
        missing = [c for c in READ_COLUMNS if c not in batch.schema.names]
        if missing:
            raise ValueError(f"shard rows: missing columns {missing}; is this an mtseg shard?")
        cols = {c: batch.column(c).to_pylist() for c in READ_COLUMNS}
        samples = [
            self.sample(img, anns, iid, h, w)
            for img, anns, iid, h, w in zip(cols["image"], cols["annotations"], cols["image_id"], cols["height"], cols["width"])
        ]
        return stack_samples(samples, self.image_size)


def stack_samples(samples: Sequence[dict[str, np.ndarray]], image_size: int) -> dict[str, np.ndarray]:
    """Stack per-image dicts into a batch; an empty list gives arrays with a 0 batch dimension."""
    if samples:
        return {k: np.stack([s[k] for s in samples]) for k in BATCH_KEYS}
    s = image_size
    return {
        "image": np.zeros((0, 3, s, s), np.float32),
        "semantic": np.zeros((0, s, s), np.int64),
        "supercategory": np.zeros((0, s, s), np.int64),
        "boundary": np.zeros((0, s, s), np.float32),
        "center": np.zeros((0, 1, s, s), np.float32),
        "offset": np.zeros((0, 2, s, s), np.float32),
        "thing_mask": np.zeros((0, s, s), np.float32),
        "image_id": np.zeros((0,), np.int64),
        "orig_size": np.zeros((0, 2), np.int64),
    }


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy batch -> torch tensors (sharing memory where numpy allows it)."""
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def categories_of(manifest: dict) -> CategoryIndex:
    """The label space recorded in a split's manifest."""
    return CategoryIndex.from_categories(manifest["categories"])


def shard_order(manifest: dict, seed: int, epoch: int) -> list[str]:
    """A permutation of the manifest's shard paths that depends only on (seed, epoch).

    Args:
        manifest: a split's manifest.
        seed: run seed.
        epoch: epoch number.

    Returns:
        The shards' relative paths (as in ``manifest["shards"][i]["path"]``), permuted.
    """
    paths = [entry["path"] for entry in manifest["shards"]]
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
    return [paths[i] for i in rng.permutation(len(paths))]


def _shard_paths(uri: str, split: str, manifest: dict, shards: Sequence[str] | None) -> list[str]:
    """Full URIs of the chosen shards (all, in manifest order, when ``shards`` is None)."""
    if shards is None:
        uris = shard_uris(uri, split, manifest)
    else:
        known = {entry["path"] for entry in manifest["shards"]}
        unknown = [s for s in shards if s not in known]
        if unknown:
            raise ValueError(f"shards: {unknown} are not listed in the manifest of {storage.join(uri, split)}")
        uris = [storage.join(uri, split, s) for s in shards]
    if not uris:
        raise ValueError(f"{storage.join(uri, split)}: the manifest lists no shards (an empty split)")
    return uris


def read_split(uri: str, split: str, *, shards: Sequence[str] | None = None) -> tuple["ray.data.Dataset", dict]:
    """A lazy Ray Dataset over a split's shard rows.

    Args:
        uri: dataset root, local directory or ``s3://bucket/prefix``.
        split: split name (``<uri>/<split>/manifest.json`` must exist).
        shards: optional subset / order of shard paths (e.g. :func:`shard_order`); default all.

    Returns:
        (dataset of shard rows with :data:`READ_COLUMNS`, the manifest). Nothing is read until
        the dataset is iterated.

    Raises:
        mtseg.data.manifest.ManifestError: no or bad manifest.
        ValueError: the split has no shards, or ``shards`` names one the manifest lacks.
    """
    import ray.data

    manifest = read_manifest(uri, split)
    uris = _shard_paths(uri, split, manifest, shards)
    fs, _ = storage.resolve(uri)
    paths = [storage.resolve(u)[1] for u in uris]
    # select_columns (not read_parquet's deprecated columns=) is pushed down into the read.
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(list(READ_COLUMNS))
    return ds, manifest


def build_stream(
    ds: "ray.data.Dataset",
    categories: CategoryIndex,
    cfg: "Config",
    *,
    train: bool,
    epoch: int = 0,
    seed: int = 0,
    batch_size: int = MAP_BATCH_SIZE,
) -> "ray.data.Dataset":
    """Add decode + augmentation + targets to a Dataset of shard rows.

    Args:
        ds: from :func:`read_split`.
        categories: the label space (:func:`categories_of` the manifest).
        cfg: the run's config (image size, augmentation, target parameters).
        train: augment (random crop + flip) or validate (resize only).
        epoch: epoch number, mixed into each image's random draws.
        seed: base seed.
        batch_size: rows per ``map_batches`` call (not the training batch size).

    Returns:
        A lazy Dataset whose rows follow the batch contract; iterate it with
        ``iter_torch_batches(batch_size=cfg.data.batch_size)``.
    """
    fn = SampleTransform.from_config(categories, cfg, train=train, epoch=epoch, seed=seed)
    # The parquet reader packs row groups into read units of up to ~128 MiB, which for small
    # images is thousands of rows in one block; a map task takes whole blocks, so without
    # this streaming split one task would decode them all on one CPU.
    ds = ds.repartition(target_num_rows_per_block=REPARTITION_ROWS)
    # A function (tasks), not a callable class (actors): stateless work that scales with the
    # cluster's CPUs.
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True)


def iter_local_batches(
    uri: str,
    split: str,
    categories: CategoryIndex | None,
    cfg: "Config",
    train: bool,
    *,
    epoch: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    shards: Sequence[str] | None = None,
    limit: int | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream a split without Ray: shards read with pyarrow one record batch at a time.

    Args:
        uri: dataset root, local directory or ``s3://bucket/prefix``.
        split: split name.
        categories: the label space; None reads it from the manifest.
        cfg: the run's config.
        train: augment or not (see :class:`SampleTransform`).
        epoch: epoch number for the random draws.
        seed: base seed.
        batch_size: images per batch; default ``cfg.data.batch_size``.
        shards: subset / order of shard paths; default all in manifest order.
        limit: stop after this many images (e.g. ``train.val_max_images``); None for all.
        drop_last: drop a last batch smaller than ``batch_size``.

    Yields:
        Batches as dicts of torch tensors (the batch contract).

    Raises:
        mtseg.data.manifest.ManifestError: no or bad manifest.
        ValueError: bad rows (message names the image id), empty split, bad arguments.
    """
    batch_size = batch_size or cfg.data.batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    manifest = read_manifest(uri, split)
    categories = categories or categories_of(manifest)
    fn = SampleTransform.from_config(categories, cfg, train=train, epoch=epoch, seed=seed)
    fs, _ = storage.resolve(uri)
    pending: list[dict[str, np.ndarray]] = []
    seen = 0
    for shard in _shard_paths(uri, split, manifest, shards):
        path = storage.resolve(shard)[1]
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            for record_batch in reader.iter_batches(batch_size=LOCAL_READ_BATCH, columns=list(READ_COLUMNS)):
                if limit is not None and seen + record_batch.num_rows > limit:
                    record_batch = record_batch.slice(0, limit - seen)
                seen += record_batch.num_rows
                cols = {c: record_batch.column(c).to_pylist() for c in READ_COLUMNS}
                for img, anns, iid, h, w in zip(cols["image"], cols["annotations"], cols["image_id"], cols["height"], cols["width"]):
                    pending.append(fn.sample(img, anns, iid, h, w))
                    if len(pending) == batch_size:
                        yield to_torch(stack_samples(pending, fn.image_size))
                        pending = []
                if limit is not None and seen >= limit:
                    break
        if limit is not None and seen >= limit:
            break
    if pending and not drop_last:
        yield to_torch(stack_samples(pending, fn.image_size))


__all__ = [
    "BATCH_KEYS",
    "MAP_BATCH_SIZE",
    "READ_COLUMNS",
    "SampleTransform",
    "build_stream",
    "categories_of",
    "iter_local_batches",
    "read_split",
    "shard_order",
    "stack_samples",
    "to_torch",
]
