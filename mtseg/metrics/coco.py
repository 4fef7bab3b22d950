"""COCO mask AP with pycocotools' own ``COCOeval``, the per-image matching run in parallel.

``COCOeval.evaluate()`` (the expensive part) matches each image on its own, so it runs on
shards of the image ids (serially, in a process pool, in Ray tasks, or on every
torch.distributed rank); the shards' ``evalImgs`` are put back in the order one
``evaluate()`` produces before the unmodified ``accumulate()`` and ``summarize()`` run.
The numbers equal a single-process pycocotools run bit for bit.

Typical use::

    gt = coco_gt_from_rows(table, manifest["categories"])    # or pycocotools.coco.COCO(json_path)
    ev = CocoMaskEvaluator(gt)
    ev.update(masks_to_coco_results(image_id, masks, labels, scores, categories, orig_size))
    ev.compute(num_shards=8, executor=ProcessPoolExecutor(4).map)   # or executor=ray_map()
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from mtseg.data.categories import CategoryIndex
from mtseg.metrics import _dist

# Index into COCOeval.stats (segm) of the numbers reported.
STAT_NAMES = ("mask_ap", "mask_ap50", "mask_ap75", "mask_ap_s", "mask_ap_m", "mask_ap_l")

# A map-like callable: executor(fn, iterable1, iterable2, ...) -> iterable of fn(*args).
MapFn = Callable[..., Iterable[Any]]

_NUM_AREAS = len(Params(iouType="segm").areaRng)


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_stdout = None


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' prints; unlike ``redirect_stdout`` it nests across a thread pool's threads."""
    global _quiet_depth, _saved_stdout
    with _quiet_lock:
        if _quiet_depth == 0:
            _saved_stdout, sys.stdout = sys.stdout, io.StringIO()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                sys.stdout, _saved_stdout = _saved_stdout, None


