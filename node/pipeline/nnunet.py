"""nnU-Net v2 models a clinic brings: a trained model folder or an exported model zip, run in-process with
nnU-Net's own predictor, so the node's label map is the one nnU-Net itself predicts.

nnunetv2 is an optional extra, imported only inside functions: importing this module loads neither it nor
torch. A checkpoint is a pickle, so loading one runs code: the model's files are checked against the
configured digest before anything is unpickled.

Axes: nnU-Net reads an image with the reader its plans name. SimpleITKIO and NibabelIO keep the file's
voxel order, which for a CT series is the Volume's own (slice, row, column), with the spacing in that
order; their `WithReorient` variants turn the image to RAS first, (S, A, R) as nnU-Net's array axes.
TotalSegmentator turns every CT to RAS itself before it calls nnU-Net with its weights, whose plans name
SimpleITKIO: such a model must be loaded with `reorient_to_ras`, or its left and right organs swap.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from node.imaging.volume import Volume
from node.pipeline.model_files import ModelFileError, verify_digest
from node.pipeline.structures import LabelMap

if TYPE_CHECKING:
    import torch

AS_STORED_READERS = frozenset({"SimpleITKIO", "NibabelIO"})
RAS_READERS = frozenset({"SimpleITKIOWithReorient", "NibabelIOWithReorient"})
# nnU-Net's array axes after a RAS reader, as patient (LPS) components and the sign each increases towards.
RAS_AXES = ((2, 1.0), (1, -1.0), (0, -1.0))  # superior (+z), anterior (-y), right (-x)

Fold = int | str  # a fold number, or "all" (nnU-Net's model trained on every case)


class NnUNetModelError(ModelFileError):
    """An nnU-Net model that cannot be run as configured."""


@dataclass(frozen=True)
class ArrayLayout:
    """How the Volume's (slice, row, column) array becomes nnU-Net's: `axes[i]` is the Volume axis that
    nnU-Net's axis i is, reversed where `flips[i]`."""

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def ras(cls, volume: Volume) -> ArrayLayout:
        """RAS as nibabel's `io_orientation` finds it (SimpleITK's DICOMOrient agrees on any series a scanner
        writes): each Volume axis, strongest first, takes the patient axis it runs closest to."""
        directions = np.abs(np.stack([volume.normal, volume.column_direction, volume.row_direction]))
        patient_axis: dict[int, int] = {}
        for axis in np.argsort(-directions.max(axis=1), kind="stable"):
            free = [c for c in range(3) if c not in patient_axis.values()]
            patient_axis[int(axis)] = max(free, key=lambda c: directions[axis, c])
        signed = np.stack([volume.normal, volume.column_direction, volume.row_direction])
        axes = tuple(next(a for a, c in patient_axis.items() if c == component) for component, _ in RAS_AXES)
        flips = tuple(bool(np.sign(signed[a, c]) != sign) for a, (c, sign) in zip(axes, RAS_AXES, strict=True))
        return cls(axes, flips)

    def to_nnunet(self, array: np.ndarray) -> np.ndarray:
        flipped = [i for i, flip in enumerate(self.flips) if flip]
        return np.flip(array.transpose(self.axes), flipped) if flipped else array.transpose(self.axes)

    def from_nnunet(self, array: np.ndarray) -> np.ndarray:
        flipped = [i for i, flip in enumerate(self.flips) if flip]
        return np.ascontiguousarray((np.flip(array, flipped) if flipped else array).transpose(np.argsort(self.axes)))

    def spacing(self, volume: Volume) -> list[float]:
        return [float(volume.spacing[axis]) for axis in self.axes]


