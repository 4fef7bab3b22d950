"""The data stream: parquet shards -> decode -> joint augmentation -> task targets -> batches.

:class:`SampleTransform` does the per-image work (decode, joint augmentation, each task's
targets); the task objects travel with it to the Ray Data workers. Three drivers feed it:

* training (:func:`worker_batches`): each Ray Train worker streams its slice of the epoch
  plan (:mod:`mtseg.train.data`) with Ray Data, in plan order;
* evaluation (:func:`read_split` + :class:`ChunkedTransform`): ``read_parquet`` with the
  transform fused into the read, each image's ground truth beside it;
* plain pyarrow (:func:`iter_local_batches`): no Ray (the demo's pictures, benchmarks, tests).

Rows travel in a compact, exact *wire* layout (uint8 ``image``, each task's
:meth:`~mtseg.tasks.base.Task.target_fields`); :func:`to_torch` turns a batch into the
contract: ``image`` float32 (B, 3, S, S) in [0, 1], ``image_id`` int64 (B,), ``orig_size``
int64 (B, 2) as (height, width), and each task's keys in their contract dtype.

Semi-supervised training (``data.labeled_fraction`` < 1) keeps the labels of a fixed share of
the train images (:func:`is_labeled`, the same images for every seed and arm); the others
stream without annotations and with ``labeled`` False (bool (B,)), so only self-supervised
tasks learn from them (:func:`mtseg.tasks.base.image_weights`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtseg import storage
from mtseg.data.categories import CategoryIndex
from mtseg.data.corruptions import check_corruptions, check_severities, corrupt
from mtseg.data.manifest import read_manifest, shard_uris
from mtseg.data.targets import TargetBuilder, WireField, augment, decode_layers
from mtseg.data.transforms import build_transform, decode_image, sample_seed

if TYPE_CHECKING:  # Ray is imported lazily: the non-Ray path must not pay for it
    import ray.data

    from mtseg.config import Config

#: Shard columns the stream reads (``file_name`` is for people, not for training).
READ_COLUMNS = ("image_id", "height", "width", "image", "annotations")

#: Images per output chunk of a map task: small, so a task's working set stays small, and
#: large enough to amortise the per-chunk overhead.
CHUNK_ROWS = 16

#: Rows per pyarrow record batch on the local path.
LOCAL_READ_BATCH = 64


def stream_fields(image_size: int) -> dict[str, WireField]:
    """The keys every batch has, whatever the tasks: ``image``, ``image_id``, ``orig_size``."""
    return {
        "image": WireField((3, image_size, image_size), np.dtype(np.uint8), torch.float32, scale=1.0 / 255.0),
        "image_id": WireField((), np.dtype(np.int64), torch.int64),
        "orig_size": WireField((2,), np.dtype(np.int64), torch.int64),
    }


def batch_fields(image_size: int, tasks: Iterable[TargetBuilder]) -> dict[str, WireField]:
    """Every key of a batch: the stream's own, then each task's targets, in task order.

    Raises:
        ValueError: two tasks (or a task and the stream) declare the same key.
    """
    own = stream_fields(image_size)
    fields = {"image": own.pop("image")}
    for task in tasks:
        for key, wire in task.target_fields(image_size).items():
            if key in fields or key in own:
                raise ValueError(f"task {task.name}: batch key {key!r} is already taken")
            fields[key] = wire
    return fields | own


#: The per-image flag of a semi-supervised stream: False = the image's labels are withheld.
LABELED_FIELD = WireField((), np.dtype(np.uint8), torch.bool)


def is_labeled(image_id: int, fraction: float) -> bool:
    """Whether ``image_id`` keeps its labels when only ``fraction`` of a split does.

    A hash (BLAKE2b) of the id alone, not of the seed or the epoch: every run, arm and seed of a
    study withholds the same images, and a larger fraction keeps every image a smaller one kept.
    ``fraction`` >= 1 keeps all.
    """
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(b"mtseg-labels:%d" % int(image_id), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def row_is_labeled(row: Mapping[str, Any], *, fraction: float) -> bool:
    """:func:`is_labeled` of a shard row (``Dataset.filter`` with ``functools.partial``)."""
    return is_labeled(int(row["image_id"]), fraction)


_OWN_FIELDS = stream_fields(1)  # shapes unused: what to_torch does with the stream's own keys


def to_torch(batch: Mapping[str, Any], fields: Mapping[str, WireField] | None = None) -> dict[str, torch.Tensor]:
    """A batch (numpy or tensors) in the wire layout -> torch tensors of the batch contract.

    Args:
        fields: the batch's keys (:func:`batch_fields`); default the stream's own keys only.
            Keys without a field pass through unchanged.
    """
    fields = _OWN_FIELDS if fields is None else fields
    out = {}
    for key, value in batch.items():
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        wire = fields.get(key)
        if wire is not None and wire.scale is not None and array.dtype == wire.wire:
            array = array.astype(np.float32)
            array *= np.float32(wire.scale)
        elif wire is not None:
            # astype copies: arrays handed out by Ray are read-only, torch wants them writable.
            array = array.astype(torch.empty(0, dtype=wire.dtype).numpy().dtype, copy=True)
        elif not array.flags.writeable:
            array = array.copy()
        out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


@dataclass(frozen=True)
class SampleTransform:
    """Decode + joint augmentation + task targets for shard rows; picklable, so Ray ships it to workers.

    Called on a ``pyarrow`` batch of shard rows, it returns the stacked batch in the wire
    layout (:attr:`fields`); :meth:`sample` does one image.

    Attributes:
        train: random crop (``scale_min``) + flip (``hflip``) when True, a plain resize when False.
        seed: base seed; each image's draws come from (seed, epoch, image_id).
        corruption: ``(name, severity)`` of :mod:`mtseg.data.corruptions`, applied to the decoded
            image at its original size, before any resize (as COCO-C corrupts COCO's own
            images), seeded by the image id; severity 0 or None: no corruption call at all.
        labeled_fraction: < 1: only the images :func:`is_labeled` keeps have annotations; the
            batch gains ``labeled`` (:data:`LABELED_FIELD`). 1: every image, no ``labeled`` key.
    """

    categories: CategoryIndex
    tasks: tuple[TargetBuilder, ...]
    image_size: int
    train: bool
    scale_min: float = 0.5
    hflip: bool = True
    epoch: int = 0
    seed: int = 0
    corruption: tuple[str, int] | None = None
    labeled_fraction: float = 1.0
    _transform: Any = field(default=None, init=False, repr=False, compare=False)
    fields: dict[str, WireField] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {self.image_size}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.corruption is not None:
            name, severity = self.corruption
            check_corruptions([name])
            if severity != 0:
                check_severities([severity])
            # Severity 0 is the clean image: no corruption call, so the clean pass bit for bit.
            object.__setattr__(self, "corruption", (str(name), int(severity)) if severity else None)
        # Built once per process (and again after unpickling on a Ray worker, see __setstate__).
        transform = build_transform(self.image_size, train=self.train, scale_min=self.scale_min, hflip=self.hflip)
        object.__setattr__(self, "_transform", transform)
        fields = batch_fields(self.image_size, self.tasks)
        if not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction: must lie in (0, 1], got {self.labeled_fraction}")
        if self.labeled_fraction < 1.0:
            fields["labeled"] = LABELED_FIELD
        object.__setattr__(self, "fields", fields)

    @classmethod
    def from_config(
        cls,
        categories: CategoryIndex,
        cfg: Config,
        tasks: Mapping[str, TargetBuilder],
        *,
        train: bool,
        epoch: int = 0,
        seed: int = 0,
        corruption: tuple[str, int] | None = None,
    ) -> SampleTransform:
        """The transform ``cfg.data`` asks for, building the targets of ``tasks`` (:func:`mtseg.tasks.build_tasks`).

        ``data.labeled_fraction`` applies to the training stream only: evaluation reads every label.
        """
        return cls(
            categories=categories,
            tasks=tuple(tasks.values()),
            image_size=cfg.data.image_size,
            train=train,
            scale_min=cfg.data.scale_min,
            hflip=cfg.data.hflip,
            epoch=epoch,
            seed=seed,
            corruption=corruption,
            labeled_fraction=cfg.data.labeled_fraction if train else 1.0,
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_transform", None)
        state.pop("fields", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def sample(
        self, image: bytes, annotations: Sequence[dict] | None, image_id: int, height: int, width: int
    ) -> dict[str, np.ndarray]:
        """One shard row's image in the wire layout (every key of :attr:`fields`, no batch dimension).

        Raises:
            ValueError: the image does not decode or its size differs from (height, width),
                or an annotation is malformed; the message names the image id.
        """
        try:
            pixels = decode_image(image)
            if tuple(pixels.shape[1:]) != (height, width):
                raise ValueError(f"decoded size {tuple(pixels.shape[1:])} differs from the row's {(height, width)}")
            if self.corruption is not None:
                hwc = corrupt(pixels.permute(1, 2, 0).numpy(), *self.corruption, key=int(image_id))
                pixels = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
            labeled = is_labeled(image_id, self.labeled_fraction)
            layers, labels, crowd = decode_layers(annotations if labeled else None, height, width, self.categories)
        except ValueError as e:
            raise ValueError(f"image {image_id}: {e}") from None
        seed = sample_seed(self.seed, self.epoch, image_id) if self.train else None
        pixels, instances = augment(self._transform, pixels, layers, labels, crowd, self.categories, seed=seed)
        values = {"image": pixels.numpy(), "image_id": np.int64(image_id), "orig_size": np.array([height, width], np.int64)}
        for task in self.tasks:
            values.update(task.build_targets(instances))
        if "labeled" in self.fields:
            values["labeled"] = np.uint8(labeled)
        return {k: np.asarray(values[k]).astype(f.wire, copy=False) for k, f in self.fields.items()}

    def iter_samples(self, batch: pa.Table | pa.RecordBatch) -> Iterator[dict[str, np.ndarray]]:
        """:meth:`sample` for every row of a batch of shard rows; ValueError if it lacks a :data:`READ_COLUMNS` column."""
        missing = [c for c in READ_COLUMNS if c not in batch.schema.names]
        if missing:
            raise ValueError(f"shard rows: missing columns {missing}; is this an mtseg shard?")
        cols = [batch.column(c).to_pylist() for c in ("image", "annotations", "image_id", "height", "width")]
        for image, anns, image_id, height, width in zip(*cols):
            yield self.sample(image, anns, image_id, height, width)

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
        return self.stack(list(self.iter_samples(batch)))

    def stack(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Stack per-image dicts from :meth:`sample` into a batch; [] gives a 0-length batch."""
        if samples:
            return {k: np.stack([s[k] for s in samples]) for k in self.fields}
        return {k: np.zeros((0, *f.shape), f.wire) for k, f in self.fields.items()}

    def to_torch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """:func:`to_torch` with this transform's fields."""
        return to_torch(batch, self.fields)


