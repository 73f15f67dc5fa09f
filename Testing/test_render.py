"""The built-in bitmap font and the PNG figures that use it (demo montage, training curves)."""

import math
import string

import numpy as np
import pytest
import SimpleITK as sitk

from atlasseg.render import (
    FONT_CHARS,
    GLYPH_HEIGHT,
    draw_text,
    fit_text,
    label_colour,
    line_chart,
    nice_ceiling,
    save_montage,
    text_height,
    text_mask,
    text_width,
)
from atlasseg.training.trainer import plot_curves

PUNCTUATION = ".,:;-+_/()%[]<>=#'\"!?"
CLAIMED = string.ascii_uppercase + string.ascii_lowercase + string.digits + " " + PUNCTUATION


def _png(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dark(rgb: np.ndarray) -> int:
    return int((rgb.max(axis=-1) < 80).sum())


# ---------------------------------------------------------------------------------------------------------------
# font


def test_font_covers_every_claimed_character_with_its_own_glyph():
    box = text_mask("\u2603")  # no glyph: drawn as a box
    assert box.any()
    glyphs = {}
    for char in CLAIMED + string.printable[:95]:
        assert char in FONT_CHARS, repr(char)
        mask = text_mask(char)
        assert mask.shape == (GLYPH_HEIGHT, 5)
        assert mask.any() == (char != " "), repr(char)
        assert not np.array_equal(mask, box), repr(char)
        glyphs[char] = mask.tobytes()
    clashes = [(a, b) for a in glyphs for b in glyphs if a < b and glyphs[a] == glyphs[b]]
    assert not clashes, clashes
    assert np.array_equal(text_mask("\t"), box) and np.array_equal(text_mask("\u00e9"), box)


def test_descenders_use_the_bottom_row_and_capitals_do_not():
    for char in "gjpqy,;_":
        assert text_mask(char)[-1].any(), char
    for char in string.ascii_uppercase + string.digits + "abcdehiklmnorstuvwxz":
        assert not text_mask(char)[-1].any(), char


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_text_is_non_empty_sized_as_documented_and_differs_between_strings(scale):
    texts = ["Training loss", "Validation Dice", "epoch", "loss", "Dice", "0.73", "O0", "Il1", "dice"]
    masks = [text_mask(t, scale) for t in texts]
    for text, mask in zip(texts, masks):
        assert mask.shape == (text_height(scale), text_width(text, scale)) and mask.any(), text
        rgb = np.full((40, 300, 3), 255, np.uint8)
        end = draw_text(rgb, text, 2, 3, (10, 20, 30), scale)
        assert end == 2 + text_width(text, scale)
        ink = (rgb != 255).any(axis=-1)
        assert np.array_equal(ink[3:3 + mask.shape[0], 2:end], mask)  # exactly the mask, nothing else
        assert ink.sum() == mask.sum() and (rgb[ink] == (10, 20, 30)).all()
    assert len({m.tobytes() for m in masks}) == len(texts)
    assert text_width("", scale) == 0 and text_mask("", scale).shape == (text_height(scale), 0)
    assert text_width("ab", scale) == 11 * scale


def test_draw_text_clips_at_the_image_edges():
    full = np.full((60, 120, 3), 255, np.uint8)
    draw_text(full, "Clip me: gj", 20, 20, (0, 0, 0), 2)
    reference = full[20:36, 20:20 + text_width("Clip me: gj", 2)]
    for x, y in [(-7, -5), (-200, 0), (0, -100), (110, 50), (5, 12), (1000, 1000), (-5, 8)]:
        small = np.full((14, 30, 3), 255, np.uint8)
        draw_text(small, "Clip me: gj", x, y, (0, 0, 0), 2)
        expected = np.full_like(small, 255)
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + reference.shape[0], small.shape[0]), min(x + reference.shape[1], small.shape[1])
        if y1 > y0 and x1 > x0:
            expected[y0:y1, x0:x1] = reference[y0 - y:y1 - y, x0 - x:x1 - x]
        assert np.array_equal(small, expected), (x, y)
    tiny = np.zeros((1, 1, 3), np.uint8)
    draw_text(tiny, "x", 0, 0, (255, 255, 255), 5)  # no error on an image smaller than one glyph
    with pytest.raises(ValueError):
        draw_text(np.zeros((5, 5), np.uint8), "x", 0, 0)
    with pytest.raises(ValueError):
        text_mask("x", 0)


