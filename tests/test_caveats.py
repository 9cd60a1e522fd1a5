"""equishift.caveats and the page's warnings: the numbers a flat, random or out-of-distribution case would
show are flagged, and the trained zoo models on Fashion-MNIST images are not."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equishift import caveats
from equishift.images import invert, inverted_png, load_image
from equishift.sweep import sweep
from equishift.zoo import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "assets" / "images"
FMNIST = sorted(IMAGES.glob("fmnist-*.png"))
RANDOM_TIMM = "timm:vit_tiny_patch16_224?img_size=32&patch_size=4&depth=1&num_classes=7"
SHIFTS = torch.tensor([(dy, dx) for dy in range(4) for dx in range(4)])


@pytest.fixture(scope="module")
def zoo_pair():
    return [load_model(f"zoo:fmnist-vit-{v}", device="cpu") for v in ("baseline", "anchored")]


def kinds(cs):
    return [c.kind for c in cs]


def colour_gradient(seed: int = 0, size: int = 96) -> Image.Image:
    """A smooth colour photo stand-in: random colours at the corners, interpolated bilinearly."""
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 255, size=(2, 2, 3))
    t = np.linspace(0, 1, size)[:, None, None]
    s = np.linspace(0, 1, size)[None, :, None]
    img = ((1 - t) * ((1 - s) * corners[0, 0] + s * corners[0, 1]) + t * ((1 - s) * corners[1, 0] + s * corners[1, 1]))
    return Image.fromarray(img.round().astype(np.uint8), "RGB")


def test_random_timm_model_flat_output_and_random_weights():
    lm = load_model(RANDOM_TIMM, device="cpu")
    x = lm.preprocess(load_image(FMNIST[-1]))
    result = sweep(lm, x, SHIFTS, "circular")
    assert kinds(caveats.for_sweep(result)) == ["flat-output"]
    assert "meaningless" in caveats.for_sweep(result)[0].message
    model = caveats.for_model(lm)
    assert kinds(model) == ["random-weights"] and "seed 0" in model[0].message
    # anchoring a random model leaves its weights random: still flagged as random, not as "anchoring only"
    assert kinds(caveats.for_model(load_model("anchored:" + RANDOM_TIMM, device="cpu"))) == ["random-weights"]


def test_trained_zoo_pair_on_fashion_mnist_has_no_caveats(zoo_pair):
    for lm in zoo_pair:
        for path in FMNIST:
            img = load_image(path)
            x = lm.preprocess(img)
            result = sweep(lm, x, SHIFTS, "circular")
            assert caveats.for_side(lm, x=x, result=result, image=img) == [], (lm.name, path.name)


def test_anchorized_trained_model_says_the_anchoring_is_untrained():
    lm = load_model("anchored:zoo:fmnist-vit-baseline", device="cpu")
    assert kinds(caveats.for_model(lm)) == ["untrained-anchoring"]


def test_inverted_sample_gets_the_invert_fix_and_inverting_back_clears_it(zoo_pair):
    for lm in zoo_pair:
        for path in FMNIST:
            data = inverted_png(path.read_bytes())
            neg = load_image(data)
            found = caveats.for_input(lm, image=neg)
            assert kinds(found) == ["inverted"] and found[0].fix == "invert", (lm.name, path.name, found)
            back = load_image(inverted_png(data))
            assert np.array_equal(np.asarray(back), np.asarray(load_image(path)))  # lossless round trip
            assert caveats.for_input(lm, image=back) == []
            assert caveats.for_input(lm, x=lm.preprocess(back)) == []  # from the model input alone, too


def test_colour_photo_is_flagged_and_not_offered_an_inversion(zoo_pair):
    photo = colour_gradient(seed=0)
    for lm in zoo_pair:
        for img in (photo, invert(photo)):
            found = caveats.for_input(lm, image=img)
            assert "colour" in kinds(found), found
            assert all(c.fix is None for c in found)  # inverting a photo does not make it a garment


def test_blank_and_white_inputs_are_out_of_distribution(zoo_pair):
    lm = zoo_pair[0]
    for value in (0, 255):
        img = Image.new("RGB", (28, 28), (value,) * 3)
        assert kinds(caveats.for_input(lm, image=img)) == ["out-of-distribution"], value


def test_timm_card_input_far_from_the_normalisation():
    lm = load_model(RANDOM_TIMM, device="cpu")
    black = Image.new("RGB", (32, 32))
    assert caveats.for_input(lm, image=black) == []  # random weights: the weights caveat says it all
    trained = LoadedModel(lm.model, dict(lm.card, untrained=False, weights="w.safetensors"), lm.spec, lm.device)
    found = caveats.for_input(trained, image=black)
    assert kinds(found) == ["out-of-distribution"] and "mostly black" in found[0].message
    white = caveats.for_input(trained, image=Image.new("RGB", (32, 32), (250, 250, 250)))
    assert kinds(white) == ["out-of-distribution"] and "mostly white" in white[0].message
    assert caveats.for_input(trained, image=colour_gradient(seed=1)) == []


def test_fmnist_stats_are_those_of_the_training_data():
    from equishift.data import FMNIST_STATS, fashion_mnist_root, fmnist_stats

    if not (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    assert fmnist_stats() == FMNIST_STATS


def test_recipe_says_grayscale_for_fashion_mnist_models(zoo_pair):
    text = caveats.recipe(zoo_pair[0].card)
    assert text.startswith("grayscale (replicated to 3 channels), fit to 28×28, pad 2 px black → 32×32")
    assert caveats.recipe(load_model(RANDOM_TIMM, device="cpu").card).startswith("RGB, resize to")


def test_caveats_are_cheap(zoo_pair):
    import time

    lm = zoo_pair[0]
    img = load_image(IMAGES / "photo-astronaut.jpg")
    x = lm.preprocess(img)
    result = sweep(lm, x, SHIFTS, "circular")
    caveats.for_side(lm, x=x, result=result, image=img)  # warm
    t = time.perf_counter()
    for _ in range(10):
        caveats.for_side(lm, x=x, result=result, image=img)
    # 5 ms per call on the small models, with room for a CPU shared with other work
    assert (time.perf_counter() - t) / 10 < 0.025


# --- the page ---------------------------------------------------------------------------------------
def _page():
    import streamlit as st

    from dashboard import caveats as page_caveats
    from dashboard import sources
    from dashboard.session import Side
    from equishift.images import load_image
    from equishift.zoo import load_model

    choice = sources.image_picker()
    lm = load_model("zoo:fmnist-vit-baseline", device="cpu")
    side = Side("baseline", "zoo:fmnist-vit-baseline", loaded=lm, x=lm.preprocess(load_image(choice.data)))
    page_caveats.render([side], choice)
    st.code(f"{choice.label}|{choice.sha256}|{choice.inverted}")


def test_page_warns_and_one_click_inverts(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    sys.path.insert(0, str(ROOT))
    light = tmp_path / "light-boot.png"
    light.write_bytes(inverted_png(FMNIST[-1].read_bytes()))
    monkeypatch.setenv("EQUISHIFT_IMAGES_DIR", str(tmp_path))
    at = AppTest.from_function(_page, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and "light background" in warnings[0].lower(), warnings
    label, sha, inverted = at.code[0].value.split("|")
    assert (label, sha, inverted) == ("light-boot.png", hashlib.sha256(light.read_bytes()).hexdigest(), "False")
    button = next(b for b in at.button if b.key == "caveat_invert")
    assert button.label == "Invert the image"
    button.click().run()
    assert not at.exception, at.exception
    label2, sha2, inverted2 = at.code[0].value.split("|")
    assert label2 == "light-boot.png (inverted)" and inverted2 == "True" and sha2 != sha
    assert [w.value for w in at.warning] == []  # the negative looks like the data: nothing to warn about
    toggle = at.sidebar.toggle[0]
    assert toggle.label == "Invert the image" and toggle.value is True  # the sidebar toggle agrees
    at.run()  # the choice survives a rerun
    assert at.code[0].value.split("|")[0] == "light-boot.png (inverted)"
    toggle.set_value(False).run()
    assert at.code[0].value.split("|")[1] == sha