def ground_truth(row: Mapping[str, Any]) -> dict:
    """A shard row's ground truth (everything but the pixels) as JSON-able values (RLE bytes -> ASCII)."""
    anns = []
    for a in row.get("annotations") or ():
        a = dict(a)
        counts = a.get("segmentation_counts")
        if isinstance(counts, (bytes, bytearray)):
            a["segmentation_counts"] = counts.decode("ascii")
        anns.append(a)
    return {
        "image_id": int(row["image_id"]),
        "file_name": row.get("file_name"),
        "height": int(row["height"]),
        "width": int(row["width"]),
        "annotations": anns,
    }


@dataclass(frozen=True)
class ChunkedTransform:
    """``map_batches`` UDF: a :class:`SampleTransform` over a whole block, :data:`CHUNK_ROWS` images at a time.

    A generator, so a whole shard's outputs are never held in one batch. Use it with
    ``batch_size=None``, which lets Ray fuse the map with the read into one task per shard.

    Attributes:
        with_gt: add a ``gt`` column, each image's :func:`ground_truth` as a JSON string.
    """

    transform: SampleTransform
    with_gt: bool = False

    def __call__(self, batch: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, batch.num_rows, CHUNK_ROWS):
            chunk = batch.slice(start, CHUNK_ROWS)
            out = self.transform(chunk)
            if self.with_gt:
                rows = chunk.select(["image_id", "height", "width", "annotations"]).to_pylist()
                out["gt"] = np.array([json.dumps(ground_truth(r)) for r in rows], dtype=object)
            yield out


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
    """A lazy Ray Dataset over a split's shard rows (``uri`` local or ``s3://``).

    Args:
        shards: optional subset / order of shard paths; default all.

    Returns:
        (dataset of shard rows with :data:`READ_COLUMNS`, the manifest); its context has Ray
        Data's per-operator resource reservation off (a stage of actors after it wants it on).

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
    saved = ctx.use_datasource_v2
    # Ray 2.60's default parquet reader (V2) footer-scans the files in a task of its own on
    # every execution and packs many row groups into one read task; V1 plans one read task per
    # shard, which fuses with the map. The Dataset keeps its own copy of the context, so the
    # process-wide flag is restored right away.
    ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=list(READ_COLUMNS), override_num_blocks=len(paths))
    finally:
        ctx.use_datasource_v2 = saved
    # Ray 2.60 reserves part of the CPUs for each operator by default. The read fuses with the
    # maps after it into one operator, which then ran about 1.2 tasks at a time on 2 CPUs: 0.76
    # of a DataLoader instead of 0.99 (benchmarks/ingest.py).
    ds.context.op_resource_reservation_enabled = False
    return ds, manifest


def _read_and_transform(task: dict, transform: SampleTransform, out_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: read tasks (one shard's rows each, in order) -> batches of ``out_rows`` images in the wire layout."""
    for path, rows in zip(task["path"], task["rows"]):
        path = str(path)
        fs, fs_path = storage.resolve(path)
        with storage.translate_errors(path):
            table = pq.read_table(fs_path, filesystem=fs, columns=list(READ_COLUMNS))
        picked = table.take([int(r) for r in rows])
        for i in range(0, picked.num_rows, out_rows):
            yield transform(picked.slice(i, out_rows))


