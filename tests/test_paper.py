"""The paper's models (PolyViT, PolyTwins, PolySwin): the same function as the paper's description for the
same weights, its anchor sets, its checkpoint format, and invariance of every mode of every family.

The references in paper_reference.py are written from the paper's description with their own layers and
the paper's key names; checkpoints are built in the paper's training-code format (a dict with a pickled
yacs CfgNode, here a stand-in class registered as ``yacs.config.CfgNode``)."""
from __future__ import annotations

import json
import pickle
import re

import pytest
import timm
import torch
from torch import nn

from equishift import anchorize, load_model
from equishift.anchoring import anchor_options, anchor_sites
from equishift.cli import main as cli_main
from equishift.errors import CheckpointError, ModelSpecError
from equishift.paper import load_paper, paper_model, read_paper_checkpoint
from equishift.polyphase import PolyphaseAnchor
from equishift.testing import check_shift_invariant

import paper_reference as ref

TOL = {torch.float32: 1e-4, torch.float64: 1e-9}   # logits of order one


def _images(n: int, size: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _shifts(size: int, seed: int, k: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size, (k, 2), generator=g)


# --- the reference models, in the paper's key names ---------------------------------------------------
def _vit_reference(seed: int, img: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2,
                   num_classes: int = 7, timm_name: str = "vit_small_patch16_224"):
    torch.manual_seed(seed)
    base = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=img, patch_size=patch,
                             embed_dim=dim, depth=depth, num_heads=heads)
    return ref.trained_like(ref.PaperViT(base), seed).eval()


def _twins_reference(seed: int, name: str, **kw):
    torch.manual_seed(seed)
    base = timm.create_model(name, pretrained=False, **kw)
    return ref.trained_like(ref.circular_pegs(base), seed).eval()


def _swin_reference(seed: int, img=64, dim=16, depths=(2, 2), heads=(1, 2), ws=4, num_classes=5):
    torch.manual_seed(seed)
    return ref.trained_like(ref.PaperSwin(img, dim, depths, heads, ws, num_classes), seed).eval()


def _swin_config(img, dim, depths, heads, ws, num_classes):
    return {"MODEL": {"TYPE": "swin_poly", "NAME": "poly_swin_test", "NUM_CLASSES": num_classes,
                      "DROP_PATH_RATE": 0.1, "SWIN": {"PATCH_SIZE": 4, "IN_CHANS": 3, "EMBED_DIM": dim,
                                                       "DEPTHS": list(depths), "NUM_HEADS": list(heads),
                                                       "WINDOW_SIZE": ws, "MLP_RATIO": 4.0, "QKV_BIAS": True,
                                                       "QK_SCALE": None, "APE": False, "PATCH_NORM": True}},
            "DATA": {"IMG_SIZE": img, "MEAN": [0.485, 0.456, 0.406], "STD": [0.229, 0.224, 0.225]}}


def _ours(arch: str, timm_name: str, path, dtype=torch.float64, **kw):
    model, card = load_paper(arch, timm_name, path, timm_kwargs=kw)
    return model.to(dtype).eval(), card


# --- round trips: paper-format file -> import -> same logits as the reference ---------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polyvit_round_trip_equals_reference(tmp_path, dtype):
    reference = _vit_reference(seed=1)
    path = tmp_path / "ckpt_epoch_299.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(),
                              {"MODEL": {"TYPE": "polyvit", "CARD": "hf_hub:timm/vit_small_patch16_224.augreg_in1k"},
                               "DATA": {"IMG_SIZE": 32, "MEAN": [0.5] * 3, "STD": [0.5] * 3}})
    # a narrow layout of the family: timm constructor arguments, as for a checkpoint fine-tuned at 384 px
    ours, card = _ours("polyvit", "vit_small_patch16_224", path, dtype, img_size=32, patch_size=8, embed_dim=32,
                       depth=2, num_heads=2)
    x = _images(4, 32, seed=2, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference.to(dtype)(x), rtol=0, atol=TOL[dtype])
    assert card["paper"]["epoch"] == 299 and card["paper"]["max_accuracy"] == 79.5
    assert card["anchor_options"]["patch_norm"] is True
    assert isinstance(ours.patch_embed.embed.norm, nn.LayerNorm) and ours.patch_embed.embed.norm.eps == 1e-5


