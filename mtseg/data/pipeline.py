"""The data stream: parquet shards -> decode -> joint augmentation -> task targets -> batches.

One function does the per-image work, :class:`SampleTransform`, and two drivers feed it:

* Ray Data (:func:`read_split` + :func:`build_stream`): ``read_parquet`` of the shard files a
  manifest lists, from a local directory or S3 through the pyarrow filesystem of
  :func:`mtseg.storage.resolve`, then ``map_batches`` on CPU workers, fused with the read
  into one task per shard whose output streams out in small chunks. The streaming executor keeps a bounded number of blocks in
  flight, so memory does not grow with the number of shards; nothing here materializes the
  dataset. Train workers take their part with ``streaming_split`` / ``get_dataset_shard``
  and iterate it with :func:`iter_torch` (``iter_torch_batches`` + :func:`to_torch`).
* plain pyarrow (:func:`iter_local_batches`): the same transform over the shards read row
  group by row group, for the evaluator and for tests that run without Ray.

Between the workers and the consumer, rows travel in a compact *wire* layout
(:func:`wire_spec`: uint8 image and masks, uint8 labels, float16 heatmap, int16 offsets, all
exact), about a quarter of the bytes of the float32/int64 batch contract; :func:`to_torch`
turns a batch into the contract:
``image`` float32 (B, 3, S, S) in [0, 1]; ``semantic``/``supercategory`` int64 (B, S, S);
``boundary``/``thing_mask`` float32 (B, S, S); ``center`` float32 (B, 1, S, S); ``offset``
float32 (B, 2, S, S); ``image_id`` int64 (B,); ``orig_size`` int64 (B, 2) as (height, width).
Validation uses the same code with ``train=False`` (a plain resize, no randomness).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtseg import storage
from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.data.manifest import read_manifest, shard_uris
from mtseg.data.targets import build_targets, decode_annotations
from mtseg.data.transforms import apply_joint, build_transform, decode_image, sample_seed

if TYPE_CHECKING:  # Ray is imported lazily: the non-Ray path must not pay for it
    import ray.data

    from mtseg.config import Config

#: Shard columns the stream reads (``file_name`` is for people, not for training).
READ_COLUMNS = ("image_id", "height", "width", "image", "annotations")

#: Keys of a batch, in contract order.
BATCH_KEYS = (
    "image", "semantic", "supercategory", "boundary", "center", "offset", "thing_mask", "image_id", "orig_size",
)

#: dtype of each key in the batch contract (what :func:`to_torch` returns).
CONTRACT_DTYPES = {
    "image": torch.float32, "semantic": torch.int64, "supercategory": torch.int64, "boundary": torch.float32,
    "center": torch.float32, "offset": torch.float32, "thing_mask": torch.float32, "image_id": torch.int64,
    "orig_size": torch.int64,
}

_CONTRACT_NUMPY = {k: torch.empty(0, dtype=v).numpy().dtype for k, v in CONTRACT_DTYPES.items()}

#: Images per output chunk of a map task: small, so a task's working set stays small, and
#: large enough to amortise the per-chunk overhead.
CHUNK_ROWS = 16

#: Rows per pyarrow record batch on the local path.
LOCAL_READ_BATCH = 64

# Offsets travel as int16: they are whole pixels (centers are rounded to the grid).
_MAX_IMAGE_SIZE = np.iinfo(np.int16).max


def label_dtype(categories: CategoryIndex) -> np.dtype:
    """Wire dtype of ``semantic``/``supercategory``: uint8 while every index and 255 (ignore) fit."""
    fits = categories.num_classes <= IGNORE_INDEX and categories.num_supercategories <= IGNORE_INDEX
    return np.dtype(np.uint8) if fits else np.dtype(np.int32)


def wire_spec(image_size: int, categories: CategoryIndex) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-image shape and dtype of every key in the wire layout (the stream's rows).

    Args:
        image_size: output side S, pixels.
        categories: the label space (it decides the label dtype).

    Returns:
        ``{key: (shape without the batch dimension, numpy dtype)}`` for every :data:`BATCH_KEYS`.
    """
    s, lab = image_size, label_dtype(categories)
    return {
        "image": ((3, s, s), np.dtype(np.uint8)),
        "semantic": ((s, s), lab),
        "supercategory": ((s, s), lab),
        "boundary": ((s, s), np.dtype(np.uint8)),
        "center": ((1, s, s), np.dtype(np.float16)),
        "offset": ((2, s, s), np.dtype(np.int16)),
        "thing_mask": ((s, s), np.dtype(np.uint8)),
        "image_id": ((), np.dtype(np.int64)),
        "orig_size": ((2,), np.dtype(np.int64)),
    }