def test_vertical_text_reads_bottom_to_top():
    rgb = np.full((80, 20, 3), 255, np.uint8)
    end = draw_text(rgb, "loss", 3, 4, (0, 0, 0), 1, vertical=True)
    assert end == 4 + text_width("loss")
    ink = (rgb != 255).any(axis=-1)
    assert np.array_equal(ink[4:end, 3:3 + GLYPH_HEIGHT], np.rot90(text_mask("loss")))
    assert ink.sum() == text_mask("loss").sum()


def test_fit_text_shrinks_then_cuts():
    assert fit_text("Dice", 100, 3) == ("Dice", 3)
    assert fit_text("Dice", text_width("Dice", 2), 3) == ("Dice", 2)
    text, scale = fit_text("weights atlas 1", 60, 2)
    assert scale == 1 and text.endswith("..") and text_width(text) <= 60 and text.startswith("weights")
    assert fit_text("weights atlas 1", 60, 2, min_scale=2)[1] == 2
    assert fit_text("abc", 3, 1) == ("", 1)


def test_nice_ceiling():
    assert nice_ceiling(0.7277) == 0.73 and nice_ceiling(2.43) == 2.5 and nice_ceiling(1.0) == 1.0
    assert nice_ceiling(1234) == 1300 and nice_ceiling(float("nan")) == 1.0 and nice_ceiling(0.0) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# training curves


def _history(n: int, every: int = 1, baseline: bool = True) -> list[dict]:
    rows = []
    for epoch in range(1, n + 1):
        row = {"epoch": epoch, "train_loss": 1.2 * math.exp(-epoch / 6) + 0.1,
               "val_dice": 0.6 + 0.3 * (1 - math.exp(-epoch / 5)) if epoch % every == 0 else float("nan")}
        if baseline:
            row["val_dice_majority"] = 0.71
        rows.append(row)
    return rows


@pytest.mark.parametrize("size", [None, (300, 200), (500, 320)])
def test_plot_curves_writes_a_titled_png_of_the_documented_size(tmp_path, size):
    kwargs = {} if size is None else {"width": size[0], "height": size[1]}
    width, height = size or (360, 240)
    path = plot_curves(_history(20, every=2), tmp_path / "curves.png", **kwargs)
    rgb = _png(path)
    assert rgb.shape == (height, 2 * width + 10, 3)
    title_rows = rgb[:text_height(2) + 4]
    for panel in (title_rows[:, :width], title_rows[:, width + 10:]):
        assert _dark(panel) > 50  # "Training loss" / "Validation Dice"
    assert _dark(rgb[-text_height(1) - 4:]) > 30  # x tick labels and "epoch"
    assert (np.abs(rgb[:, :width].astype(int) - (220, 30, 30)).sum(axis=-1) == 0).sum() > 200  # red loss
    right = rgb[:, width + 10:].astype(int)
    assert (np.abs(right - (30, 80, 220)).sum(axis=-1) == 0).sum() > 200  # blue Dice
    assert (np.abs(right - (150, 150, 150)).sum(axis=-1) == 0).sum() > 200  # grey majority voting


def test_plot_curves_legend_lists_the_baseline_only_when_there_is_one(tmp_path):
    with_baseline = _png(plot_curves(_history(5), tmp_path / "a.png"))
    without = _png(plot_curves(_history(5, baseline=False), tmp_path / "b.png"))
    assert with_baseline.shape == without.shape
    assert np.array_equal(with_baseline[:, :360], without[:, :360])  # the loss panel does not change
    grey = (150, 150, 150)
    assert not (without == grey).all(axis=-1).any()
    assert _dark(with_baseline[:, 370:]) > _dark(without[:, 370:])  # "majority voting" in the legend