def test_polytwins_svt_round_trip_equals_reference(tmp_path):
    kw = dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(2, 2, 4, 2))
    reference = _twins_reference(3, "twins_svt_small", num_classes=6, **kw)
    path = tmp_path / "ckpt.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(), {"MODEL": {"TYPE": "polytwins", "CARD": "twins_svt_small"},
                                                             "DATA": {"IMG_SIZE": 224}})
    model, card = load_paper("polytwins-svt", "twins_svt_small", path, timm_kwargs=kw)
    x = _images(2, 224, seed=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x), ref.twins_forward(reference.double(), x), rtol=0, atol=1e-9)
    assert card["anchor_options"] == {"patch_anchors": "first", "tie_tol": 0.0}


def test_polytwins_pcpvt_round_trip_equals_reference(tmp_path):
    kw = dict(embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(3, 2, 2, 1), mlp_ratios=(2, 2, 2, 2))
    reference = _twins_reference(5, "twins_pcpvt_small", num_classes=6, **kw)
    path = tmp_path / "ckpt.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(), {"MODEL": {"TYPE": "polytwins", "CARD": "twins_pcpvt_small"}})
    model, _ = load_paper("polytwins-pcpvt", "twins_pcpvt_small", path, timm_kwargs=kw)
    x = _images(2, 224, seed=6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x), ref.twins_forward(reference.double(), x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_polyswin_round_trip_equals_reference(tmp_path, dtype):
    layout = dict(img=64, dim=16, depths=(2, 2), heads=(1, 2), ws=4, num_classes=5)
    reference = _swin_reference(7, **layout)
    path = tmp_path / "ckpt.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(), _swin_config(**layout))
    kw = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    model, card = load_paper("polyswin", "swin_tiny_patch4_window7_224", path, timm_kwargs=kw)
    x = _images(3, 64, seed=8, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(model.to(dtype)(x), reference.to(dtype)(x), rtol=0, atol=TOL[dtype])
    assert any("not exactly shift-invariant" in w for w in card["warnings"])


def test_import_paper_cli_writes_a_zoo_card_that_loads_and_evaluates(tmp_path, capsys):
    reference = _vit_reference(seed=9, img=224, patch=16, dim=24, depth=1, heads=2, num_classes=1000)
    path = tmp_path / "ckpt_epoch_10.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(), {"MODEL": {"TYPE": "polyvit"}}, epoch=10, max_accuracy=12.5)
    rc = cli_main(["import-paper", str(path), "--arch", "polyvit", "--timm", "vit_small_patch16_224",
                   "--out", str(tmp_path / "out"), "--name", "pvit", "--timm-kwargs",
                   "embed_dim=24,depth=1,num_heads=2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    card = json.loads((tmp_path / "out" / "pvit.json").read_text())
    assert card["source"] == "paper checkpoint" and card["paper"]["epoch"] == 10
    assert card["anchoring"] == "full" and card["anchor_options"]["patch_norm"] is True
    assert [s["module"] for s in card["anchors"] if s["anchored"]] == ["patch_embed"]
    loaded = load_model(f"zoo:{tmp_path / 'out' / 'pvit.json'}", device="cpu")
    spec = load_model(f"paper:polyvit:vit_small_patch16_224?embed_dim=24&depth=1&num_heads=2@{path}", device="cpu")
    x = _images(2, 224, seed=10)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(loaded.model(x), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(spec.model(x), want, rtol=0, atol=1e-4)
    assert loaded.card["classes"][0] == spec.card["classes"][0] == "tench"
    assert spec.card["mean"] == [0.5] * 3  # the paper evaluates (Poly)ViT with mean/std 0.5


# --- hostile and damaged checkpoints -------------------------------------------------------------------
class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _vit_file(tmp_path, **overrides):
    reference = _vit_reference(seed=11)
    state = dict(reference.state_dict())
    config = {"MODEL": {"TYPE": "polyvit"}, "DATA": {"IMG_SIZE": 32}}
    path = tmp_path / "ckpt.pth"
    if "state" in overrides:
        state = overrides["state"](state)
    if "config" in overrides:
        config = overrides["config"]
    ref.save_paper_checkpoint(path, state, config)
    return path


VIT_SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_malicious_global_is_refused_by_name_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    cfg = ref.yacs_module()({"MODEL": {"TYPE": "polyvit"}})
    torch.save({"model": _vit_reference(seed=1).state_dict(), "config": cfg, "epoch": 1,
                "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"pickled code \((posix|os|nt)\.system\)"):
        load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    assert not marker.exists()


def test_other_globals_are_refused_by_name(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "config": re.compile("x")}, path)
    with pytest.raises(CheckpointError, match=r"contains pickled code \(re\._compile\)"):
        read_paper_checkpoint(path)


def _hostile_cases(tmp_path):
    from corpus import checkpoint_cases

    return [c for c in checkpoint_cases(tmp_path / "corpus") if c.marker is not None]


@pytest.mark.parametrize("scan", ["on", "off"])
def test_hostile_corpus_through_the_paper_loader(tmp_path, monkeypatch, scan):
    """Every code payload of the weights corpus (zip and legacy formats, payloads in any pickle of the
    file), read as a paper checkpoint: refused, and nothing runs — also with the static scan switched off
    (then torch's weights-only unpickler, which the paper loader also uses, refuses)."""
    from equishift import checkpoint

    if scan == "off":
        monkeypatch.setattr(checkpoint, "_refuse_unsafe_globals", lambda found, name, stand_ins=None: None)
    cases = _hostile_cases(tmp_path)
    assert len(cases) >= 3
    for case in cases:
        with pytest.raises(CheckpointError):
            read_paper_checkpoint(case.path)
        assert not case.marker.exists(), case.kind


def _legacy_with_payload_in_first_pickle(path, marker):
    """A legacy (pre-zip) torch.save file whose first pickle (the magic number) is a payload: loaders that
    read the header pickles with plain pickle.load run it."""
    import os

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = pickle.dumps(Boom(), protocol=2)
    rest = [pickle.dumps(x, protocol=2) for x in (1001, {"protocol_version": 1001}, {"model": {}}, [])]
    path.write_bytes(buf + b"".join(rest))


@pytest.mark.parametrize("scan", ["on", "off"])
def test_payload_in_a_legacy_header_pickle_never_runs(tmp_path, monkeypatch, scan):
    from equishift import checkpoint

    if scan == "off":
        monkeypatch.setattr(checkpoint, "_refuse_unsafe_globals", lambda found, name, stand_ins=None: None)
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pth"
    _legacy_with_payload_in_first_pickle(path, marker)
    with pytest.raises(CheckpointError):
        read_paper_checkpoint(path)
    assert not marker.exists()


def test_build_opcodes_cannot_change_allowed_classes(tmp_path):
    """A pickle that BUILDs state onto an allowed class (collections.Counter) must not reach it: torch's
    weights-only unpickler only fills tensors and plain containers."""
    import collections

    before = collections.Counter.most_common
    payload = (b"\x80\x02ccollections\nCounter\n}X\x0b\x00\x00\x00most_commonc__builtin__\nset\nsb.")
    path = tmp_path / "build.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "config": {"A": 1}}, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = payload
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(CheckpointError):
        read_paper_checkpoint(path)
    assert collections.Counter.most_common is before


def test_a_payload_posing_as_cfgnode_builds_only_a_dict(tmp_path):
    """The stand-in name called with arguments (REDUCE) still gives an empty mapping, never a call."""
    import io

    path = tmp_path / "pose.pth"
    ref.save_paper_checkpoint(path, {"head.weight": torch.zeros(2, 2)}, {"MODEL": {"TYPE": "polyvit"}})
    got = read_paper_checkpoint(path)
    assert got.config == {"MODEL": {"TYPE": "polyvit"}}
    raw = io.BytesIO()
    pickle.dump({"model": {"head.weight": 1}}, raw)
    cyc = tmp_path / "cyc.pth"
    node = ref.yacs_module()({"A": 1})
    node["self"] = node
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "config": node}, cyc)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_paper_checkpoint(cyc)
    tensor_cfg = tmp_path / "tcfg.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "config": torch.zeros(3)}, tensor_cfg)
    with pytest.raises(CheckpointError, match="not a config node"):
        read_paper_checkpoint(tensor_cfg)


def test_timm_arguments_that_read_files_are_refused(tmp_path):
    path = _vit_file(tmp_path)
    for bad in ("checkpoint_path=/etc/passwd", "pretrained=True", "num_classes=3"):
        with pytest.raises(ModelSpecError, match="not allowed here|does not apply to a paper checkpoint"):
            load_model(f"paper:polyvit:vit_small_patch16_224?{bad}@{path}", device="cpu")


def test_extra_and_missing_keys_are_named(tmp_path):
    extra = _vit_file(tmp_path, state=lambda s: {**s, "blocks.9.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): blocks\.9\.attn\.qkv\.weight"):
        load_paper("polyvit", "vit_small_patch16_224", extra, timm_kwargs=VIT_SMALL)
    missing = _vit_file(tmp_path, state=lambda s: {k: v for k, v in s.items() if not k.startswith("pos_conv")})
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): pos_conv\.proj\.0\.weight, pos_conv\.proj\.0\.bias"):
        load_paper("polyvit", "vit_small_patch16_224", missing, timm_kwargs=VIT_SMALL)


def test_config_mismatch_names_both_values(tmp_path):
    path = _vit_file(tmp_path, config={"MODEL": {"TYPE": "polyvit"}, "DATA": {"IMG_SIZE": 384}})
    with pytest.raises(CheckpointError, match=r"DATA\.IMG_SIZE: the checkpoint says \[384, 384\], "
                                              r"timm:vit_small_patch16_224 has \[32, 32\]"):
        load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    path = _vit_file(tmp_path, config={"MODEL": {"TYPE": "polytwins"}})
    with pytest.raises(CheckpointError, match=r"MODEL\.TYPE is 'polytwins': a checkpoint of polytwins-pcpvt or "
                                              r"polytwins-svt, not polyvit"):
        load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    path = _vit_file(tmp_path, config={"MODEL": {"TYPE": "vit_poly_small"}})
    with pytest.raises(CheckpointError, match="first-generation model"):
        load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    path = _vit_file(tmp_path, config={"MODEL": {"TYPE": "my_polyvit_variant"}})
    _, card = load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    assert any("not one of the paper's known types" in w for w in card["warnings"])


def test_swin_config_mismatch_names_both_values(tmp_path):
    layout = dict(img=64, dim=16, depths=(2, 2), heads=(1, 2), ws=4, num_classes=5)
    path = tmp_path / "ckpt.pth"
    ref.save_paper_checkpoint(path, _swin_reference(7, **layout).state_dict(), _swin_config(**{**layout, "ws": 8}))
    kw = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    with pytest.raises(CheckpointError, match=r"MODEL\.SWIN\.WINDOW_SIZE: the checkpoint says 8, .* has 4"):
        load_paper("polyswin", "swin_tiny_patch4_window7_224", path, timm_kwargs=kw)
    config = _swin_config(**layout)
    config["MODEL"]["SWIN"]["APE"] = True
    config["MODEL"]["NUM_CLASSES"] = 1000
    ref.save_paper_checkpoint(path, _swin_reference(7, **layout).state_dict(), config)
    with pytest.raises(CheckpointError, match=r"MODEL\.SWIN\.APE: the checkpoint says True, .* has False; "
                                              r"MODEL\.NUM_CLASSES: the checkpoint says 1000, .* has 5"):
        load_paper("polyswin", "swin_tiny_patch4_window7_224", path, timm_kwargs=kw)


def test_bare_state_dict_and_ddp_prefix_load(tmp_path):
    reference = _vit_reference(seed=12)
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    model, card = load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    x = _images(2, 32, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)
    assert card["paper"]["epoch"] is None and card["paper"]["config_checked"] == []


def test_wrong_family_and_unknown_names_are_spec_errors(tmp_path):
    path = _vit_file(tmp_path)
    with pytest.raises(ModelSpecError, match="polyswin needs a timm SwinTransformer"):
        load_paper("polyswin", "vit_small_patch16_224", path)
    with pytest.raises(ModelSpecError, match="like twins_svt_small"):
        load_paper("polytwins-svt", "twins_pcpvt_small", path)
    with pytest.raises(ModelSpecError, match="unknown paper architecture 'polydeit'"):
        load_model(f"paper:polydeit:vit_small_patch16_224@{path}")
    with pytest.raises(ModelSpecError, match="write paper:ARCH:TIMM_NAME@PATH"):
        load_model("paper:polyvit:vit_small_patch16_224")
    assert cli_main(["import-paper", str(path), "--arch", "polyvit", "--timm", "vit_small_patch16_224",
                     "--out", str(tmp_path / "o")]) == 1  # default layout: the file's shapes do not fit


# --- anchor sets -----------------------------------------------------------------------------------------
RELEASED_TWINS = ["twins_pcpvt_small", "twins_pcpvt_base", "twins_pcpvt_large", "twins_svt_small", "twins_svt_base",
                  "twins_svt_large"]


def _paper_twins_anchors(model) -> dict:
    """The paper's set from its description: the first patch embedding (s = patch size) and, per block,
    LSA -> window size, GSA with sr > 1 -> sr; nothing else."""
    from timm.models.twins import LocallyGroupedAttn

    out = {"patch_embeds.0": int(model.patch_embeds[0].patch_size[0])}
    for k, stage in enumerate(model.blocks):
        for j, blk in enumerate(stage):
            if isinstance(blk.attn, LocallyGroupedAttn):
                out[f"blocks.{k}.{j}"] = int(blk.attn.ws)
            elif blk.attn.sr_ratio > 1:
                out[f"blocks.{k}.{j}"] = int(blk.attn.sr_ratio)
    return out


@pytest.mark.parametrize("name", RELEASED_TWINS)
def test_twins_anchor_set_equals_the_papers_on_released_layouts(name):
    # Narrow widths, the released depths, windows and sr ratios: the anchor set depends only on those.
    base = timm.create_model(name, pretrained=False, num_classes=4, embed_dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1))
    want = _paper_twins_anchors(base)
    for option in ("auto", "first"):
        model = anchorize(base, patch_anchors=option)
        got = {n.rsplit(".anchor", 1)[0]: m.stride for n, m in model.named_modules() if isinstance(m, PolyphaseAnchor)}
        assert got == want, option
        sites = {s["module"]: s for s in anchor_sites(model)}
        assert all(not sites[f"patch_embeds.{k}"]["anchored"] for k in (1, 2, 3))
        if option == "auto":
            assert "hands over shifts in multiples of" in sites["patch_embeds.1"]["why"]
    forced = anchorize(base, patch_anchors="all")
    assert {f"patch_embeds.{k}.anchor" for k in range(4)} <= {n for n, m in forced.named_modules()
                                                             if isinstance(m, PolyphaseAnchor)}


def test_twins_where_the_papers_set_is_not_enough(make_twins):
    """svt-odd: stage 0 ends on a window of 3, so shifts reach the stride-2 embedding in multiples of 3:
    "auto" anchors it and is invariant, the paper's set ("first") is not, "all" is."""
    base = make_twins("svt-odd", seed=3)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    shifts = torch.tensor([[1, 0], [0, 5], [7, 13], [12, 12], [4, 28]])
    errors = {}
    for option in ("auto", "first", "all"):
        model = anchorize(base, patch_anchors=option).eval()
        errors[option] = check_shift_invariant(model, x, shifts).max_error
        site = next(s for s in anchor_sites(model) if s["module"] == "patch_embeds.1")
        assert site["anchored"] == (option != "first")
        if option == "first":
            assert "NOT invariant here" in site["why"]
        else:
            assert "AnchoredPatchEmbed" in repr(model.patch_embeds[1]) and "why=" in repr(model.patch_embeds[1])
    assert errors["auto"] <= 1e-4 and errors["all"] <= 1e-4
    assert errors["first"] > 1e-3, errors


def test_bad_options_are_refused(make_twins, make_vit):
    with pytest.raises(ValueError, match="patch_anchors must be one of auto, first, all"):
        anchorize(make_twins(), patch_anchors="some")
    with pytest.raises(TypeError, match="unknown anchorize option\\(s\\) patch_anchors; options for vit: pos_init, patch_norm"):
        anchorize(make_vit(), patch_anchors="all")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=8, depths=(1, 1),
                             num_heads=(1, 1), img_size=56, window_size=7)
    with pytest.raises(ValueError, match="'pos-only' does not exist for this family.*no absolute position"):
        anchorize(swin, "pos-only")


# --- invariance: Swin (released layouts), ViT with the paper's patch norm ---------------------------------
RELEASED_SWIN = {"swin_tiny_patch4_window7_224": (2, 2, 6, 2), "swin_small_patch4_window7_224": (2, 2, 18, 2),
                 "swin_base_patch4_window7_224": (2, 2, 18, 2)}


def _narrow_swin(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, embed_dim=8, num_heads=(1, 1, 2, 2))
    with torch.no_grad():
        model.head.fc.weight.mul_(20)  # logits of order one, so that a broken invariance shows above TOL
    return ref.trained_like(model, seed).eval()


@pytest.mark.parametrize("name", list(RELEASED_SWIN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swin_full_is_invariant_on_released_layouts(name, dtype):
    base = _narrow_swin(name, seed=14).to(dtype)
    assert [len(s.blocks) for s in base.layers] == list(RELEASED_SWIN[name])
    x = _images(2, 224, seed=15, dtype=dtype)
    shifts = torch.tensor([[3, 5], [101, 17], [0, 111], [7, 7], [200, 1]])
    for merge in ("timm", "paper"):
        model = anchorize(base, merge=merge).eval()
        report = check_shift_invariant(model, x, shifts, atol=TOL[dtype])
        assert report.max_error <= TOL[dtype], (merge, str(report))
    assert check_shift_invariant(base, x, shifts[:2]).max_error > 1e-3  # the baseline is not


def test_swin_modes_and_the_released_polyswin(dtype=torch.float64):
    base = _narrow_swin("swin_tiny_patch4_window7_224", seed=16).to(dtype)
    x = _images(2, 224, seed=17, dtype=dtype)
    shifts = torch.tensor([[3, 5], [101, 17], [0, 111]])
    patch_only = anchorize(base, "patch-only").eval()
    assert check_shift_invariant(patch_only, x, shifts).max_error > 1e-3
    kinds = {type(m).__name__ for m in patch_only.layers[0].blocks}
    assert kinds == {"SwinTransformerBlock"} and any(b.shift_size != (0, 0) for b in patch_only.layers[0].blocks)
    paper_block = anchorize(base, block="paper").eval()   # the paper's block, windows not shifted: exact
    assert check_shift_invariant(paper_block, x, shifts).max_error <= 1e-9
    released = anchorize(base, block="paper", shifted_windows=True, merge="paper").eval()
    # As released, the shifted-window mask stays at fixed positions: close, not exact (measured 1e-4..1e-3).
    assert check_shift_invariant(released, x, shifts).max_error > 1e-7
    assert any("mask kept" in s["why"] for s in anchor_sites(released))


@pytest.mark.parametrize("mode", ["full", "pos-only", "patch-only"])
def test_vit_patch_norm_option(make_vit, mode):
    base = make_vit(patch=8, img=32, seed=18)
    model = anchorize(base, mode, patch_norm=True, pos_init="default").eval()
    assert model.patch_embed.embed.norm.eps == 1e-5 and anchor_options(model)["patch_norm"] is True
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(18))
    err = check_shift_invariant(model, x, torch.tensor([[1, 3], [5, 30], [17, 9]])).max_error
    assert (err <= 1e-4) == (mode == "full"), err


def test_paper_model_builds_each_architecture():
    for arch, name, kw in [("polyvit", "vit_small_patch16_224", dict(embed_dim=8, depth=1, num_heads=1)),
                           ("polytwins-svt", "twins_svt_small", dict(embed_dims=(8,) * 4, num_heads=(1,) * 4)),
                           ("polyswin", "swin_tiny_patch4_window7_224", dict(embed_dim=8, num_heads=(1,) * 4))]:
        model = paper_model(arch, name, num_classes=3, **kw)
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


@pytest.mark.parametrize("name", RELEASED_TWINS)
def test_twins_full_is_invariant_on_released_layouts(name):
    torch.manual_seed(19)
    base = timm.create_model(name, pretrained=False, num_classes=10, embed_dims=(8, 8, 16, 16), num_heads=(1, 1, 1, 1))
    with torch.no_grad():
        base.head.weight.mul_(20)
    base = ref.trained_like(base, 19).double().eval()
    x = _images(2, 224, seed=19, dtype=torch.float64)
    shifts = torch.tensor([[3, 5], [101, 17], [0, 111]])
    model = anchorize(base).eval()
    assert check_shift_invariant(model, x, shifts, atol=1e-9).max_error <= 1e-9
    assert check_shift_invariant(base, x, shifts[:1]).max_error > 1e-3


def test_restricted_unpickler_refuses_on_its_own(tmp_path, monkeypatch):
    """With the static scan switched off, the unpickler used for paper files (torch's weights-only one,
    with the CfgNode stand-in allowed) still refuses any other global, by name, before calling it."""
    from equishift import checkpoint

    monkeypatch.setattr(checkpoint, "_refuse_unsafe_globals", lambda found, name, stand_ins=None: None)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "config": ref.yacs_module()({"A": 1}),
                "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"pickled code \((posix|os|nt)\.system"):
        read_paper_checkpoint(path)
    assert not marker.exists()
    ok = tmp_path / "ok.pth"
    ref.save_paper_checkpoint(ok, {"head.weight": torch.zeros(2, 2)}, {"MODEL": {"TYPE": "polyvit"}})
    got = read_paper_checkpoint(ok)
    assert got.config == {"MODEL": {"TYPE": "polyvit"}} and type(got.config["MODEL"]) is dict


def test_paper_models_use_the_papers_plain_argmax_on_near_ties(tmp_path):
    """Two phases 1e-5 apart (relative): the paper takes the larger; equishift's default near-tie rule
    (within 1e-4: largest sum x^4) may take the other. Models loaded from the paper's checkpoints use the
    paper's rule (tie_tol 0, recorded in the card), so they keep its logits."""
    from equishift.polyphase import record_anchors

    reference = _vit_reference(seed=21)
    path = tmp_path / "ckpt.pth"
    ref.save_paper_checkpoint(path, reference.state_dict(), {"MODEL": {"TYPE": "polyvit"}})
    ours, card = load_paper("polyvit", "vit_small_patch16_224", path, timm_kwargs=VIT_SMALL)
    assert card["anchor_options"]["tie_tol"] == 0.0
    default_rule = anchorize(_plain_vit(), "full", patch_norm=True).eval()   # the same weights, default rule
    default_rule.load_state_dict(ours.state_dict())
    for seed in range(50):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        comp = x.reshape(1, 3, 4, 8, 4, 8)
        norms = comp.pow(2).sum(dim=(1, 2, 4)).flatten()
        best, other = int(norms.argmax()), int(norms.argsort()[-2])
        (a, b), (c, d) = divmod(best, 8), divmod(other, 8)
        x[:, :, c::8, d::8] *= float((norms[best] * (1 - 1e-5) / norms[other]).sqrt())
        quartic = lambda r, q: float(x[:, :, r::8, q::8].pow(4).sum())  # noqa: E731
        if quartic(c, d) > quartic(a, b):  # the second key prefers the other phase
            break
    else:
        pytest.fail("no near-tie with the second key reversed in 50 seeds")
    with torch.no_grad():
        with record_anchors(ours) as got:
            out = ours(x)
        with record_anchors(default_rule) as alt:
            default_rule(x)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-4)
    assert got["patch_embed.anchor"].tolist() == [[a, b]]
    assert alt["patch_embed.anchor"].tolist() == [[c, d]]  # the test exercises a real near-tie


def _plain_vit():
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=7, **VIT_SMALL)


# Key names and shapes of the paper's modules (as its model files define them), for layouts built here:
# the mapping must produce exactly these, independently of the reference models above.
PAPER_KEYS = {
    ("polyvit", "vit_small_patch16_224", (("embed_dim", 24), ("depth", 1), ("num_heads", 2))): {
        "cls_token": (1, 1, 24), "patch_embed.proj.weight": (24, 3, 16, 16), "patch_embed.norm.weight": (24,),
        "pos_conv.proj.0.weight": (24, 1, 3, 3), "pos_conv.proj.0.bias": (24,), "blocks.0.attn.qkv.weight": (72, 24),
        "norm.weight": (24,), "head.weight": (1000, 24)},
    ("polytwins-svt", "twins_svt_small", (("embed_dims", (8, 16, 16, 32)), ("num_heads", (1, 1, 1, 1)))): {
        "patch_embeds.0.proj.weight": (8, 3, 4, 4), "patch_embeds.1.norm.weight": (16,),
        "blocks.0.0.attn.qkv.weight": (24, 8), "blocks.0.1.attn.sr.weight": (8, 8, 8, 8),
        "pos_block.0.proj.0.weight": (8, 1, 3, 3), "norm.weight": (32,), "head.weight": (1000, 32)},
    ("polyswin", "swin_tiny_patch4_window7_224", (("embed_dim", 8), ("num_heads", (1, 1, 1, 1)))): {
        "patch_embed.proj.weight": (8, 3, 4, 4), "patch_embed.norm.weight": (8,),
        "layers.0.blocks.1.attn.relative_position_bias_table": (169, 1), "layers.0.blocks.0.norm1.weight": (8,),
        "layers.0.downsample.proj.weight": (16, 8, 2, 2), "layers.2.downsample.norm.weight": (64,),
        "layers.3.blocks.1.mlp.fc2.weight": (64, 256), "norm.weight": (64,), "head.weight": (1000, 64)},
}


@pytest.mark.parametrize("arch, name, kw", list(PAPER_KEYS))
def test_key_map_produces_the_papers_names_and_shapes(arch, name, kw):
    from equishift.paper import key_map

    model = paper_model(arch, name, **dict(kw))
    mapping = key_map(arch, model)
    state = model.state_dict()
    for key, shape in PAPER_KEYS[arch, name, kw].items():
        assert key in mapping, key
        assert tuple(state[mapping[key]].shape) == shape, key
    assert not any(k.startswith("layers.3.downsample") for k in mapping)  # the last stage merges nothing
    assert all(".embed." not in k and ".block." not in k for k in mapping)


def test_polyswin_set_input_size_keeps_the_recipe():
    model = paper_model("polyswin", "swin_tiny_patch4_window7_224", num_classes=3, embed_dim=8, num_heads=(1,) * 4)
    model.set_input_size((448, 448))  # timm's resize reaches the wrapped blocks: windows of 14
    assert model(torch.randn(1, 3, 448, 448)).shape == (1, 3)
    assert {b.anchor.stride for stage in model.layers for b in stage.blocks} == {14}
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, embed_dim=8,
                             num_heads=(1,) * 4)
    exact = anchorize(swin).eval()
    exact.set_input_size((448, 448))
    assert all(b.shift_size == (0, 0) for stage in exact.layers for b in stage.blocks)
    x = _images(1, 448, seed=23)
    assert check_shift_invariant(exact, x, torch.tensor([[5, 9], [250, 3]])).max_error <= 1e-4
    exact.set_input_size((112, 112))  # windows of 3 on a 28-token grid: cannot be anchored, and says so
    with pytest.raises(ValueError, match="H=28, W=28, stride=3"):
        exact(torch.randn(1, 3, 112, 112))


def test_evaluate_runs_on_a_paper_checkpoint(tmp_path):
    """`python -m equishift evaluate` on an imported paper model and on its paper: spec, unchanged: an
    image folder with classes 0..1; the anchored model is invariant, so consistency is 1 on circular shifts."""
    import numpy as np
    from PIL import Image

    torch.manual_seed(24)
    base = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=2, **VIT_SMALL)
    reference = ref.trained_like(ref.PaperViT(base), 24).eval()
    ckpt = tmp_path / "ckpt.pth"
    ref.save_paper_checkpoint(ckpt, reference.state_dict(), {"MODEL": {"TYPE": "polyvit"}, "DATA": {"IMG_SIZE": 32}})
    rng = np.random.default_rng(24)
    for label in ("0", "1"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    kw = ",".join(f"{k}={v}" for k, v in VIT_SMALL.items())
    assert cli_main(["import-paper", str(ckpt), "--arch", "polyvit", "--timm", "vit_small_patch16_224",
                     "--out", str(tmp_path / "m"), "--name", "pv", "--timm-kwargs", kw]) == 0
    spec_kw = "&".join(f"{k}={v}" for k, v in VIT_SMALL.items())
    for model in (f"zoo:{tmp_path / 'm' / 'pv.json'}", f"paper:polyvit:vit_small_patch16_224?{spec_kw}@{ckpt}"):
        out = tmp_path / "eval.json"
        rc = cli_main(["evaluate", "--model", model, "--dataset", str(tmp_path / "data"), "--protocol", "clean",
                       "--protocol", "consistency-a", "--json", str(out), "--device", "cpu", "--no-progress"])
        assert rc == 0
        protocols = json.loads(out.read_text())["protocols"]
        assert protocols["clean"]["n_images"] == 6
        assert protocols["consistency-a"]["value"] == 1.0
