"""equishift.zoo: specs, loading (zoo cards, timm, local files, anchored), preprocessing, errors, CLI."""
from __future__ import annotations

import builtins
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equishift import anchorize, cli
from equishift.errors import CheckpointError, ModelSpecError
from equishift.testing import assert_shift_invariant
from equishift.zoo import list_models, load_model, parse_spec, zoo_dir
from zoo_helpers import write_tiny

# A small timm ViT that builds in well under a second (the defaults of vit_tiny_patch16_224 take longer).
SMALL_TIMM = "vit_tiny_patch16_224?img_size=32&patch_size=4&depth=1&num_classes=7"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    write_tiny(root, "tiny-vit", metrics={"clean": {"value": 0.25, "n_images": 8}})
    write_tiny(root, "tiny-vit-anchored", anchoring="full")
    write_tiny(root, "tiny-twins", timm_class="Twins")
    return root


@pytest.fixture(scope="module")
def fmnist():
    from equishift.data import FashionMNIST

    return FashionMNIST("test")


def test_parse_spec_forms():
    s = parse_spec("anchored[patch-only]:timm:vit_small_patch16_224?img_size=64&num_classes=3@/x/w.pth")
    assert (s.source, s.name, s.anchoring, s.path) == ("timm", "vit_small_patch16_224", "patch-only", "/x/w.pth")
    assert dict(s.kwargs) == {"img_size": 64, "num_classes": 3} and not s.pretrained
    assert parse_spec("timm:deit_tiny_patch16_224?pretrained").pretrained
    assert parse_spec("anchored:zoo:m").anchoring == "full"
    assert parse_spec("some/dir/m.json") == parse_spec("zoo:some/dir/m.json")


@pytest.mark.parametrize("spec, words", [
    ("resnet18", ["zoo:NAME", "timm:NAME"]),
    ("", ["non-empty"]),
    ("anchored[odd]:zoo:x", ["full, pos-only, patch-only"]),
    ("anchored:anchored:zoo:x", ["only once"]),
    ("timm:vit_tiny_patch16_224?pretrained@w.pth", ["not both"]),
    ("timm:vit_tiny_patch16_224?=3", ["cannot read"]),
])
def test_bad_specs_say_what_is_wrong(spec, words):
    with pytest.raises(ModelSpecError) as e:
        load_model(spec)
    for w in words:
        assert w in str(e.value)


def test_unknown_zoo_name_lists_what_exists(zoo):
    with pytest.raises(ModelSpecError) as e:
        load_model("zoo:tiny-vt", root=zoo)
    assert "tiny-vt" in str(e.value)
    for spec in list_models(zoo):
        assert spec in str(e.value)
    assert list_models(zoo) == ["zoo:tiny-twins", "zoo:tiny-vit", "zoo:tiny-vit-anchored"]


def test_unknown_timm_name_suggests_close_matches():
    with pytest.raises(ModelSpecError) as e:
        load_model("timm:vit_tiny_patch16_2244")
    assert "vit_tiny_patch16_224" in str(e.value) and "did you mean" in str(e.value)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-vit-anchored", "tiny-twins"])
def test_zoo_card_loads_fresh_eval_model_on_cpu(zoo, name):
    a = load_model(f"zoo:{name}", device="cpu", root=zoo)
    b = load_model(f"zoo:{name}", device="cpu", root=zoo)
    assert not a.model.training and a.device == torch.device("cpu")
    assert a.model is not b.model
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(a.model.parameters(), b.model.parameters()))
    with torch.no_grad():  # changing one copy leaves the other alone: nothing is shared
        next(a.model.parameters()).add_(1)
    card = json.loads((zoo / f"{name}.json").read_text())
    assert a.card["anchoring"] == card["anchoring"] and a.classes == card["classes"]
    assert a.stride == 4 and a.input_size == (3, 32, 32) and a.name == name
    for key in ("arch", "anchoring", "classes", "input_size", "dataset", "metrics"):
        assert key in a.card


def test_zoo_weights_are_the_saved_ones(zoo):
    from equishift.checkpoint import load_weights

    loaded = load_model("zoo:tiny-vit", root=zoo)
    saved = load_weights(zoo / "tiny-vit.safetensors")
    state = loaded.model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_anchored_zoo_card_is_shift_invariant(zoo, fmnist):
    loaded = load_model("zoo:tiny-vit-anchored", root=zoo)
    x, _ = fmnist.batch(torch.arange(4))
    assert_shift_invariant(loaded.model, x, shifts=[(1, 2), (3, 3), (-7, 13), (16, 5)], atol=1e-4)


