"""Targets on hand-built masks, built by each task from the shared decoded instances:
a square's boundary ring, center and offsets; crowd; classes."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.data.targets import Instances, augment, decode_annotations, decode_layers, id_layers
from mtseg.data.transforms import apply_joint, build_transform
from mtseg.tasks.boundary import BoundaryTask
from mtseg.tasks.instance import InstanceTask
from mtseg.tasks.semantic import SemanticTask
from mtseg.tasks.supercategory import SupercategoryTask

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 8, "name": "truck", "supercategory": "vehicle"},
]


@pytest.fixture
def cats():
    return CategoryIndex.from_categories(CATEGORIES)


def _square(h, w, y0, x0, side):
    m = np.zeros((h, w), np.uint8)
    m[y0 : y0 + side, x0 : x0 + side] = 1
    return m


def _tasks(cats, width=1, sigma=1.5):
    return (
        SemanticTask(num_classes=cats.num_classes),
        SupercategoryTask(num_supercategories=cats.num_supercategories, class_to_super=tuple(cats.class_to_super)),
        BoundaryTask(width=width),
        InstanceTask(center_sigma=sigma),
    )


def _targets(masks, labels, crowd, cats, width=1, sigma=1.5):
    instances = Instances(np.asarray(masks, np.uint8), np.asarray(labels), np.asarray(crowd, bool), cats)
    out = {}
    for task in _tasks(cats, width, sigma):
        out.update(task.build_targets(instances))
    return out


@pytest.mark.parametrize("width", [1, 2, 3])
def test_square_boundary_is_the_inner_ring_of_the_given_width(cats, width):
    sq = _square(32, 32, 8, 10, 11)
    t = _targets([sq], [1], [False], cats, width=width)
    inner = np.zeros_like(sq)
    inner[8 + width : 19 - width, 10 + width : 21 - width] = 1
    expected = sq.astype(bool) & ~inner.astype(bool)
    np.testing.assert_array_equal(t["boundary"].astype(bool), expected)
    assert t["boundary"].dtype == np.float32


def test_square_center_peaks_at_its_centroid_and_offsets_point_there(cats):
    sq = _square(32, 32, 8, 10, 11)  # rows 8..18, cols 10..20 -> centroid (13, 15)
    t = _targets([sq], [2], [False], cats, sigma=2.0)
    center = t["center"]
    assert center.shape == (1, 32, 32) and center.dtype == np.float32
    assert center[0, 13, 15] == pytest.approx(1.0)
    assert np.unravel_index(center[0].argmax(), (32, 32)) == (13, 15)
    assert center[0, 13, 17] == pytest.approx(np.exp(-4 / 8), rel=1e-5)

    ys, xs = np.nonzero(sq)
    offset = t["offset"]
    np.testing.assert_allclose(offset[0, ys, xs], 13 - ys)
    np.testing.assert_allclose(offset[1, ys, xs], 15 - xs)
    # Every instance pixel plus its offset lands on the centroid; outside it is zero.
    np.testing.assert_array_equal(offset[:, sq == 0], 0)
    np.testing.assert_array_equal(t["thing_mask"], sq.astype(np.float32))
    assert t["semantic"][13, 15] == 2 and t["semantic"][0, 0] == 0


def test_crowd_is_ignored_where_no_instance_covers_it(cats):
    crowd = _square(24, 24, 2, 2, 12)
    person = _square(24, 24, 6, 6, 4)  # inside the crowd region
    t = _targets([crowd, person], [1, 1], [True, False], cats)
    sem = t["semantic"]
    assert sem[3, 3] == IGNORE_INDEX
    assert sem[7, 7] == 1  # the instance wins over the crowd region
    assert t["supercategory"][3, 3] == IGNORE_INDEX
    assert sem[20, 20] == 0
    # A crowd region has no center and no offsets and is not a thing.
    assert t["thing_mask"][3, 3] == 0 and t["thing_mask"][7, 7] == 1
    assert t["offset"][:, 3, 3].tolist() == [0, 0]
    assert np.unravel_index(t["center"][0].argmax(), (24, 24)) == (8, 8)  # only the person's center
    assert t["center"].max() == pytest.approx(1.0)


def test_two_adjacent_classes_have_a_boundary_between_them(cats):
    left = np.zeros((16, 16), np.uint8)
    left[:, :8] = 1
    right = 1 - left  # together they cover the image: no background edge anywhere
    t = _targets([left, right], [1, 2], [False, False], cats, width=1)
    b = t["boundary"].astype(bool)
    expected = np.zeros((16, 16), bool)
    expected[:, 7:9] = True  # one pixel each side of the class change, none at the image border
    np.testing.assert_array_equal(b, expected)


def test_supercategory_follows_the_hierarchy(cats):
    car, truck, person = _square(16, 16, 0, 0, 4), _square(16, 16, 8, 8, 4), _square(16, 16, 0, 10, 4)
    t = _targets([car, truck, person], [cats.class_of(3), cats.class_of(8), cats.class_of(1)], [False] * 3, cats)
    vehicle = cats.supercategories.index("vehicle") + 1
    person_super = cats.supercategories.index("person") + 1
    assert t["supercategory"][1, 1] == vehicle
    assert t["supercategory"][9, 9] == vehicle
    assert t["supercategory"][1, 11] == person_super
    assert t["supercategory"][15, 0] == 0
    assert t["semantic"][1, 1] != t["semantic"][9, 9]  # car and truck differ as classes


def test_smaller_instance_is_painted_over_a_larger_one(cats):
    big, small = _square(16, 16, 0, 0, 12), _square(16, 16, 4, 4, 3)
    t = _targets([small, big], [1, 2], [False, False], cats)  # order in the list must not matter
    assert t["semantic"][5, 5] == 1 and t["semantic"][1, 1] == 2
    assert t["center"][0, 5, 5] == pytest.approx(1.0)


def test_no_instances_gives_all_background(cats):
    t = _targets(np.zeros((0, 8, 10)), [], [], cats)
    expected = {
        "semantic": ((8, 10), np.int64),
        "supercategory": ((8, 10), np.int64),
        "boundary": ((8, 10), np.float32),
        "center": ((1, 8, 10), np.float32),
        "offset": ((2, 8, 10), np.float32),
        "thing_mask": ((8, 10), np.float32),
    }
    assert set(t) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert t[k].shape == shape and t[k].dtype == dtype, k
        assert not t[k].any(), k


def test_each_task_declares_the_keys_it_builds(cats):
    t = _targets([_square(16, 16, 2, 2, 5)], [1], [False], cats)
    for task in _tasks(cats):
        fields = task.target_fields(16)
        assert set(task.build_targets(Instances(np.zeros((0, 16, 16)), [], [], cats))) == set(fields)
        for key, field in fields.items():
            assert t[key].shape == field.shape, key
            # The wire dtype holds every target value: exactly, or to 1e-3 for float16 heatmaps.
            atol = 1e-3 if field.wire == np.float16 else 0.0
            np.testing.assert_allclose(t[key].astype(field.wire).astype(t[key].dtype), t[key], atol=atol, rtol=0, err_msg=key)


def test_bad_inputs_fail_with_a_clear_message(cats):
    sq = _square(8, 8, 0, 0, 2)[None]
    with pytest.raises(ValueError, match="labels"):
        _targets(sq, [9], [False], cats)
    with pytest.raises(ValueError, match="masks"):
        _targets(sq[0], [1], [False], cats)
    with pytest.raises(ValueError, match="boundary_width"):
        _targets(sq, [1], [False], cats, width=0)
    with pytest.raises(ValueError, match="center_sigma"):
        _targets(sq, [1], [False], cats, sigma=0.0)


def _ann(mask, category_id, iscrowd=0, ann_id=1):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {
        "id": ann_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "segmentation_size": list(rle["size"]),
        "segmentation_counts": rle["counts"],
    }


def test_decode_annotations_round_trips_rle_and_drops_unknown_categories(cats):
    a, b = _square(10, 12, 1, 1, 3), _square(10, 12, 5, 6, 4)
    anns = [_ann(a, 3), _ann(b, 1, iscrowd=1, ann_id=2), _ann(a, 99, ann_id=3)]
    masks, labels, crowd = decode_annotations(anns, 10, 12, cats)
    assert masks.shape == (2, 10, 12) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], a)
    np.testing.assert_array_equal(masks[1], b)
    assert labels.tolist() == [cats.class_of(3), cats.class_of(1)]
    assert crowd.tolist() == [False, True]


def test_decode_annotations_empty_and_size_mismatch(cats):
    masks, labels, crowd = decode_annotations([], 4, 5, cats)
    assert masks.shape == (0, 4, 5) and labels.shape == (0,) and crowd.shape == (0,)
    masks, _, _ = decode_annotations(None, 4, 5, cats)
    assert masks.shape == (0, 4, 5)
    with pytest.raises(ValueError, match="annotation 7: mask size"):
        decode_annotations([_ann(_square(6, 6, 0, 0, 2), 1, ann_id=7)], 4, 5, cats)


# ----------------------------------------------------------------------------- against plain reference implementations
# The targets are computed with array tricks (shifted comparisons, bincount reductions); these
# references are the definitions written out pixel by pixel, and must agree exactly.


def _reference_segments(masks, crowd):
    n, h, w = masks.shape
    areas = masks.sum(axis=(1, 2))
    out = np.zeros((h, w), np.int64)
    for y in range(h):
        for x in range(w):
            covering = [i for i in range(n) if masks[i, y, x]]
            if covering:  # non-crowd wins, then the smaller area, then the later annotation
                out[y, x] = max(covering, key=lambda i: (not crowd[i], -areas[i], i)) + 1
    return out


def _reference_boundary(segments, width):
    h, w = segments.shape
    out = np.zeros((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            window = segments[max(0, y - width) : y + width + 1, max(0, x - width) : x + width + 1]
            out[y, x] = float(segments[y, x] > 0 and (window != segments[y, x]).any())
    return out


def _reference_centers(instances, sigma):
    h, w = instances.shape
    center = np.zeros((1, h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    radius = int(np.ceil(3.0 * sigma))
    for i in np.unique(instances[instances > 0]):
        ys, xs = np.nonzero(instances == i)
        cy, cx = np.rint(ys.mean()), np.rint(xs.mean())
        offset[0, ys, xs], offset[1, ys, xs] = cy - ys, cx - xs
        for y in range(max(0, int(cy) - radius), min(h, int(cy) + radius + 1)):
            for x in range(max(0, int(cx) - radius), min(w, int(cx) + radius + 1)):
                g = np.float32(np.exp(-float((y - cy) ** 2 + (x - cx) ** 2) / (2.0 * sigma**2)))
                center[0, y, x] = max(center[0, y, x], g)
    return center, offset


def _random_instances(rng, h, w, n, crowd_share=0.2):
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        kind = rng.integers(3)
        if kind == 0:  # one pixel, anywhere (corners and edges included)
            masks[i, rng.integers(h), rng.integers(w)] = 1
        elif kind == 1:  # a box that may run off the image
            y0, x0 = rng.integers(-3, h), rng.integers(-3, w)
            masks[i, max(0, y0) : y0 + rng.integers(2, 12), max(0, x0) : x0 + rng.integers(2, 12)] = 1
        else:  # ragged blob
            masks[i] = rng.random((h, w)) < 0.15
    return masks, rng.integers(1, 4, n), rng.random(n) < crowd_share


@pytest.mark.parametrize("seed", range(12))
def test_targets_equal_the_pixel_by_pixel_definitions(cats, seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 26, 2))
    n = int(rng.integers(0, 7))
    masks, labels, crowd = _random_instances(rng, h, w, n)
    width, sigma = int(rng.integers(1, 4)), float(rng.choice([0.7, 1.5, 3.0]))
    instances = Instances(masks, labels, crowd, cats)
    segments = _reference_segments(masks.astype(bool), crowd)
    assert np.array_equal(instances.segments, segments)
    out = _targets(masks, labels, crowd, cats, width, sigma)
    assert out["boundary"].dtype == np.float32
    assert np.array_equal(out["boundary"], _reference_boundary(segments, width))
    things = (segments > 0) & ~np.concatenate([[False], crowd])[segments]
    center, offset = _reference_centers(np.where(things, segments, 0), sigma)
    assert out["center"].dtype == np.float32 and out["offset"].dtype == np.float32
    assert np.array_equal(out["center"], center)
    assert np.array_equal(out["offset"], offset)
    assert np.array_equal(out["thing_mask"], things.astype(np.float32))


def test_edge_cases_empty_border_one_pixel_and_crowd(cats):
    h, w = 9, 11
    # Empty image: no edges, no centers.
    out = _targets(np.zeros((0, h, w), np.uint8), [], [], cats, width=2)
    assert not out["boundary"].any() and not out["center"].any() and not out["offset"].any()
    # An instance touching the border: the border is not an edge, its inner side toward background is.
    box = _square(h, w, 0, 0, 4)
    out = _targets(box[None], [1], [False], cats, width=1)
    assert np.array_equal(out["boundary"], _reference_boundary(box.astype(np.int64), 1))
    assert out["boundary"][0, 0] == 0 and out["boundary"][3, 0] == 1 and out["boundary"][0, 3] == 1
    # One-pixel instances, one in a corner: each is its own edge and its own center, offset 0.
    dots = np.zeros((2, h, w), np.uint8)
    dots[0, h - 1, w - 1] = 1
    dots[1, 4, 5] = 1
    out = _targets(dots, [1, 2], [False, False], cats, width=1)
    assert out["boundary"][h - 1, w - 1] == 1 and out["boundary"][4, 5] == 1 and out["boundary"].sum() == 2
    assert out["center"][0, h - 1, w - 1] == 1.0 and out["center"][0, 4, 5] == 1.0
    assert not out["offset"].any()
    # A crowd region: its outline is a boundary, but it has no center and no thing pixels.
    out = _targets(box[None], [1], [True], cats, width=1)
    assert out["boundary"].sum() > 0 and not out["center"].any() and not out["thing_mask"].any()


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_augment_gives_the_instances_of_the_augmented_masks(cats, overlap, train):
    rng = np.random.default_rng(4)
    h, w = 40, 52
    masks, labels, crowd = _random_instances(rng, h, w, 6)
    if not overlap:  # the visible parts, as COCO's instances and the synthetic data are
        masks = np.stack([_reference_segments(masks.astype(bool), crowd) == i + 1 for i in range(6)]).astype(np.uint8)
    assert (len(id_layers(masks)) > 1) == overlap
    transform = build_transform(32, train=train, scale_min=0.3)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    for seed in range(5):
        want_image, want_masks = apply_joint(transform, image, masks, seed=seed)
        want = Instances(want_masks, labels, crowd, cats)
        got_image, got = augment(transform, image, id_layers(masks), labels, crowd, cats, seed=seed)
        assert torch.equal(got_image, want_image)
        assert got.segments.dtype == np.int64 and np.array_equal(got.segments, want.segments)
        assert np.array_equal(got.masks, want_masks) and np.array_equal(got.semantic, want.semantic)
        assert np.array_equal(got.segments, _reference_segments(want_masks.astype(bool), crowd))


@pytest.mark.parametrize("seed", range(8))
def test_instances_from_id_layers_equal_instances_from_masks(cats, seed):
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(1, 20, 2))
    masks, labels, crowd = _random_instances(rng, h, w, int(rng.integers(0, 9)), crowd_share=0.3)
    layers = id_layers(masks)
    assert layers.dtype == np.uint8 and layers.shape[1:] == (h, w)
    got, want = Instances.from_layers(layers, labels, crowd, cats), Instances(masks, labels, crowd, cats)
    assert np.array_equal(got.segments, want.segments) and got.segments.dtype == want.segments.dtype
    assert np.array_equal(got.masks, masks)
    for task in _tasks(cats, width=2):
        for key, value in task.build_targets(got).items():
            assert np.array_equal(value, task.build_targets(want)[key]), key


@pytest.mark.parametrize("seed", range(10))
def test_decode_layers_equals_the_layers_of_the_decoded_masks(cats, seed):
    rng = np.random.default_rng(200 + seed)
    h, w = (int(v) for v in rng.integers(1, 30, 2))
    masks, labels, crowd = _random_instances(rng, h, w, int(rng.integers(0, 9)))
    if seed == 0:
        masks[:] = 1  # every mask the whole image: one layer each
    anns = [_ann(m, cats.coco_id_of(int(c)), int(k), ann_id=i) for i, (m, c, k) in enumerate(zip(masks, labels, crowd))]
    want_masks, want_labels, want_crowd = decode_annotations(anns, h, w, cats)
    layers, got_labels, got_crowd = decode_layers(anns, h, w, cats)
    want = id_layers(want_masks)
    assert layers.dtype == want.dtype == np.uint8 and layers.flags.c_contiguous
    assert np.array_equal(layers, want)
    assert np.array_equal(got_labels, want_labels) and np.array_equal(got_crowd, want_crowd)


def test_decode_layers_empty_many_and_bad_rle(cats):
    layers, labels, _ = decode_layers(None, 4, 5, cats)
    assert layers.shape == (1, 4, 5) and not layers.any() and labels.shape == (0,)
    # 300 one-pixel annotations: ids past uint8 travel as int32, and survive the transform.
    h, w = 20, 15
    masks = np.zeros((300, h, w), np.uint8)
    masks[np.arange(300), np.arange(300) // w, np.arange(300) % w] = 1
    anns = [_ann(m, 1, ann_id=i) for i, m in enumerate(masks)]
    layers, labels, crowd = decode_layers(anns, h, w, cats)
    assert layers.dtype == np.int32 and np.array_equal(layers, id_layers(masks))
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    transform = build_transform(16, train=False)
    _, got = augment(transform, image, layers, labels, crowd, cats)
    want = Instances(apply_joint(transform, image, masks)[1], labels, crowd, cats)
    assert np.array_equal(got.segments, want.segments) and got.segments.max() > 255
    bad = _ann(_square(4, 5, 0, 0, 2), 1)
    for counts in (b"", b"0", bad["segmentation_counts"][:-1], b"00000"):
        with pytest.raises(ValueError, match="cannot decode RLE"):
            decode_layers([dict(bad, segmentation_counts=counts)], 4, 5, cats)


def test_panoptic_targets_void_is_ignored_and_stuff_has_no_instances():
    cats = CategoryIndex.from_categories(
        [
            {"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
            {"id": 100, "name": "sky", "supercategory": "sky", "isthing": 0},
        ]
    )
    sky = np.zeros((16, 16), np.uint8)
    sky[:8] = 1
    sky[7] = 0  # a void seam
    person = _square(16, 16, 10, 4, 4)
    t = _targets([sky, person], [2, 1], [False, False], cats)
    assert t["semantic"][0, 0] == 2 and t["semantic"][11, 5] == 1
    assert t["semantic"][7, 0] == IGNORE_INDEX and t["semantic"][15, 15] == IGNORE_INDEX  # unlabelled: void, not background
    assert t["supercategory"][15, 15] == IGNORE_INDEX
    np.testing.assert_array_equal(t["thing_mask"].astype(bool), person.astype(bool))  # the sky is no thing
    assert np.unravel_index(t["center"][0].argmax(), (16, 16)) == (12, 6) and t["offset"][:, 2, 2].tolist() == [0, 0]