def _coco_from_dataset(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _counts_str(counts: Any) -> str:
    return counts.decode("ascii") if isinstance(counts, (bytes, bytearray)) else str(counts)


def coco_gt_from_rows(rows: Any, categories: Sequence[dict]) -> COCO:
    """An in-memory COCO ground truth built from shard rows (no annotation file needed).

    Args:
        rows: shard rows as dicts (``image_id``, ``height``, ``width``, optional
            ``file_name``, ``annotations`` as written by ``mtseg data shard``).
        categories: COCO ``categories`` entries, e.g. from the split's manifest.

    Returns:
        A ``pycocotools.coco.COCO`` with RLE segmentations (``counts`` as str).
    """
    cat_ids = {int(c["id"]) for c in categories}
    if not cat_ids:
        raise ValueError("categories: the ground truth defines no categories")
    images, annotations = [], []
    seen_images: set[int] = set()
    seen_anns: set[int] = set()
    for row in rows:
        image_id, h, w = int(row["image_id"]), int(row["height"]), int(row["width"])
        if image_id in seen_images:
            raise ValueError(f"rows: image_id {image_id} appears twice")
        seen_images.add(image_id)
        image = {"id": image_id, "height": h, "width": w}
        if row.get("file_name") is not None:
            image["file_name"] = row["file_name"]
        images.append(image)
        for ann in row.get("annotations") or ():
            ann_id, cat = int(ann["id"]), int(ann["category_id"])
            # COCOeval stores matched gt ids in arrays where 0 means "unmatched".
            if ann_id <= 0 or ann_id in seen_anns:
                raise ValueError(f"rows: image {image_id} has annotation id {ann_id} (ids must be unique and > 0)")
            if cat not in cat_ids:
                raise ValueError(f"rows: image {image_id} annotation {ann_id} has unknown category_id {cat}")
            size = [int(v) for v in ann["segmentation_size"]]
            if size != [h, w]:
                raise ValueError(f"rows: image {image_id} annotation {ann_id} mask size {size} != image size {[h, w]}")
            seen_anns.add(ann_id)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "iscrowd": int(ann["iscrowd"]),
                    "bbox": [float(v) for v in ann["bbox"]],
                    "area": float(ann["area"]),
                    "segmentation": {"size": size, "counts": _counts_str(ann["segmentation_counts"])},
                }
            )
    dataset = {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
    return _coco_from_dataset(dataset)


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    """``gt.loadRes(results)`` on copies (loadRes writes ids into them), valid when empty too."""
    if results:
        with _quiet():
            return gt.loadRes([dict(r) for r in results])
    # loadRes indexes results[0]; an empty result set is simply a COCO with no annotations.
    return _coco_from_dataset(
        {
            "images": list(gt.dataset.get("images", [])),
            "categories": copy.deepcopy(gt.dataset.get("categories", [])),
            "annotations": [],
        }
    )


def _subset_dataset(dataset: dict, img_ids: Iterable[int]) -> dict:
    """The images in ``img_ids`` and copies of their annotations (COCOeval writes into them)."""
    ids = {int(i) for i in img_ids}
    return {
        "images": [im for im in dataset.get("images", []) if int(im["id"]) in ids],
        "annotations": [dict(a) for a in dataset.get("annotations", []) if int(a["image_id"]) in ids],
        "categories": dataset.get("categories", []),
    }


def evaluate_image_shard(gt_dataset: dict, results: list[dict], img_ids: Sequence[int]) -> list:
    """Run ``COCOeval.evaluate()`` (segm) on a subset of the images; picklable for pools and Ray.

    Args:
        gt_dataset: a COCO ground-truth dataset dict (not modified); may hold more images.
        results: COCO result dicts; those of other images are ignored. With an ``id`` on
            every one (its 1-based position in the full list), the output uses those ids.
        img_ids: the images of this shard (non-empty).

    Returns:
        ``COCOeval.evalImgs`` for these images (category-major, then area range, then
        ascending image id).
    """
    ids = sorted({int(i) for i in img_ids})
    if not ids:
        raise ValueError("img_ids: a shard needs at least one image id")
    wanted = set(ids)
    gt = _coco_from_dataset(_subset_dataset(gt_dataset, ids))
    missing = wanted - set(gt.getImgIds())
    if missing:
        raise ValueError(f"img_ids: {sorted(missing)[:5]} not in the ground truth")
    shard_results = [r for r in results if int(r["image_id"]) in wanted]
    dt = _load_results(gt, shard_results)
    ev = COCOeval(gt, dt, iouType="segm")
    ev.params.imgIds = ids
    with _quiet():
        ev.evaluate()
    eval_imgs = ev.evalImgs
    if shard_results and all("id" in r for r in shard_results):
        _renumber_detections(eval_imgs, [int(r["id"]) for r in shard_results])
    return eval_imgs


def _renumber_detections(eval_imgs: list, global_ids: list[int]) -> None:
    """Replace shard-local detection ids (1..n, loadRes order) with the global ones."""
    lut = np.zeros(len(global_ids) + 1, dtype=np.float64)
    lut[1:] = global_ids
    for e in eval_imgs:
        if e is None:
            continue
        e["dtIds"] = [int(lut[i]) for i in e["dtIds"]]
        gm = e["gtMatches"]
        e["gtMatches"] = lut[gm.astype(np.int64)]  # 0 (unmatched) maps to 0


def merge_eval_imgs(
    shard_img_ids: Sequence[Sequence[int]], shard_eval_imgs: Sequence[list], num_categories: int, num_area_ranges: int
) -> tuple[list[int], list]:
    """Interleave per-shard ``evalImgs`` into the order of one ``evaluate()`` over all images.

    Args:
        shard_img_ids: the image ids of each shard (any partition of the images).
        shard_eval_imgs: :func:`evaluate_image_shard` output of each shard, same order.
        num_categories: K, number of evaluated categories.
        num_area_ranges: A, number of area ranges.

    Returns:
        (all image ids ascending, merged evalImgs of length K * A * len(ids)).
    """
    blocks: list[tuple[list[int], list]] = []
    all_ids: list[int] = []
    for ids, ev in zip(shard_img_ids, shard_eval_imgs, strict=True):
        ids = sorted({int(i) for i in ids})
        if len(ev) != num_categories * num_area_ranges * len(ids):
            raise ValueError(
                f"shard_eval_imgs: {len(ev)} entries for {len(ids)} images x {num_categories} "
                f"categories x {num_area_ranges} area ranges"
            )
        blocks.append((ids, ev))
        all_ids.extend(ids)
    if len(set(all_ids)) != len(all_ids):
        raise ValueError("shard_img_ids: an image id is in more than one shard")
    all_ids.sort()
    pos = {img: n for n, img in enumerate(all_ids)}
    n_img = len(all_ids)
    merged: list = [None] * (num_categories * num_area_ranges * n_img)
    for ids, ev in blocks:
        n = len(ids)
        for ka in range(num_categories * num_area_ranges):
            src, dst = ka * n, ka * n_img
            for j, img in enumerate(ids):
                merged[dst + pos[img]] = ev[src + j]
    return all_ids, merged


def _summarize(coco_gt: COCO, img_ids: Sequence[int], eval_imgs: list) -> tuple[dict[str, float], np.ndarray]:
    """``COCOeval.accumulate()`` and ``summarize()`` over merged evalImgs: (metrics, ``COCOeval.stats``)."""
    ev = COCOeval(coco_gt, None, iouType="segm")
    p = ev.params
    # Exactly what evaluate() leaves behind: unique sorted ids (numpy ints), sorted maxDets.
    p.imgIds = list(np.unique(np.asarray(img_ids, dtype=np.int64)))
    p.catIds = list(np.unique(p.catIds))
    p.maxDets = sorted(p.maxDets)
    ev.evalImgs = eval_imgs
    ev._paramsEval = copy.deepcopy(p)
    with _quiet():
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)
    # pycocotools reports -1 where a number is undefined (e.g. no large objects): NaN says so
    # without pulling averages and charts towards -1.
    return {name: (float(v) if v > -1 else math.nan) for name, v in zip(STAT_NAMES, stats)}, stats