@dataclass(eq=False)
class NnUNetModel:
    """One loaded nnU-Net v2 model (every fold asked for, averaged as nnU-Net does)."""

    name: str
    folder: Path  # the trained model folder (for a zip, where it was unpacked)
    labels: dict[str, int]  # dataset.json "labels" without background: name -> the value the label map holds
    folds: tuple[Fold, ...]
    mirror_axes: tuple[int, ...]  # test-time mirroring over nnU-Net's axes; () for none
    device: torch.device
    load_seconds: float
    reorients_to_ras: bool
    _predictor: Any  # nnunetv2's nnUNetPredictor
    _preprocessor: Any  # the plans' preprocessor (DefaultPreprocessor)
    # The labels whose confidence is assessed (those the node writes); None: every label.
    confidence_labels: tuple[int, ...] | None = None

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        name: str,
        sha256: str,
        folds: tuple[Fold, ...] | None = None,
        checkpoint: str = "checkpoint_final.pth",
        mirroring: bool | None = None,
        device: str = "cpu",
        unpack_dir: Path | None = None,
        reorient_to_ras: bool = False,
    ) -> NnUNetModel:
        """`path`: a trained model folder (`Trainer__Plans__configuration`) or an exported zip, unpacked to
        `unpack_dir / <digest>` (a folder only the node writes: what lies there is reused unchecked) or, without
        `unpack_dir`, to a temporary folder removed once loaded. `folds`: default every fold_N present (fold_all
        when it is the only one). `mirroring`: None for nnU-Net's default, the axes the checkpoint allows.
        `reorient_to_ras`: give nnU-Net every CT turned to RAS whatever reader its plans name, as
        TotalSegmentator does."""
        start = time.perf_counter()
        if Path(checkpoint).name != checkpoint or not checkpoint.endswith(".pth"):
            raise NnUNetModelError(f"model {name}: checkpoint {checkpoint!r} must be a file name ending .pth")
        verify_digest(path, sha256, name)
        options = dict(
            name=name, folds=folds, checkpoint=checkpoint, mirroring=mirroring, device=device, ras=reorient_to_ras, start=start
        )
        if path.is_dir():  # the digest covers its own files, never a folder below it
            if not (path / "plans.json").is_file() or not (path / "dataset.json").is_file():
                raise NnUNetModelError(
                    f"model {name}: {path} is not a trained nnU-Net model folder (Trainer__Plans__configuration, "
                    "holding plans.json, dataset.json and fold_N/)"
                )
            return cls._from_folder(path, **options)
        if unpack_dir is not None:
            return cls._from_folder(_model_folder(_unpacked(path, unpack_dir / sha256.lower(), name), name), **options)
        with tempfile.TemporaryDirectory(prefix="rtnode-nnunet-") as scratch:  # everything is read while loading
            return cls._from_folder(_model_folder(_unpack(path, Path(scratch), name), name), **options)

    @classmethod
    def _from_folder(
        cls, folder: Path, *, name: str, folds: tuple[Fold, ...] | None, checkpoint: str, mirroring: bool | None,
        device: str, ras: bool, start: float,
    ) -> NnUNetModel:
        """nnUNetPredictor.initialize_from_trained_model_folder's steps, but finding the trainer class by
        importing only the module that defines it (see `_trainer_class`)."""
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from node.pipeline.inference import resolve_device

        resolved = resolve_device(device)
        dataset_json = _read_json(folder / "dataset.json", name)
        plans_manager = PlansManager(_read_json(folder / "plans.json", name))
        chosen = _chosen_folds(folder, folds, checkpoint, name)
        weights = []
        for fold in chosen:
            file = folder / f"fold_{fold}" / checkpoint
            saved = torch.load(file, map_location="cpu", weights_only=False)
            if not isinstance(saved, dict) or not {"network_weights", "trainer_name", "init_args"} <= saved.keys():
                raise NnUNetModelError(f"model {name}: {file} is not an nnU-Net v2 checkpoint")
            weights.append(saved["network_weights"])
            if fold == chosen[0]:
                trainer_name, configuration = saved["trainer_name"], saved["init_args"].get("configuration")
                allowed_axes = saved.get("inference_allowed_mirroring_axes")
            del saved  # the optimiser's state is as large as the weights

        if configuration not in plans_manager.available_configurations:
            raise NnUNetModelError(f"model {name}: its checkpoint's configuration {configuration!r} is not in its plans.json")
        configuration_manager = plans_manager.get_configuration(configuration)
        if configuration_manager.previous_stage_name is not None:
            raise NnUNetModelError(f"model {name}: {configuration} is the second stage of a cascade, which the node cannot run")
        reader = plans_manager.plans.get("image_reader_writer")
        if reader not in AS_STORED_READERS | RAS_READERS:
            raise NnUNetModelError(f"model {name}: its plans read images with {reader}, not a reader the node can stand in for")
        channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        if channels != 1:
            raise NnUNetModelError(f"model {name}: it takes {channels} input channels; the node gives it one, the CT")
        if mirroring and not allowed_axes:
            raise NnUNetModelError(f"model {name}: mirroring = true, but its checkpoint allows no mirroring axes")

        label_manager = plans_manager.get_label_manager(dataset_json)
        network = _trainer_class(trainer_name, name).build_network_architecture(
            plans_manager, configuration_manager, channels, label_manager.num_segmentation_heads, enable_deep_supervision=False
        )
        try:
            network.load_state_dict(weights[0])
        except RuntimeError as error:
            raise NnUNetModelError(f"model {name}: its checkpoint does not fit the network its plans.json describes") from error
        use_mirroring = mirroring is not False
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice on every CPU device
            predictor = nnUNetPredictor(
                use_mirroring=use_mirroring,
                perform_everything_on_device=resolved.type == "cuda",
                device=resolved,
                allow_tqdm=False,
            )
        predictor.manual_initialization(
            network, plans_manager, configuration_manager, weights, dataset_json, trainer_name, allowed_axes
        )
        return cls(
            name=name,
            folder=folder,
            labels=_output_labels(dataset_json, label_manager),
            folds=chosen,
            mirror_axes=tuple(allowed_axes or ()) if use_mirroring else (),
            device=resolved,
            load_seconds=time.perf_counter() - start,
            reorients_to_ras=ras or reader in RAS_READERS,
            _predictor=predictor,
            _preprocessor=configuration_manager.preprocessor_class(verbose=False),
        )

    def predict(self, volume: Volume) -> LabelMap:
        """nnUNetPredictor.predict_single_npy_array's three steps, timed apart, on the array nnU-Net's reader
        would make of this CT: the label map comes back on the Volume's own grid."""
        import torch
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        predictor = self._predictor
        layout = ArrayLayout.ras(volume) if self.reorients_to_ras else ArrayLayout()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        data, _, properties = self._preprocessor.run_case_npy(
            layout.to_nnunet(volume.hu)[None], None, {"spacing": layout.spacing(volume)},
            predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json,
        )
        timings["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        del data
        timings["predict"] = time.perf_counter() - start

        start = time.perf_counter()
        confidence = self._assess(logits, properties, layout, volume.shape[0])
        timings["confidence"] = time.perf_counter() - start

        start = time.perf_counter()
        labels = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
            num_threads_torch=torch.get_num_threads(),
        )
        del logits
        labels = layout.from_nnunet(labels)
        timings["postprocess"] = time.perf_counter() - start
        return LabelMap(labels=labels, timings=timings, confidence=confidence)

    def _assess(self, logits: torch.Tensor, properties: dict, layout: ArrayLayout, ct_slices: int) -> dict:
        """Each label's confidence from nnU-Net's probabilities (the folds' average), on its preprocessed grid: the
        probability margin of the label's mask and the slices whose contour band is unsure. A channel at a time:
        no second copy of the logits. (No out-of-distribution check: an nnU-Net folder records only the
        foreground's intensities.)"""
        import torch

        from node.pipeline.confidence import assess

        label_manager = self._predictor.label_manager
        axis = list(self._predictor.plans_manager.transpose_forward).index(layout.axes.index(0))  # the series' axis
        slice_map = _slice_map(properties, axis, logits.shape[1 + axis], ct_slices, layout.flips[layout.axes.index(0)])
        wanted = set(self.confidence_labels) if self.confidence_labels is not None else set(self.labels.values())
        if label_manager.has_regions:
            channels = {int(label): i for i, label in enumerate(label_manager.regions_class_order) if label in wanted}
            winner, total = None, None
        else:
            channels = {label: label for label in sorted(wanted)}
            winner, total = logits.argmax(0), torch.logsumexp(logits.float(), 0)
        assessed = {}
        for label, channel in channels.items():
            if winner is None:
                probability = torch.sigmoid(logits[channel].float())
                mask = probability >= 0.5
            else:
                probability = torch.exp(logits[channel].float() - total)
                mask = winner == channel
            if not bool(mask.any()):
                continue
            assessed[label] = assess(
                np.moveaxis(probability.numpy(), axis, 0), 0.5, slice_map, mask=np.moveaxis(mask.numpy(), axis, 0)
            )
        return assessed