def test_anchored_prefix_builds_identity_pos_conv_and_marks_untrained(zoo):
    base = load_model("zoo:tiny-vit", root=zoo)
    for mode in ("full", "pos-only", "patch-only"):
        spec = "anchored:zoo:tiny-vit" if mode == "full" else f"anchored[{mode}]:zoo:tiny-vit"
        loaded = load_model(spec, root=zoo)
        assert loaded.card["anchoring"] == mode and loaded.card["untrained"] is True
        assert loaded.card["metrics"] == {} and loaded.card["base_metrics"] == base.card["metrics"]
        ref = anchorize(base.model, mode).eval()  # same weights, same new zero-initialised convs
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(loaded.model(x), ref(x), atol=1e-5)
        convs = [m for n, m in loaded.model.named_modules() if n.endswith("pos_conv.proj")]
        assert (len(convs) == 1) == (mode != "patch-only")
        assert all(float(c.weight.detach().abs().max()) == 0 and float(c.bias.detach().abs().max()) == 0 for c in convs)


def test_anchoring_twice_is_refused(zoo):
    with pytest.raises(ModelSpecError, match="already anchored"):
        load_model("anchored:zoo:tiny-vit-anchored", root=zoo)


def test_anchoring_an_unsupported_architecture_is_a_spec_error():
    with pytest.raises(ModelSpecError, match="anchorize supports"):
        load_model("anchored:timm:mobilenetv3_small_050?num_classes=2")
    with pytest.raises(ModelSpecError, match="cannot make VisionTransformerRelPos shift-invariant"):
        load_model("anchored:timm:vit_relpos_small_patch16_224?num_classes=2&depth=1")
    resnet = load_model("anchored:timm:resnet10t?num_classes=2", device="cpu")  # a supported CNN family
    assert resnet.card["anchors"] and all(s["anchored"] for s in resnet.card["anchors"])


def test_card_path_spec(zoo):
    loaded = load_model(str(zoo / "tiny-twins.json"))
    assert loaded.card["timm_class"] == "Twins" and loaded.name == "tiny-twins"