def ray_map() -> MapFn:
    """``executor(fn, *iterables) -> list`` for :meth:`CocoMaskEvaluator.compute`, one 1-CPU Ray task a call."""
    import ray

    def _map(fn: Callable, *iterables: Iterable) -> list:
        task = ray.remote(num_cpus=1)(fn)
        return ray.get([task.remote(*args) for args in zip(*iterables)])

    return _map


def masks_to_coco_results(
    image_id: int, masks: Any, labels: Any, scores: Any, categories: CategoryIndex, orig_size: Sequence[int] | None = None
) -> list[dict]:
    """Instance masks of one image -> COCO result dicts, with COCO's own category ids.

    Args:
        image_id: COCO image id.
        masks: (N, H, W) bool (or probabilities, thresholded at 0.5) tensor or array.
        labels: (N,) contiguous class indices (>= 1, CategoryIndex order).
        scores: (N,) confidences.
        categories: the dataset's CategoryIndex, to map classes back to COCO ids.
        orig_size: (height, width) of the original image (where COCO ground truth lives);
            masks are resized (nearest) to it.

    Returns:
        ``[{"image_id", "category_id", "segmentation": {"size", "counts": str}, "score"}]``.
    """
    masks = torch.as_tensor(masks)
    labels = torch.as_tensor(labels).reshape(-1)
    scores = torch.as_tensor(scores).reshape(-1)
    if masks.dim() != 3 or not (len(masks) == len(labels) == len(scores)):
        raise ValueError(
            f"masks/labels/scores: expected (N, H, W), (N,), (N,), got {tuple(masks.shape)}, "
            f"{tuple(labels.shape)}, {tuple(scores.shape)}"
        )
    if len(masks) == 0:
        return []
    bad = [int(v) for v in labels.tolist() if not 1 <= int(v) < categories.num_classes]
    if bad:
        raise ValueError(f"labels: class {bad[0]} is not in 1..{categories.num_classes - 1}")
    binary = masks > 0.5 if masks.is_floating_point() else masks != 0
    if orig_size is not None and tuple(int(v) for v in orig_size) != tuple(binary.shape[-2:]):
        size = tuple(int(v) for v in orig_size)
        # "nearest-exact" samples pixel centers (as PIL and OpenCV do); plain "nearest" shifts by half a pixel.
        binary = F.interpolate(binary[:, None].float(), size=size, mode="nearest-exact")[:, 0] > 0.5
    arr = np.asfortranarray(binary.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(arr)
    out = []
    for rle, label, score in zip(rles, labels.tolist(), scores.tolist()):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": categories.coco_id_of(int(label)),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": _counts_str(rle["counts"])},
                "score": float(score),
            }
        )
    return out


