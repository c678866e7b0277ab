"""Detection and segmentation pictures: colours that match class names, small images enlarged, label tags
inside the picture and apart, a segmentation legend listing exactly the classes present."""
from __future__ import annotations

import numpy as np
import pytest

from cpubone.downstream.visualize import class_colors, draw_detections, draw_segmentation, place_tag

SHAPES = ["red_square", "green_disc", "blue_triangle", "yellow_disc", "magenta_square", "cyan_triangle"]


def _dominant(c) -> int:
    return int(np.argmax(c))


def test_colours_follow_colour_words_in_class_names():
    red, green, blue, yellow, magenta, cyan = (np.asarray(c, float) for c in class_colors(SHAPES))
    assert _dominant(red) == 0 and _dominant(green) == 1 and _dominant(blue) == 2
    assert min(yellow[:2]) > 200 > 60 > yellow[2]  # red + green, no blue
    assert min(magenta[[0, 2]]) > 100 > 20 > magenta[1] and min(cyan[1:]) > 200 > 20 > cyan[0]
    sky, grass = (np.asarray(c, float) for c in class_colors(["sky", "grass"]))  # ADE20K names that are colours
    assert _dominant(sky) == 2 and _dominant(grass) == 1
    assert class_colors(["light_blue_car"])[0] != class_colors(["blue_car"])[0]


def test_colours_are_distinct_and_stable():
    two_greens = class_colors(["green_disc", "green_square", "green_triangle"])
    assert len(set(two_greens)) == 3 and all(_dominant(c) == 1 for c in two_greens)
    names = [f"class{k}" for k in range(150)] + SHAPES
    colours = class_colors(names)
    assert len(set(colours)) == len(names) and colours == class_colors(names)
    # unnamed classes do not borrow a colour a name claimed (tab20's 7th colour is a red: it is skipped)
    *unnamed, red = class_colors([f"c{k}" for k in range(8)] + ["red_square"])
    assert all(np.linalg.norm(np.subtract(c, red)) > 60 for c in unnamed)


def test_tags_stay_inside_and_apart():
    placed = []
    boxes = [(0, 0, 40, 40), (2, 2, 42, 42), (1, 3, 39, 44), (300, 350, 383, 383), (370, 0, 383, 10)]
    for box in boxes:
        tag = place_tag(box, (90, 18), (384, 384), placed)
        assert 0 <= tag[0] and tag[2] < 384 and 0 <= tag[1] and tag[3] < 384
        assert tag[2] - tag[0] + 1 == 90 and tag[3] - tag[1] + 1 == 18
        for other in placed:  # no two tags overlap (there is room for all of them)
            assert tag[2] < other[0] or other[2] < tag[0] or tag[3] < other[1] or other[3] < tag[1]
        placed.append(tag)
    assert placed[3][3] <= 349  # a box at the bottom edge gets its tag above it


def test_small_detection_picture_is_enlarged_with_tags_in_class_colours():
    img = np.full((96, 96, 3), 128, np.uint8)
    pic = np.asarray(draw_detections(img, [(10, 20, 40, 60), (12, 22, 44, 62), (70, 80, 96, 96)], [0, 1, 2], SHAPES,
                                     scores=[0.9, 0.8, 0.7]))
    assert pic.shape == (384, 384, 3)  # 4x, nearest neighbour: every pixel a sharp square
    colours = class_colors(SHAPES)
    for k in range(3):  # each tag is a filled block of its class colour (wider than the box outline)
        mask = (pic == colours[k]).all(-1)
        assert mask.sum() > 12 * 40, SHAPES[k]
    assert (pic[200:300, 0:30] == 128).all()  # away from the boxes the image is untouched
    big = np.asarray(draw_detections(np.full((480, 640, 3), 128, np.uint8), [(10, 20, 400, 300)], [0], SHAPES))
    assert big.shape == (480, 640, 3)  # normal sizes keep their size


def test_segmentation_tints_outlines_and_lists_present_classes():
    img = np.full((64, 64, 3), 100, np.uint8)
    labels = np.zeros((64, 64), np.int64)
    labels[:, :32] = 1  # red_square: half the image
    labels[40:50, 40:50] = 3  # blue_triangle: a small block; green_disc (2) absent
    classes = ["background"] + SHAPES[:3]
    pic = np.asarray(draw_segmentation(img, labels, classes, alpha=0.5))
    colours = class_colors(classes)
    assert pic.shape[0] == 384 and pic.shape[1] > 384  # enlarged 6x, legend to the right
    image, legend = pic[:, :384], pic[:, 384:]
    def rounded(x):
        return np.floor(np.asarray(x, np.float32) + 0.5)

    assert (image[100, 60] == rounded(0.5 * 100 + 0.5 * np.asarray(colours[1], np.float32))).all()  # tinted
    assert (image[100, 300] == 100).all()  # background untinted
    assert (image[100, 32 * 6 - 1] == rounded(0.55 * np.asarray(colours[1], np.float32))).all()  # dark outline

    def legend_rows(k):
        return np.nonzero((legend == colours[k]).all(-1).any(1))[0]

    red_rows, blue_rows = legend_rows(1), legend_rows(3)
    assert len(red_rows) > 5 and len(blue_rows) > 5 and len(legend_rows(2)) == 0  # absent class not listed
    assert red_rows.max() < blue_rows.min()  # larger share first
    with pytest.raises(ValueError, match="label map shape"):
        draw_segmentation(img, labels[:10], classes)