@dataclass(frozen=True)
class SampleTransform:
    """Decode + joint augmentation + targets for shard rows; picklable, so Ray ships it to workers.

    Call it on a batch of shard rows (a ``pyarrow.Table`` / ``RecordBatch`` with the
    :data:`READ_COLUMNS`, as ``map_batches(batch_format="pyarrow")`` hands it) to get the
    stacked batch in the wire layout (:func:`wire_spec`) as numpy arrays; :meth:`sample`
    does one image; :func:`to_torch` turns either into the batch contract.

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
    _spec: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.image_size <= _MAX_IMAGE_SIZE:
            raise ValueError(f"image_size: must lie in 1..{_MAX_IMAGE_SIZE}, got {self.image_size}")
        # Built once per process (and again after unpickling on a Ray worker, see __setstate__).
        transform = build_transform(self.image_size, train=self.train, scale_min=self.scale_min, hflip=self.hflip)
        object.__setattr__(self, "_transform", transform)
        object.__setattr__(self, "_spec", wire_spec(self.image_size, self.categories))

    @classmethod
    def from_config(cls, categories: CategoryIndex, cfg: Config, *, train: bool, epoch: int = 0, seed: int = 0) -> SampleTransform:
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
        state.pop("_spec", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def sample(self, image: bytes, annotations: Sequence[dict] | None, image_id: int, height: int, width: int) -> dict[str, np.ndarray]:
        """One image in the wire layout (without the batch dimension).

        Args:
            image: encoded image bytes.
            annotations: the row's annotations (may be empty or None).
            image_id: COCO image id.
            height: original height, from the row.
            width: original width, from the row.

        Returns:
            Dict with every key of :data:`BATCH_KEYS`, shapes and dtypes of :func:`wire_spec`.

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
        targets = build_targets(
            masks, labels, crowd, self.categories, boundary_width=self.boundary_width, center_sigma=self.center_sigma
        )
        targets["image"] = pixels.numpy()
        targets["image_id"] = np.int64(image_id)
        targets["orig_size"] = np.array([height, width], np.int64)
        return {k: np.asarray(targets[k]).astype(dtype, copy=False) for k, (_, dtype) in self._spec.items()}

    def iter_samples(self, batch: pa.Table | pa.RecordBatch) -> Iterator[dict[str, np.ndarray]]:
        """:meth:`sample` for every row of a batch of shard rows, one image at a time.

        Raises:
            ValueError: the batch lacks a column of :data:`READ_COLUMNS`, or a row is bad.
        """
        missing = [c for c in READ_COLUMNS if c not in batch.schema.names]
        if missing:
            raise ValueError(f"shard rows: missing columns {missing}; is this an mtseg shard?")
        cols = [batch.column(c).to_pylist() for c in ("image", "annotations", "image_id", "height", "width")]
        for image, anns, image_id, height, width in zip(*cols):
            yield self.sample(image, anns, image_id, height, width)

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
        """Transform a batch of shard rows into one stacked batch in the wire layout (numpy)."""
        return self.stack(list(self.iter_samples(batch)))

    def stack(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Stack per-image dicts from :meth:`sample` into a batch; [] gives a 0-length batch."""
        if samples:
            return {k: np.stack([s[k] for s in samples]) for k in self._spec}
        return {k: np.zeros((0, *shape), dtype) for k, (shape, dtype) in self._spec.items()}


@dataclass(frozen=True)
class ChunkedTransform:
    """``map_batches`` UDF: a :class:`SampleTransform` over a whole block, :data:`CHUNK_ROWS` images at a time.

    A generator, so Ray can let a task's output out as it grows (a block is cut at the
    context's target block size) and a whole shard's outputs are never held in one batch.

    Attributes:
        transform: the per-image work.
        chunk_rows: images per yielded batch.
    """

    transform: SampleTransform
    chunk_rows: int = CHUNK_ROWS

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, batch.num_rows, self.chunk_rows):
            yield self.transform(batch.slice(start, self.chunk_rows))


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch in the wire layout (or already in the contract) -> torch tensors of the batch contract.

    Use it as ``collate_fn`` of ``iter_torch_batches`` (see :func:`iter_torch`). Keys outside
    the contract pass through as tensors unchanged.

    Args:
        batch: dict of numpy arrays (or tensors) with a leading batch dimension.

    Returns:
        Dict of torch tensors with the dtypes of :data:`CONTRACT_DTYPES`; ``image`` in [0, 1].
    """
    out = {}
    for key, value in batch.items():
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if key == "image" and array.dtype == np.uint8:
            array = array.astype(np.float32)
            array *= np.float32(1.0 / 255.0)
        elif key in _CONTRACT_NUMPY:
            # astype copies: arrays handed out by Ray are read-only, torch wants them writable.
            array = array.astype(_CONTRACT_NUMPY[key], copy=True)
        elif not array.flags.writeable:
            array = array.copy()
        out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def iter_torch(stream: Any, batch_size: int, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate a stream as batches of the contract (``iter_torch_batches`` + :func:`to_torch`).

    Args:
        stream: a ``Dataset`` from :func:`build_stream` or a train worker's ``DataIterator``
            (``get_dataset_shard`` / ``streaming_split``).
        batch_size: images per batch.
        **kwargs: passed to ``iter_torch_batches`` (e.g. ``prefetch_batches``, ``drop_last``,
            ``local_shuffle_buffer_size``).

    Returns:
        An iterator of dicts of torch tensors (CPU; move them to the device in the loop).
    """
    collate_cls = getattr(sys.modules[__name__], "ContractCollate")  # via the module __getattr__
    return stream.iter_torch_batches(batch_size=batch_size, collate_fn=collate_cls(), **kwargs)


def _contract_collate_class() -> type:
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ContractCollate(NumpyBatchCollateFn):
        """``iter_torch_batches`` collate_fn: a numpy batch in the wire layout -> the batch contract."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return to_torch(batch)

    ContractCollate.__module__ = __name__
    ContractCollate.__qualname__ = "ContractCollate"
    return ContractCollate


def __getattr__(name: str) -> Any:
    # ``ContractCollate`` subclasses a Ray class; built on first use (PEP 562) so the non-Ray
    # path never imports Ray, and found again by name when a worker unpickles it.
    if name == "ContractCollate":
        cls = _contract_collate_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def categories_of(manifest: dict) -> CategoryIndex:
    """The label space recorded in a split's manifest."""
    return CategoryIndex.from_categories(manifest["categories"])


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


def read_split(uri: str, split: str, *, shards: Sequence[str] | None = None) -> tuple[ray.data.Dataset, dict]:
    """A lazy Ray Dataset over a split's shard rows.

    Args:
        uri: dataset root, local directory or ``s3://bucket/prefix``.
        split: split name (``<uri>/<split>/manifest.json`` must exist).
        shards: optional subset / order of shard paths (the trainer plans epochs in :mod:`mtseg.train.data`); default all.

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
    ctx = ray.data.DataContext.get_current()
    saved = getattr(ctx, "use_datasource_v2", None)
    # Ray 2.60's default parquet reader (datasource V2) lists and footer-scans the files in a
    # task of its own on every execution (seconds per epoch) and packs up to 128 MiB of row
    # groups into a single read task. The V1 reader plans one read task per shard, which Ray
    # fuses with the map below. The choice is made here, when the Dataset is created (it
    # keeps its own copy of the context), so the process-wide flag is restored right away.
    if saved is not None:
        ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=list(READ_COLUMNS), override_num_blocks=len(paths))
    finally:
        if saved is not None:
            ctx.use_datasource_v2 = saved
    return ds, manifest


def build_stream(
    ds: ray.data.Dataset,
    categories: CategoryIndex,
    cfg: Config,
    *,
    train: bool,
    epoch: int = 0,
    seed: int = 0,
    rows_per_block: int | None = None,
) -> ray.data.Dataset:
    """Add decode + augmentation + targets to a Dataset of shard rows.

    Args:
        ds: from :func:`read_split`.
        categories: the label space (:func:`categories_of` the manifest).
        cfg: the run's config (image size, augmentation, target parameters).
        train: augment (random crop + flip) or validate (resize only).
        epoch: epoch number, mixed into each image's random draws.
        seed: base seed.
        rows_per_block: when set, split the read blocks (one per shard) into blocks of this
            many rows first (a streaming repartition), for more parallel map tasks than there
            are shards; None keeps one fused read + map task per shard.

    Returns:
        A lazy Dataset whose rows are in the wire layout (:func:`wire_spec`); iterate it
        with :func:`iter_torch` to get batches of the contract.
    """
    fn = SampleTransform.from_config(categories, cfg, train=train, epoch=epoch, seed=seed)
    if rows_per_block:
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    # A function (tasks), not a callable class (actors): stateless work that scales with the
    # cluster's CPUs. batch_size=None (a whole block per call, chunked by ChunkedTransform)
    # lets Ray fuse the map with the read into one task per shard; a fixed batch_size would
    # keep them apart, adding a task and an object-store hop per shard.
    return ds.map_batches(ChunkedTransform(fn), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def iter_local_batches(
    uri: str,
    split: str,
    categories: CategoryIndex | None,
    cfg: Config,
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
                for sample in fn.iter_samples(record_batch):
                    pending.append(sample)
                    if len(pending) == batch_size:
                        yield to_torch(fn.stack(pending))
                        pending = []
                if limit is not None and seen >= limit:
                    break
        if limit is not None and seen >= limit:
            break
    if pending and not drop_last:
        yield to_torch(fn.stack(pending))


__all__ = [
    "BATCH_KEYS",
    "CONTRACT_DTYPES",
    "ChunkedTransform",
    "CHUNK_ROWS",
    "READ_COLUMNS",
    "SampleTransform",
    "build_stream",
    "categories_of",
    "iter_local_batches",
    "iter_torch",
    "label_dtype",
    "read_split",
    "to_torch",
    "wire_spec",
]