def test_zoo_sha_mismatch_is_reported(zoo, tmp_path):
    card = json.loads((zoo / "tiny-vit.json").read_text())
    card["weights_sha256"] = "0" * 64
    (tmp_path / "m.json").write_text(json.dumps(card))
    (tmp_path / "m.safetensors").write_bytes((zoo / "tiny-vit.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256"):
        load_model("zoo:m", root=tmp_path)


def test_zoo_card_with_other_architecture_names_the_keys(zoo, tmp_path):
    card = json.loads((zoo / "tiny-vit.json").read_text())
    card["arch_config"] = dict(card["arch_config"], embed_dim=48)
    (tmp_path / "m.json").write_text(json.dumps(card))
    (tmp_path / "m.safetensors").write_bytes((zoo / "tiny-vit.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as e:
        load_model("zoo:m", root=tmp_path)
    assert "pos_embed" in str(e.value) and "[1, 65, 32]" in str(e.value)


def test_card_may_not_name_arbitrary_classes(zoo, tmp_path):
    card = json.loads((zoo / "tiny-vit.json").read_text())
    card["timm_class"] = "create_model"
    (tmp_path / "m.json").write_text(json.dumps(card))
    (tmp_path / "m.safetensors").write_bytes(b"")
    with pytest.raises(ModelSpecError, match="field timm_class: must be one of"):
        load_model("zoo:m", root=tmp_path)


def test_timm_random_init_card_and_preprocess():
    loaded = load_model(f"timm:{SMALL_TIMM}")
    assert loaded.card["untrained"] is True and loaded.card["source"] == "timm"
    assert loaded.input_size == (3, 32, 32) and loaded.stride == 4 and len(loaded.classes) == 7
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    x = loaded.preprocess(img)
    assert x.shape == (1, 3, 32, 32) and x.device == loaded.device
    # The canvas for crops: its centre is exactly the plain preprocessing.
    canvas = loaded.preprocess(img, margin=4)
    assert canvas.shape == (1, 3, 40, 40) and torch.equal(canvas[..., 4:36, 4:36], x)
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=loaded.model)
    cfg["input_size"] = (3, 32, 32)
    assert torch.allclose(x[0].cpu(), create_transform(**cfg)(img), atol=1e-6)


def test_random_weights_come_from_the_specs_seed():
    """A random-weight spec is one network: the same in every load (and process), the anchored side has
    exactly the baseline's weights, ?seed=N picks another draw, the card records it, and loading leaves
    the caller's random state alone."""
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = load_model(f"timm:{SMALL_TIMM}"), load_model(f"timm:{SMALL_TIMM}&seed=0")
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.card["seed"] == 0
    other = load_model(f"timm:{SMALL_TIMM}&seed=1")
    assert other.card["seed"] == 1 and not torch.equal(other.model.state_dict()["head.weight"], sa["head.weight"])
    anchored = load_model(f"anchored[full]:timm:{SMALL_TIMM}").model.state_dict()
    shared = [k for k in sa if k in anchored and k != "pos_embed"]
    assert "head.weight" in shared and "blocks.0.attn.qkv.weight" in shared
    assert all(torch.equal(anchored[k], sa[k]) for k in shared)
    assert torch.equal(anchored["patch_embed.embed.proj.weight"], sa["patch_embed.proj.weight"])
    for bad in ("seed=-1", "seed=1.5", "seed=x", "seed=1&seed=2", "pretrained&seed=1"):
        with pytest.raises(ModelSpecError, match="seed"):
            parse_spec(f"timm:{SMALL_TIMM}&{bad}")


def test_fmnist_preprocess_matches_the_training_data(zoo, fmnist):
    from equishift.data import load_fashion_mnist

    loaded = load_model("zoo:tiny-vit", root=zoo)
    raw, _ = load_fashion_mnist("test")
    for i in (0, 1, 2):
        pil = Image.fromarray(raw[i].numpy()).convert("RGB")  # the dashboard passes RGB images
        x = loaded.preprocess(pil)
        assert torch.allclose(x[0], fmnist[i][0], atol=1e-6)
        # denormalize gives back the pixels, padding included (black)
        pixels = loaded.denormalize(x)[0, 0]
        assert torch.allclose(pixels[2:30, 2:30] * 255, raw[i].float(), atol=1e-3)
        assert float(pixels[:2].abs().max()) < 1e-6
        canvas = loaded.preprocess(pil, margin=4)
        assert canvas.shape[-1] == 40 and torch.equal(canvas[..., 4:36, 4:36], x)


def test_fmnist_preprocess_fits_a_non_square_upload(zoo):
    loaded = load_model("zoo:tiny-vit", root=zoo)
    img = Image.new("RGB", (90, 30), (255, 255, 255))
    x = loaded.preprocess(img)
    assert x.shape == (1, 3, 32, 32)
    pixels = loaded.denormalize(x)[0]
    assert torch.allclose(pixels[:, 2:30, 2:30], torch.ones(3, 28, 28), atol=1e-6)


def test_local_weights_file_infers_classes_and_loads(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = load_model(f"timm:vit_tiny_patch16_224?img_size=32&patch_size=4&depth=1@{tmp_path / 'w.pth'}")
    assert len(loaded.classes) == 5 and loaded.card["untrained"] is False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    import timm

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=7)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(f"timm:{SMALL_TIMM}@{tmp_path / 'w.pth'}")
    msg = str(e.value)
    assert "patch_embed.proj.weight" in msg and "[192, 3, 8, 8]" in msg and "[192, 3, 4, 4]" in msg


class _Payload:
    """Unpickling this creates a file: the marker proves whether pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("zipped", [True, False])
def test_pickled_code_is_never_executed(tmp_path, zipped):
    import timm

    marker = tmp_path / "pwned"
    state = dict(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1,
                                   num_classes=7).state_dict())
    torch.save({"state_dict": state, "extra": _Payload(marker)}, tmp_path / "evil.pth",
               _use_new_zipfile_serialization=zipped)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as e:
        load_model(f"timm:{SMALL_TIMM}@{tmp_path / 'evil.pth'}")
    assert "pickled code" in str(e.value) and "open" in str(e.value)  # pickled as io.open
    assert not marker.exists()


def test_missing_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(f"timm:{SMALL_TIMM}@{tmp_path / 'nope.safetensors'}")


def test_offline_pretrained_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelSpecError) as e:
        load_model("timm:vit_tiny_patch16_224?pretrained")
    assert time.perf_counter() - t0 < 5
    assert "HF_HUB_OFFLINE" in str(e.value) and "@PATH" in str(e.value)


def test_unreachable_hub_fails_fast(monkeypatch):
    # Not flagged offline, but the endpoint refuses connections (port 9 on localhost is closed here):
    # the probe must answer in seconds, not after the hub client's ~47 s of retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ModelSpecError, match="cannot be reached"):
        load_model("timm:deit_tiny_patch16_224?pretrained")
    assert time.perf_counter() - t0 < 5


def test_models_cli_lists_the_zoo_with_metrics(zoo, capsys):
    assert cli.main(["models", "--zoo-dir", str(zoo)]) == 0
    out = capsys.readouterr().out
    for spec in list_models(zoo):
        assert spec in out
    line = next(l for l in out.splitlines() if l.startswith("zoo:tiny-vit "))
    assert "0.2500" in line and "vit" in line
    assert cli.main(["models", "--zoo-dir", str(zoo), "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert cards["zoo:tiny-vit"]["metrics"]["clean"]["value"] == 0.25


# --- the shipped models (skipped until training has written them) --------------------------------------
SHIPPED = list_models()


@pytest.mark.skipif(not SHIPPED, reason=f"no shipped models in {zoo_dir()} yet")
@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_model_loads_fast_and_its_card_metrics_reproduce(spec, fmnist):
    from equishift.evaluation import evaluate, wilson_interval

    load_model(spec, device="cpu")  # warm-up: imports and first-call costs are not the model's
    t0 = time.perf_counter()
    loaded = load_model(spec, device="cpu")
    assert time.perf_counter() - t0 < 2.0
    card = loaded.card
    assert card["dataset"] == "fashion-mnist" and card["classes"] == list(fmnist.classes)
    wanted = [p for p in ("clean", "consistency-a", "period-orbit") if p in card["metrics"]]
    assert wanted, f"{spec}: card has no metrics"
    n = 200
    result = evaluate(loaded, fmnist, wanted, limit=n, seed=card["metrics"][wanted[0]].get("seed", 0))
    for p in wanted:
        claimed, got = card["metrics"][p], result["protocols"][p]
        if claimed["n_images"] == n:
            assert got["value"] == claimed["value"]
        else:
            # The subset's draws are those of the card's run (they depend on seed and image index only),
            # so the card's value must be plausible for this subset: inside a 99.9% Wilson interval.
            lo, hi = wilson_interval(got["count"], n, z=3.2905)
            assert lo <= claimed["value"] <= hi, (p, claimed["value"], got["value"])
    if card["anchoring"] == "full":
        assert result["protocols"].get("consistency-a", {"value": 1.0})["value"] >= 0.995
        x, _ = fmnist.batch(torch.arange(4))
        assert_shift_invariant(loaded.model, x, shifts=[(1, 3), (2, 2), (-9, 17)], atol=1e-3)


def test_anchored_weights_under_a_plain_timm_spec_get_a_hint(zoo):
    spec = ("timm:vit_tiny_patch16_224?img_size=32&patch_size=4&embed_dim=32&depth=2&num_heads=2"
            f"@{zoo / 'tiny-vit-anchored.safetensors'}")
    with pytest.raises(CheckpointError) as e:
        load_model(spec)
    assert "patch_embed.embed.proj.weight" in str(e.value) and "anchorized" in str(e.value)


class _DataDependent(torch.nn.Module):
    """A patch-4 model with 16 attention heads whose forward reads a value of its input (``.item()``),
    which the meta device cannot give: its activations cannot be measured, only bounded."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 64, 4, stride=4)
        self.attn = torch.nn.Linear(64, 64)
        self.attn.num_heads = 16

    def forward(self, x):
        scale = float(x.abs().max().item())
        return self.attn(self.patch(x).flatten(2).transpose(1, 2)) / max(scale, 1.0)


def test_a_model_the_meta_device_cannot_run_is_bounded_not_passed():
    """When the meta forward raises, the activation check falls back to an upper bound (global attention
    of the most heads over the tokens of the smallest patch) instead of passing unchecked."""
    from equishift.options import MAX_ACTIVATION_BYTES, check_model_size

    with pytest.raises(ModelSpecError, match=r"^big input: one forward pass on one image would make a "
                                             r"16\.00 GiB tensor \(an upper bound: 16 head\(s\) of attention "
                                             r"over 16,385 tokens"):
        check_model_size(_DataDependent, "big input", input_size=lambda m: (3, 512, 512))
    est = check_model_size(_DataDependent, "small input", input_size=lambda m: (3, 32, 32))
    # 8×8 patches + 1 prefix token = 65 tokens: 16 heads × 65² float32 attention scores.
    assert est.largest_activation_bytes == 4 * 16 * 65 * 65 <= MAX_ACTIVATION_BYTES
    # The real forward on that input stays below the bound.
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert _DataDependent()(x).numel() * 4 <= est.largest_activation_bytes