def worker_batches(
    segments: Sequence[Any],
    transform: SampleTransform,
    *,
    batch_size: int,
    drop_last: bool,
    rows_per_task: int,
    num_cpus: float,
) -> Iterator[dict[str, torch.Tensor]]:
    """A train worker's stream: its planned rows, in plan order, as batches of the contract (CPU tensors).

    Args:
        segments: the worker's slice of the epoch (:func:`mtseg.train.data.plan_epoch`).
        rows_per_task: images per Ray Data read task (and per block).
        num_cpus: CPUs each read task reserves.
    """
    import ray.data

    from mtseg.compat import quiet_idle_executor

    tasks = [{"path": s.path, "rows": list(s.rows)} for s in segments]
    if not tasks:
        return iter(())
    # Ray Data's per-operator reservation stays on here (read_split turns it off): without it
    # this stream alone ran 1.5x faster, but make demo took 8.5 min instead of 6.3, its read
    # tasks taking the CPUs that training computes on.
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # The plan fixes the order; Ray Data must not reorder blocks finishing out of turn.
    ds.context.execution_options.preserve_order = True
    # One dataset per worker per epoch: its plan would be logged every epoch on every worker.
    ds.context.print_on_execution_start = False
    # Ray 2.60's executor spins while training holds it back (see mtseg.compat).
    quiet_idle_executor(ds.context)
    ds = ds.map_batches(
        _read_and_transform,
        fn_kwargs={"transform": transform, "out_rows": rows_per_task},
        batch_size=1,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
    batches = ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=2)
    return (transform.to_torch(b) for b in batches)