def _slice_map(properties: dict, axis: int, resampled: int, ct_slices: int, flipped: bool) -> np.ndarray:
    """For each CT slice, its slice along `axis` of nnU-Net's preprocessed grid (cropped to the body, then
    resampled), or -1 where the crop left it out."""
    start = int(properties["bbox_used_for_cropping"][axis][0])
    cropped = int(properties["shape_after_cropping_and_before_resampling"][axis])
    index = np.arange(ct_slices)
    if flipped:
        index = ct_slices - 1 - index
    within = index - start
    mapped = np.clip(np.rint((within + 0.5) * resampled / cropped - 0.5), 0, resampled - 1).astype(int)
    return np.where((within >= 0) & (within < cropped), mapped, -1)


def _trainer_class(trainer_name: str, model_name: str) -> type:
    """The trainer class the checkpoint names, which builds the network. nnU-Net's own lookup imports every
    trainer module in turn, and its Primus trainers import torchvision, which fails to import beside a CPU
    build of torch (pytorch/vision#9085): importing only the module that defines the class avoids that."""
    import nnunetv2.training.nnUNetTrainer as trainers
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = Path(trainers.__file__).parent
    definition = re.compile(rf"^class {re.escape(trainer_name)}\b", re.MULTILINE)
    for source in sorted(root.rglob("*.py")):
        if not definition.search(source.read_text(errors="replace")):
            continue
        module_name = ".".join([trainers.__name__, *source.relative_to(root).with_suffix("").parts])
        try:
            module = importlib.import_module(module_name)
        except (ImportError, RuntimeError) as error:
            raise NnUNetModelError(f"model {model_name}: its trainer {trainer_name} cannot be imported ({error})") from error
        trainer = getattr(module, trainer_name, None)
        if isinstance(trainer, type) and issubclass(trainer, nnUNetTrainer):
            return trainer
    raise NnUNetModelError(
        f"model {model_name}: its checkpoint names the trainer class {trainer_name}, which nnunetv2 "
        f"{importlib.metadata.version('nnunetv2')} "
        "does not have (a custom trainer's code must be installed in nnunetv2.training.nnUNetTrainer)"
    )


