"""generate.py --stats, scripts/plot_masks.py, and the fidelity metrics of --compare (tiny checkpoint, CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from scripts import plot_masks
from wan.generate.fidelity import video_fidelity
from wan.generate.stats import default_mask_steps, load_masks, pack_mask, unpack_mask

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "96", "--frames", "9", "--steps", "2"]
LAYERS, HEADS = 2, 2  # wan/models/tiny.py
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args) -> int:
    return generate.main([str(a) for a in args])


def config_file(tmp_path, text="sparsity: {mode: nabla, threshold: 0.5}\n") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def stats_run(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("stats")
    stats = work / "run.json"
    code = run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", config_file(work),
                   "--output", work / "v.mp4", "--stats", stats, *SMALL)
    assert code == 0
    return stats


def check_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 100 and image.height >= 100
        return image.size


def test_stats_json_structure(stats_run):
    report = json.loads(stats_run.read_text())
    assert report["config"]["mode"] == "nabla" and report["config"]["threshold"] == 0.5
    assert report["settings"]["steps"] == 2 and report["settings"]["height"] == 64
    assert report["timing"] == "time.perf_counter" and report["device"] == "cpu"
    records = report["records"]
    assert [(r["step"], r["layer"]) for r in records] == [(s, l) for s in range(2) for l in range(LAYERS)]
    assert report["steps"] == [0, 1] and report["layers"] == list(range(LAYERS))
    for r in records:
        assert r["calls"] == 2  # classifier-free guidance: conditional and unconditional pass
        assert len(r["density"]) == HEADS and all(0 < d <= 1 for d in r["density"])
        assert r["mask_ms"] > 0 and r["attention_ms"] > 0
    totals = report["totals"]
    assert totals["calls"] == sum(r["calls"] for r in records) == 2 * LAYERS * 2
    assert totals["mask_ms"] == pytest.approx(sum(r["mask_ms"] for r in records))
    assert totals["attention_ms"] == pytest.approx(sum(r["attention_ms"] for r in records))
    # every entry holds the same number of calls, so the total mean is the mean of the entries' means
    assert totals["mean_density"] == pytest.approx(np.mean([np.mean(r["density"]) for r in records]), rel=1e-6)
    assert 0 < totals["mean_density"] <= 1
    assert report["mask_steps"] == [0, 1] and report["masks_file"] == "run.masks.pt"
    assert report["seconds"] > 0
    assert [p.name for p in stats_run.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_stats_masks_file(stats_run):
    report = json.loads(stats_run.read_text())
    entries = load_masks(stats_run.with_suffix(".masks.pt"))
    assert [(e["step"], e["layer"]) for e in entries] == [(s, l) for s in (0, 1) for l in range(LAYERS)]
    by_key = {(r["step"], r["layer"]): r for r in report["records"]}
    for e in entries:
        assert e["bits"].dtype == torch.uint8
        mask = unpack_mask(e)
        assert mask.dtype == torch.bool and mask.shape == (HEADS, *e["shape"][1:]) and mask.shape[1] == mask.shape[2]
        assert mask.any(-1).all()  # NABLA keeps at least one key block per query block
        # the saved mask is one of the two CFG passes; the record averages both
        density = mask.float().mean(dim=(1, 2))
        assert all(0 < d <= 1 for d in density) and all(0 < d <= 1 for d in by_key[(e["step"], e["layer"])]["density"])


def test_pack_mask_matches_numpy_packbits(gen):
    mask = torch.rand(3, 13, 13, generator=gen) < 0.4
    packed = pack_mask(mask)
    assert packed.shape == (3, 13, 2)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1))
    assert torch.equal(unpack_mask({"shape": list(mask.shape), "bits": packed}), mask)


def test_default_mask_steps():
    assert default_mask_steps(0, 50) == (0, 49)
    assert default_mask_steps(12, 50) == (12, 49)
    assert default_mask_steps(0, 1) == (0,)
    assert default_mask_steps(5, 5) == ()


def test_plot_masks(stats_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert plot_masks.main([str(stats_run), "--out", str(out)]) == 0
    check_png(out / "density.png")
    check_png(out / "mask_l0_h0_s0.png")
    assert plot_masks.main([str(stats_run), "--out", str(out), "--layer", "1", "--head", "1", "--step", "1"]) == 0
    check_png(out / "mask_l1_h1_s1.png")
    capsys.readouterr()
    assert plot_masks.main([str(stats_run), "--out", str(out), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "was not saved" in err
    assert plot_masks.main([str(stats_run), "--out", str(out), "--head", "9"]) == 2


def test_all_dense_steps_give_valid_json_with_empty_lists(tiny_model, tmp_path):
    stats = tmp_path / "dense.json"
    config = config_file(tmp_path, "sparsity: {mode: nabla, threshold: 0.5, dense_steps: 5}\n")
    assert run_cli("--prompt", "a cat", "--model", tiny_model, "--config", config, "--output", tmp_path / "v.mp4",
                   "--stats", stats, *SMALL) == 0
    report = json.loads(stats.read_text())  # strict JSON: no NaN/Infinity tokens either
    assert report["records"] == [] and report["steps"] == [] and report["layers"] == [] and report["mask_steps"] == []
    assert report["totals"] == {"mean_density": None, "dense_calls": 0, "mask_ms": 0.0, "attention_ms": 0.0,
                                "calls": 0}
    assert load_masks(stats.with_suffix(".masks.pt")) == []
    out = tmp_path / "plots"
    assert plot_masks.main([str(stats), "--out", str(out)]) == 0
    check_png(out / "density.png")


STATS_BAD = {
    "not-json": (lambda t: t / "s.txt", "must end in .json"),
    "folder-missing": (lambda t: t / "nowhere" / "s.json", "does not exist"),
    "unwritable": (lambda t: Path("/proc/nabla-stats.json"), "is not writable"),
}


@pytest.mark.parametrize("name", list(STATS_BAD))
def test_bad_stats_path_fails_before_loading(tmp_path, capsys, name):
    path, message = STATS_BAD[name]
    # a model that does not exist: the stats path must be refused before any loading is tried
    code = run_cli("--prompt", "a cat", "--model", tmp_path / "no-model", "--output", tmp_path / "v.mp4",
                   "--stats", path(tmp_path), *SMALL)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stats: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_existing_stats_not_overwritten(tmp_path, capsys):
    stats = tmp_path / "s.json"
    stats.write_text("{}")
    assert run_cli("--prompt", "a cat", "--model", tmp_path / "no-model", "--output", tmp_path / "v.mp4",
                   "--stats", stats, *SMALL) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and stats.read_text() == "{}"


def test_video_fidelity(gen):
    video = torch.rand(3, 32, 48, 3, generator=gen).numpy()
    same = video_fidelity(video, video.copy())
    assert same == {"psnr": float("inf"), "ssim": pytest.approx(1.0), "mad": 0.0}
    noisy = np.clip(video + 0.05 * torch.randn(video.shape, generator=gen).numpy(), 0, 1)
    worse = video_fidelity(video, noisy)
    assert 10 < worse["psnr"] < 60 and worse["ssim"] < 0.99 and 0 < worse["mad"] < 0.1
    much_worse = video_fidelity(video, np.clip(noisy + 0.2 * torch.randn(video.shape, generator=gen).numpy(), 0, 1))
    assert much_worse["psnr"] < worse["psnr"] and much_worse["ssim"] < worse["ssim"] and much_worse["mad"] > worse["mad"]
    with pytest.raises(ValueError):
        video_fidelity(video, video[:2])


def test_compare_reports_fidelity_and_stats(tiny_model, tmp_path, capsys):
    out, stats = tmp_path / "cmp.mp4", tmp_path / "cmp.json"
    code = run_cli("--prompt", "a dog runs", "--model", tiny_model, "--config", ROOT / "configs/nabla-0.4.yaml",
                   "--output", out, "--compare", "--stats", stats, *SMALL)
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[-4].strip("|").split("|")]
    assert header == ["attention", "seconds", "speedup", "PSNR (dB)", "SSIM", "MAD", "mean mask density"]
    row = dict(zip(header, (c.strip() for c in lines[-1].strip("|").split("|"))))
    assert row["attention"] == "nabla, threshold 0.4, 64-token blocks, eager kernel"
    psnr, ssim, mad, density = (float(row[k]) for k in ("PSNR (dB)", "SSIM", "MAD", "mean mask density"))
    assert 0 < psnr < float("inf") and -1 <= ssim < 1 and 0 < mad < 1 and 0 < density < 1
    report = json.loads(stats.read_text())
    assert report["fidelity"]["psnr"] == pytest.approx(psnr, abs=0.01) and report["full_seconds"] > 0
    assert report["totals"]["mean_density"] == pytest.approx(density, abs=1e-3)
    assert report["backend"] == "eager" and report["compiled_blocks"] is False and report["dense_fallback_calls"] == 0


def test_the_readme_picture_is_made_by_its_script(tmp_path):
    """scripts/plot_nabla_demo.py writes docs/mask.png: NABLA's mask adapts (blocks outside the STA window, some of
    the window left out), STA's is the window, and the third panel is their union."""
    from scripts import plot_nabla_demo

    shown = list(plot_nabla_demo.masks(0.7, (3, 3, 3), seed=0).values())
    nabla, sta, union = shown
    assert torch.equal(union, nabla | sta) and (nabla & ~sta).any() and (sta & ~nabla).any()
    assert 0 < nabla.float().mean() < sta.float().mean() < 1
    plot_nabla_demo.main([str(tmp_path / "mask.png")])
    assert (tmp_path / "mask.png").read_bytes()[:4] == b"\x89PNG"