def iter_local_batches(
    uri: str,
    split: str,
    categories: CategoryIndex | None,
    cfg: Config,
    train: bool,
    *,
    tasks: Mapping[str, TargetBuilder],
    epoch: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    shards: Sequence[str] | None = None,
    limit: int | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream a split as batches of the contract without Ray: shards read with pyarrow, a record batch at a time.

    Args:
        categories: the label space; None reads it from the manifest.
        train, tasks, epoch, seed: as :meth:`SampleTransform.from_config`.
        batch_size: images per batch; default ``cfg.data.batch_size``.
        shards: subset / order of shard paths; default all in manifest order.
        limit: stop after this many images; None for all.

    Raises:
        mtseg.data.manifest.ManifestError: no or bad manifest.
        ValueError: bad rows (message names the image id), empty split, bad arguments.
    """
    batch_size = batch_size or cfg.data.batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    manifest = read_manifest(uri, split)
    categories = categories or categories_of(manifest)
    fn = SampleTransform.from_config(categories, cfg, tasks, train=train, epoch=epoch, seed=seed)
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
                        yield fn.to_torch(fn.stack(pending))
                        pending = []
                if limit is not None and seen >= limit:
                    break
        if limit is not None and seen >= limit:
            break
    if pending and not drop_last:
        yield fn.to_torch(fn.stack(pending))
