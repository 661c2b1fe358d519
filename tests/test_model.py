"""The delineation model: shapes, learning, weights with their card, the bundled weights, devices,
and `rtnode contour` with them. The phantoms are in test_phantom.py, cross-validation in
test_cross_validation.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from node.config import BUNDLED_WEIGHTS, parse_config
from node.imaging.metrics import dice
from node.imaging.nifti import read_mask
from node.imaging.volume import load_series_dir
from node.pipeline.inference import DeviceError, Segmenter, resolve_device
from node.pipeline.loading import load_models
from node.pipeline.model import Architecture, ResSEUNet3D, recurrent_loss
from node.pipeline.preprocess import Preprocessing, sliding_window, window_starts
from node.pipeline.weights import ModelCard, WeightsError, card_path, load_weights, save_weights
from node.rtstruct.reader import read_masks
from node.service import worker_device_name
from node.synth.ct_series import ct_datasets, write_cylinder_ct, write_series
from node.synth.phantom import make_phantom
from node.training.evaluate import evaluate_on_phantoms
from tests.conftest import require_tool, rtnode, shared_data

TINY = Architecture(channels=(4, 8, 8, 12, 16), passes=2)
BUNDLED = BUNDLED_WEIGHTS
HELD_OUT_DICE = 0.85  # what the bundled weights must reach on phantoms they were not trained on (README)


def test_every_pass_gives_logits_of_the_input_shape():
    model = ResSEUNet3D(TINY).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 1, 16, 32, 48))
    assert len(outputs) == 2
    assert all(o.shape == (2, 1, 16, 32, 48) for o in outputs)
    with torch.no_grad():
        odd = model(torch.rand(1, 1, 9, 30, 35))  # padded inside to multiples of 16, cropped back
    assert odd[-1].shape == (1, 1, 9, 30, 35)


def test_thesis_defaults():
    architecture, prep = Architecture(), Preprocessing()
    assert architecture.channels == (16, 32, 64, 96, 128) and architecture.passes == 2
    assert Preprocessing(mode="resize").model_grid_shape((123, 512, 512), (2.5, 0.9, 0.9)) == (72, 256, 256)
    assert prep.model_grid_shape((100, 512, 512), (2.5, 0.75, 0.75)) == (100, 256, 256)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ResSEUNet3D(TINY).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    image = torch.rand(2, 1, 16, 32, 32)
    target = (image > 0.6).float()
    losses = []
    for _ in range(15):
        loss = recurrent_loss(model(image), target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_sliding_window_covers_volumes_of_any_size():
    assert window_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]
    image = torch.rand(40, 70, 20)
    seen = sliding_window(lambda ct, prev: ct + prev, image, torch.zeros_like(image), (16, 32, 32), 0.5)
    torch.testing.assert_close(seen, image)


def test_weights_and_card_round_trip(tmp_path):
    model = ResSEUNet3D(TINY).eval()
    card = ModelCard("ctv-test", "9.9", TINY, Preprocessing(spacing=(4, 4, 4), shape=(16, 32, 32)), training={"seed": 7})
    saved = save_weights(model, card, tmp_path / "w.safetensors")
    loaded, loaded_card = load_weights(tmp_path / "w.safetensors")
    assert loaded_card == saved and saved.sha256
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[-1], model(x)[-1])
    assert json.loads(card_path(tmp_path / "w.safetensors").read_text())["training"] == {"seed": 7}


def test_weights_not_matching_their_card_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(ResSEUNet3D(TINY), ModelCard("t", "1", TINY, Preprocessing()), path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="do not match their model card: sha256"):
        load_weights(path)

    saved = save_weights(ResSEUNet3D(TINY), ModelCard("t", "1", TINY, Preprocessing()), path)
    card = saved.to_json()
    card["architecture"]["channels"] = [8, 8, 8, 12, 16]
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not fit the architecture"):
        load_weights(path)

    card_path(path).unlink()
    with pytest.raises(WeightsError, match="no model card"):
        load_weights(path)


def test_bundled_weights_on_unseen_phantoms():
    segmenter = Segmenter.from_weights(BUNDLED, "cpu")
    assert "Not for clinical use" in segmenter.card.intended_use
    trained_on = segmenter.card.training["data"]
    assert "seeds 0-" in trained_on
    summary = evaluate_on_phantoms(segmenter, [30001, 30002, 30003, 30004])
    assert summary.mean_dice >= 0.85, summary.to_json()



def contour(ct: Path, out: Path) -> subprocess.CompletedProcess:
    return rtnode("contour", ct, "--out", out / "rs.dcm", "--mask-out", out / "m.nii.gz", "--device", "cpu")


def assert_valid_dicom(path: Path) -> None:
    validation = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    assert not [line for line in validation.stderr.splitlines() if line.startswith("Error")], validation.stderr


def test_contour_finds_the_ctv_of_an_unseen_phantom(tmp_path):
    """A phantom has a CTV: `rtnode contour` must find it and write it as a valid RT Structure Set."""
    phantom = make_phantom(30005)  # unseen: the bundled weights were trained on seeds 0-39
    write_series(ct_datasets(phantom.hu, phantom.geometry, phantom.patient), tmp_path / "ct")
    result = contour(tmp_path / "ct", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'rs.dcm'}: CTV "), result.stdout
    volume = load_series_dir(tmp_path / "ct")
    mask = read_mask(tmp_path / "m.nii.gz", volume)
    assert dice(mask, phantom.ctv) >= HELD_OUT_DICE
    (roi,) = read_masks(dcmread(tmp_path / "rs.dcm"), volume)
    assert roi.name == "CTV"
    np.testing.assert_array_equal(roi.mask, mask)
    assert_valid_dicom(tmp_path / "rs.dcm")


def test_contour_says_no_ctv_found_when_there_is_none(tmp_path):
    """A water cylinder holds no pelvis: exit status 3, one line saying so, nothing written."""
    ct = tmp_path / "ct"
    write_cylinder_ct(ct, slices=40, rows=128, columns=128)
    (tmp_path / "out").mkdir()
    result = contour(ct, tmp_path / "out")
    assert result.returncode == 3, result.stdout + result.stderr
    said = rf"rtnode: no CTV found in {re.escape(str(ct))} by ctv-unet3d 0\.1\.0: nothing written \(preprocess .*\)\n"
    assert re.fullmatch(said, result.stderr), result.stderr
    assert result.stdout == "" and not any((tmp_path / "out").iterdir())


# What the bundled weights contour on the RANDO CT: 77.0 cm3 in fp32 (measured on AVX2 and AVX-512 CPUs), 78.8 cm3 in
# bf16, which model.precision = "auto" (as rtnode contour runs) takes on a CPU with native bf16.
RANDO_FALSE_POSITIVE_CM3 = 78.8 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 77.0


def test_contour_real_rando_ct_writes_a_valid_rtstruct(tmp_path):
    """The real RANDO CT, a uniform-tissue phantom without a uterus. The weights bundled since
    commit 7dd5abb contour 77 cm3 there (a false positive); the weights before them found no CTV.
    This pins today's behaviour: that CTV, to within 2 %, written as a valid RT Structure Set. Other
    weights that change it fail here: then measure again, and say so in README."""
    ct = shared_data("rando-pelvis-phantom/CT")
    result = contour(ct, tmp_path)
    assert result.returncode == 0, result.stderr
    said = re.match(rf"wrote {re.escape(str(tmp_path / 'rs.dcm'))}: CTV (\d+\.\d) cm3 by ctv-unet3d 0\.1\.0 ", result.stdout)
    assert said, result.stdout
    assert float(said[1]) == pytest.approx(RANDO_FALSE_POSITIVE_CM3, rel=0.02)
    volume = load_series_dir(ct)
    (roi,) = read_masks(dcmread(tmp_path / "rs.dcm"), volume)
    np.testing.assert_array_equal(roi.mask, read_mask(tmp_path / "m.nii.gz", volume))
    voxel_cm3 = float(np.prod(volume.spacing)) / 1000
    assert roi.mask.sum() * voxel_cm3 == pytest.approx(RANDO_FALSE_POSITIVE_CM3, rel=0.05)  # the contours, not only the log
    assert_valid_dicom(tmp_path / "rs.dcm")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_mask_matches_cpu_mask():
    from node.imaging.volume import load_volume

    phantom = make_phantom(30001)
    volume = load_volume(ct_datasets(phantom.hu, phantom.geometry, phantom.patient))
    cpu = Segmenter.from_weights(BUNDLED, "cpu").predict(volume).mask
    gpu = Segmenter.from_weights(BUNDLED, "cuda").predict(volume).mask
    assert dice(cpu, phantom.ctv) >= HELD_OUT_DICE  # two empty masks would agree perfectly
    assert dice(cpu, gpu) >= 0.99


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{name}' was asked for but torch sees no CUDA GPU"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")
    # A worker names the device it runs on (job log, /healthz, /metrics), not `auto`; one that is not there
    # keeps the name asked for, and loading the model says why it cannot be used.
    assert worker_device_name("auto") == "cpu" and worker_device_name("cuda:1") == "cuda:1"


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda:", "cpu:0"])
def test_an_unknown_device_is_a_clear_error(name):
    with pytest.raises(DeviceError, match=f"unknown device '{name}': use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU runs bfloat16 natively")
def test_bf16_on_a_cpu_without_it_is_a_clear_error():
    model, card = load_weights(BUNDLED, torch.device("cpu"))
    with pytest.raises(DeviceError, match="bf16 inference needs a CPU with native bf16"):
        Segmenter(model, card, torch.device("cpu"), "bf16")
    assert Segmenter(model, card, torch.device("cpu")).precision == "fp32"


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bfloat16")
def test_bf16_mask_matches_fp32_mask_on_a_cpu_that_has_it():
    from node.imaging.volume import load_volume

    phantom = make_phantom(30001)
    volume = load_volume(ct_datasets(phantom.hu, phantom.geometry, phantom.patient))
    fp32 = Segmenter.from_weights(BUNDLED, "cpu", "fp32").predict(volume).mask
    # model.precision reaches the built-in network through the worker's loading; auto is bf16 on this CPU
    (loaded,) = load_models(parse_config("[model]\nprecision = 'auto'\n"), "cpu")
    assert loaded.predictor.segmenter.precision == "bf16"
    (forced,) = load_models(parse_config("[model]\nprecision = 'fp32'\n"), "cpu")
    assert forced.predictor.segmenter.precision == "fp32"
    bf16 = loaded.predict(volume).labels.astype(bool)
    assert dice(fp32, phantom.ctv) >= HELD_OUT_DICE  # two empty masks would agree perfectly
    assert dice(fp32, bf16) >= 0.99


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
        ),
    ],
)
def test_training_runs_on_the_device_asked_for(device):
    from node.training.config import TrainConfig
    from node.training.train import TrainingCase, train

    image = np.random.default_rng(0).random((24, 48, 48), dtype=np.float32)
    cases = [TrainingCase("a", image, image > 0.6), TrainingCase("b", image[::-1].copy(), image[::-1] > 0.6)]
    config = TrainConfig(
        steps=3, batch_size=2, learning_rate=1e-3, architecture=TINY, preprocessing=Preprocessing(shape=(16, 32, 32)),
        quality_bound=1.0, accumulate=2, device=device,
    )
    run = train(cases, config, show_progress=False)
    assert next(run.model.parameters()).device.type == device
    assert len(run.history) == 3 and all(np.isfinite(loss) for _, loss in run.history)
    assert [sample.step for sample in run.samples] == [1] * 4 + [2] * 4 + [3] * 4  # 2 micro-batches of 2 a step
    assert all(sample.loss > 0 and sample.weight > 0 for sample in run.samples)
    assert sorted(run.label_weights) == ["a", "b"] and np.isclose(sum(run.label_weights.values()), 2.0)


def test_training_resumed_from_a_checkpoint_continues_where_it_stopped(tmp_path):
    from node.training.config import TrainConfig
    from node.training.train import TrainingCase, train

    image = np.random.default_rng(1).random((24, 48, 48), dtype=np.float32)
    cases = [TrainingCase("a", image, image > 0.6)]

    def config(steps: int, **options) -> TrainConfig:
        return TrainConfig(
            steps=steps, batch_size=2, learning_rate=1e-3, checkpoint_every=2, architecture=TINY,
            preprocessing=Preprocessing(shape=(16, 32, 32)), device="cpu", **options,
        )

    straight = train(cases, config(4, seed=5), show_progress=False)
    checkpoint = tmp_path / "ckpt.pt"
    train(cases, config(2, seed=5), checkpoint=checkpoint, show_progress=False)
    assert checkpoint.is_file()
    # seed 0 here: only what the checkpoint restores (weights, optimizer, random states) can match seed 5's run
    resumed = train(cases, config(4), checkpoint=checkpoint, resume=True, show_progress=False)
    assert [step for step, _ in resumed.history] == [1, 2, 3, 4]
    assert train(cases, config(1), show_progress=False).history[0][1] != pytest.approx(straight.history[0][1], rel=1e-3)
    np.testing.assert_allclose([loss for _, loss in resumed.history], [loss for _, loss in straight.history], rtol=1e-4)
    with pytest.raises(ValueError, match="without Pick-and-Learn; resume it the same way"):
        train(cases, config(4, quality_bound=1.0), checkpoint=checkpoint, resume=True, show_progress=False)