def _output_labels(dataset_json: dict, label_manager: Any) -> dict[str, int]:
    """Name -> the value nnU-Net writes for it: the label's own value, or for a region-based model the
    region's entry in `regions_class_order`."""
    named = [(n, v) for n, v in dataset_json["labels"].items() if n not in ("background", "ignore")]
    if label_manager.has_regions:
        return {n: int(value) for (n, _), value in zip(named, label_manager.regions_class_order, strict=True)}
    return {n: int(v) for n, v in named}


def _chosen_folds(folder: Path, requested: tuple[Fold, ...] | None, checkpoint: str, name: str) -> tuple[Fold, ...]:
    present: set[Fold] = set()
    for fold_dir in folder.glob("fold_*"):
        suffix = fold_dir.name.removeprefix("fold_")
        if (fold_dir / checkpoint).is_file() and (suffix.isdigit() or suffix == "all"):
            present.add(int(suffix) if suffix.isdigit() else suffix)
    numbered = sorted(f for f in present if isinstance(f, int))
    if requested is None:
        chosen: tuple[Fold, ...] = tuple(numbered) or (("all",) if "all" in present else ())
        if not chosen:
            raise NnUNetModelError(f"model {name}: {folder} has no fold_N/{checkpoint}")
        return chosen
    missing = [fold for fold in requested if fold not in present]
    if missing or not requested:
        have = ", ".join(f"fold_{f}" for f in [*numbered, *sorted(present - set(numbered))]) or "none"
        raise NnUNetModelError(
            f"model {name}: folds {list(requested)} asked for, but {folder} has no "
            f"{', '.join(f'fold_{f}/{checkpoint}' for f in missing) or 'fold'} (it has: {have})"
        )
    return tuple(requested)


def _read_json(file: Path, name: str) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise NnUNetModelError(f"model {name}: {file} cannot be read as JSON ({error})") from error


def _model_folder(root: Path, name: str) -> Path:
    """The one trained model folder (plans.json, dataset.json, fold_N/) in an unpacked zip."""
    folders = sorted({plans.parent for plans in root.rglob("plans.json") if (plans.parent / "dataset.json").is_file()})
    if len(folders) == 1:
        return folders[0]
    if not folders:
        raise NnUNetModelError(f"model {name}: {root} holds no trained nnU-Net model (a folder with plans.json and dataset.json)")
    listed = ", ".join(str(folder.relative_to(root)) for folder in folders)
    raise NnUNetModelError(f"model {name}: {root} holds {len(folders)} trained models ({listed}): give one of them")


def _unpacked(archive: Path, target: Path, name: str) -> Path:
    """`archive` unpacked into `target` once: into a temporary folder beside it, renamed into place, so a
    worker never sees half a model and two workers unpacking at once both end up with the same one."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        _unpack(archive, scratch, name)
        scratch.rename(target)
    except OSError:
        if not target.is_dir():  # not another worker's unpacking having won the race
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _unpack(archive: Path, destination: Path, name: str) -> Path:
    """Refuses a member whose path would land outside `destination` (zip slip) before writing anything."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                path = member.filename.replace("\\", "/")
                parts = PurePosixPath(path).parts
                if path.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise NnUNetModelError(
                        f"model {name}: {archive} holds {member.filename!r}, a path outside the folder it unpacks to"
                    )
            zipped.extractall(destination)
    except zipfile.BadZipFile as error:
        raise NnUNetModelError(f"model {name}: {archive} is neither an nnU-Net model folder nor a zip ({error})") from error
    return destination