class CocoMaskEvaluator:
    """Accumulates COCO instance-segmentation results and computes official mask AP.

    Args:
        coco_gt: ground truth (``COCO(path)`` or :func:`coco_gt_from_rows`). Every image in
            it is evaluated: an image without results counts its objects as missed.

    Attributes:
        stats: after :meth:`compute` / :meth:`all_reduce`, ``COCOeval.stats`` (12 numbers,
            -1 where undefined), or None.
    """

    def __init__(self, coco_gt: COCO):
        self.coco_gt = coco_gt
        self._img_ids = sorted(int(i) for i in coco_gt.getImgIds())
        self._sizes = {int(i): (int(im["height"]), int(im["width"])) for i, im in coco_gt.imgs.items()}
        self._cat_ids = {int(c) for c in coco_gt.getCatIds()}
        self.reset()

    def reset(self) -> None:
        """Drop all results."""
        self._results: list[dict] = []
        self._has_bbox: bool | None = None
        self._reduced: dict[str, float] | None = None
        self.stats: np.ndarray | None = None

    def update(self, results: Iterable[dict]) -> None:
        """Add COCO result dicts.

        Args:
            results: ``{"image_id", "category_id" (COCO id), "segmentation"`` (compressed
                RLE at the image's original size), ``"score"}`` per detected instance.
        """
        checked = []
        expect_bbox = self._has_bbox
        for n, r in enumerate(results):
            missing = {"image_id", "category_id", "segmentation", "score"} - r.keys()
            if missing:
                raise ValueError(f"results[{n}]: missing {sorted(missing)}")
            img, cat = int(r["image_id"]), int(r["category_id"])
            if img not in self._sizes:
                raise ValueError(f"results[{n}]: image_id {img} is not in the ground truth")
            if cat not in self._cat_ids:
                raise ValueError(
                    f"results[{n}]: category_id {cat} is not a ground-truth COCO category id "
                    "(map contiguous classes back with CategoryIndex.coco_id_of)"
                )
            seg = r["segmentation"]
            if not isinstance(seg, dict) or "size" not in seg or not isinstance(seg.get("counts"), (str, bytes)):
                raise ValueError(f"results[{n}]: segmentation must be a compressed RLE dict with 'size' and 'counts'")
            if tuple(int(v) for v in seg["size"]) != self._sizes[img]:
                raise ValueError(f"results[{n}]: mask size {list(seg['size'])} != image {img} size {list(self._sizes[img])}")
            # loadRes picks its code path (bbox- or mask-derived area) from the first result;
            # mixed results would make shards disagree with a single run.
            has_bbox = "bbox" in r
            if expect_bbox is None:
                expect_bbox = has_bbox
            elif has_bbox != expect_bbox:
                raise ValueError(f"results[{n}]: some results have 'bbox' and others not; give all or none")
            checked.append(dict(r))
        # Nothing is kept from a call that fails half-way.
        self._results.extend(checked)
        self._has_bbox = expect_bbox
        self._reduced = None

    def merge(self, other: CocoMaskEvaluator) -> None:
        """Append ``other``'s results (same ground truth) after this one's."""
        if not isinstance(other, CocoMaskEvaluator) or other._img_ids != self._img_ids:
            raise ValueError("merge: other is not a CocoMaskEvaluator over the same ground-truth images")
        self.update(other._results)

    def state_dict(self) -> dict[str, Any]:
        """The accumulated results (picklable; the ground truth is not included)."""
        return {"results": list(self._results)}

    @classmethod
    def from_state(cls, state: dict[str, Any], coco_gt: COCO) -> CocoMaskEvaluator:
        """Rebuild from :meth:`state_dict` output and the same ground truth."""
        ev = cls(coco_gt)
        ev.update(state["results"])
        return ev

    def _numbered_results(self, offset: int = 0) -> list[dict]:
        # The id loadRes would give each result in one run over the concatenated list.
        return [{**r, "id": offset + n + 1} for n, r in enumerate(self._results)]

    def _evaluate(
        self, img_ids: Sequence[int], results: list[dict], num_shards: int, executor: MapFn | None
    ) -> tuple[list[int], list]:
        """Per-image matching of ``img_ids`` in shards; returns (ids, merged evalImgs)."""
        if num_shards < 1:
            raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
        shards = [list(map(int, s)) for s in np.array_split(np.asarray(img_ids, dtype=np.int64), num_shards) if len(s)]
        if not shards:
            return [], []
        owner = {img: s for s, ids in enumerate(shards) for img in ids}
        shard_results: list[list[dict]] = [[] for _ in shards]
        for r in results:
            shard_results[owner[int(r["image_id"])]].append(r)
        datasets = [_subset_dataset(self.coco_gt.dataset, ids) for ids in shards]
        run = executor or map
        shard_evals = list(run(evaluate_image_shard, datasets, shard_results, shards))
        return merge_eval_imgs(shards, shard_evals, len(self._cat_ids), _NUM_AREAS)

    def compute(self, num_shards: int = 1, executor: MapFn | None = None) -> dict[str, float]:
        """Mask AP over all ground-truth images.

        Args:
            num_shards: number of image-id shards the matching is split into.
            executor: ``map``-like callable running :func:`evaluate_image_shard` on the
                shards, e.g. ``ProcessPoolExecutor(n).map`` or :func:`ray_map`; default
                serial. Ignored after :meth:`all_reduce` (the result is already known).

        Returns:
            ``{"mask_ap", "mask_ap50", "mask_ap75", "mask_ap_s", "mask_ap_m", "mask_ap_l"}``;
            NaN where pycocotools reports -1 (no ground truth in that area range).
        """
        if self._reduced is not None:
            return dict(self._reduced)
        ids, eval_imgs = self._evaluate(self._img_ids, self._numbered_results(), num_shards, executor)
        metrics, self.stats = _summarize(self.coco_gt, ids, eval_imgs)
        return metrics

    def all_reduce(self, num_shards: int = 1, executor: MapFn | None = None) -> None:
        """Evaluate over all torch.distributed ranks' results; then every rank's compute() has the total.

        Each rank matches its share of the images; rank 0 accumulates and broadcasts. Equals
        one run over ``rank0 + rank1 + ...`` results.

        Args:
            num_shards: shards of this rank's share, for ``executor``.
            executor: ``map``-like callable for this rank's shards; default serial.
        """
        if not _dist.is_distributed():
            return
        rank, world = _dist.rank_and_world()
        counts = _dist.all_gather_int(len(self._results))
        shares = [list(map(int, s)) for s in np.array_split(np.asarray(self._img_ids, dtype=np.int64), world)]
        owner = {img: r for r, ids in enumerate(shares) for img in ids}
        outgoing: list[list[dict]] = [[] for _ in range(world)]
        for res in self._numbered_results(offset=sum(counts[:rank])):
            outgoing[owner[int(res["image_id"])]].append(res)
        incoming = [r for part in _dist.exchange_objects(outgoing) for r in part]
        local = self._evaluate(shares[rank], incoming, num_shards, executor) if shares[rank] else ([], [])
        gathered = _dist.gather_objects(local, dst=0)
        metrics = stats = None
        if rank == 0:
            parts = [g for g in gathered if g[0]]
            ids, eval_imgs = merge_eval_imgs([p[0] for p in parts], [p[1] for p in parts], len(self._cat_ids), _NUM_AREAS)
            metrics, stats = _summarize(self.coco_gt, ids, eval_imgs)
        metrics, stats = _dist.broadcast_object((metrics, stats), src=0)
        self._reduced, self.stats = metrics, stats