def test_plot_curves_handles_one_epoch_and_missing_validation(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.5, "val_dice": float("nan"), "val_dice_majority": float("nan")}]
    rgb = _png(plot_curves(rows, tmp_path / "one.png"))
    assert rgb.shape == (240, 730, 3)
    red = (rgb[:, :360] == (220, 30, 30)).all(axis=-1)
    legend_bottom = 4 + text_height(2) + 4 + text_height(1) + 6  # title, then one legend row
    assert red[legend_bottom:].sum() == 25  # the single loss point is a 5x5 dot


def test_line_chart_refuses_a_size_without_room_for_the_plot():
    with pytest.raises(ValueError, match="no room"):
        line_chart([([1, 2], [0.1, 0.2], (255, 0, 0), "a")], 40, 30, title="t", xlabel="x", ylabel="y")


# ---------------------------------------------------------------------------------------------------------------
# montage


def _panels(shape=(20, 24)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = ((yy > 4) & (yy < 15)).astype(np.int64) + (xx > 12) * ((yy > 4) & (yy < 15))
    return [("target", 100.0 + xx, "grey"), ("reference", labels, "labels"), ("votes", xx / shape[1], "heat")], xx


def test_save_montage_writes_titles_and_legend(tmp_path):
    panels, background = _panels()
    title = "AtlasSeg demo: case (jlf, mean Dice 0.900)"
    path = save_montage(panels, tmp_path / "m.png", background=background, scale=3, title=title,
                        legend={1: "tissue", 2: "ventricles"}, text_scale=1)
    rgb = _png(path)
    tile_w, tile_h = 24 * 3 + 8, 20 * 3 + 8
    title_h, panel_h = text_height(2) + 8, text_height(1) + 8
    assert rgb.shape[1] == 3 * tile_w and rgb.shape[0] > title_h + panel_h + tile_h
    assert _dark(rgb[:title_h]) > 100                               # overall title
    for i in range(3):                                              # each panel's title above it
        assert _dark(rgb[title_h:title_h + panel_h, i * tile_w:(i + 1) * tile_w]) > 20, i
    legend = rgb[title_h + panel_h + tile_h:]
    assert _dark(legend) > 50
    for value in (1, 2):
        assert (legend == label_colour(value)).all(axis=-1).sum() > 10, value


def test_save_montage_layout_without_title_or_legend(tmp_path):
    panels, background = _panels()
    rgb = _png(save_montage(panels, tmp_path / "m.png", background=background, scale=2))
    assert rgb.shape == (text_height(2) + 8 + 20 * 2 + 8, 3 * (24 * 2 + 8), 3)
    assert _dark(rgb[:text_height(2) + 8]) > 50
    untitled = [("", a, k) for _, a, k in panels]
    rgb = _png(save_montage(untitled, tmp_path / "n.png", background=background, scale=2))
    assert rgb.shape == (20 * 2 + 8, 3 * (24 * 2 + 8), 3)


def test_save_montage_shrinks_and_cuts_long_titles(tmp_path):
    panels, background = _panels((10, 10))
    long = [("a rather long panel title that cannot fit", a, k) for _, a, k in panels]
    rgb = _png(save_montage(long, tmp_path / "m.png", background=background, scale=2, title="x" * 200,
                            legend=[(1, "a label name far too long for the narrow image it is drawn in")]))
    width = 3 * (10 * 2 + 8)
    assert rgb.shape[1] == width
    title_h, panel_h = text_height(3) + 8, text_height(2) + 8
    assert _dark(rgb[:title_h]) > 0 and _dark(rgb[title_h:title_h + panel_h]) > 0
    # the text stays inside its own panel: the 2-pixel gutters between panel titles stay white
    for i in range(1, 3):
        assert (rgb[title_h:title_h + panel_h, i * 28 - 2:i * 28 + 2] == 255).all()
