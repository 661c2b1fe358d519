"""RT Structure Sets from masks and masks from them, for other tools; and contouring a CT folder
with the node's own model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.cli.command import BUNDLED, WEIGHTS_HELP, Commands, add_command, new_path, node_config, weights_file
from node.config import BUNDLED_WEIGHTS, config_path
from node.errors import UserError

EXIT_NOTHING_FOUND = 3


def _load_ct(directory: Path):
    from node.imaging.volume import load_series_dir

    return load_series_dir(directory)


def add_rtstruct(commands: Commands) -> None:
    rtstruct = add_command(commands, "rtstruct", cmd_rtstruct, "write an RT Structure Set for a NIfTI mask on a CT series' grid")
    rtstruct.add_argument("ct_dir", type=Path, metavar="CT_DIR", help="folder with the CT series")
    rtstruct.add_argument("mask", type=Path, metavar="MASK.nii.gz", help="binary mask on the CT's voxel grid")
    rtstruct.add_argument("--out", type=new_path, required=True, metavar="RS.dcm")
    rtstruct.add_argument("--roi-name", default="CTV", help="name of the ROI written")
    rtstruct.add_argument("--algorithm-name", default="external mask", help="what made the mask (named in the ROI)")
    rtstruct.add_argument("--algorithm-version", default="unknown", help="its version (named in the ROI)")


def cmd_rtstruct(args: argparse.Namespace) -> int:
    from node.imaging.nifti import read_mask
    from node.outputs import OutputPaths, write_outputs
    from node.rtstruct.builder import Algorithm

    volume = _load_ct(args.ct_dir)
    mask = read_mask(args.mask, volume)
    algorithm = Algorithm(args.algorithm_name, args.algorithm_version)
    write_outputs(volume, mask, OutputPaths(rtstruct=args.out), algorithm, args.roi_name)
    slices = int(mask.any(axis=(1, 2)).sum())
    print(f"wrote {args.out}: ROI {args.roi_name!r}, {int(mask.sum())} voxels on {slices} slices")
    return 0


def add_mask(commands: Commands) -> None:
    mask = add_command(commands, "mask", cmd_mask, "write one ROI of an RT Structure Set as a NIfTI mask on the CT's grid")
    mask.add_argument("ct_dir", type=Path, metavar="CT_DIR")
    mask.add_argument("rtstruct", type=Path, metavar="RS.dcm")
    mask.add_argument("--roi", required=True, metavar="NAME")
    mask.add_argument("--out", type=new_path, required=True, metavar="MASK.nii.gz")


def cmd_mask(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.imaging.nifti import write_mask
    from node.rtstruct.reader import read_mask

    volume = _load_ct(args.ct_dir)
    try:
        rtstruct = dcmread(args.rtstruct)
    except (InvalidDicomError, OSError) as exc:
        raise UserError(f"cannot read {args.rtstruct}: {exc}") from exc
    mask = read_mask(rtstruct, volume, args.roi)
    write_mask(args.out, volume, mask)
    print(f"wrote {args.out}: ROI {args.roi!r}, {int(mask.sum())} voxels")
    return 0


def add_contour(commands: Commands) -> None:
    contour = add_command(commands, "contour", cmd_contour, "contour the CTV of a CT series and write an RT Structure Set")
    contour.add_argument("ct_dir", type=Path, metavar="CT_DIR")
    contour.add_argument("--out", type=new_path, required=True, metavar="RS.dcm")
    contour.add_argument("--mask-out", type=new_path, metavar="MASK.nii.gz")
    contour.add_argument("--seg-out", type=new_path, metavar="SEG.dcm")
    contour.add_argument(
        "--weights", type=weights_file,
        help=f"{WEIGHTS_HELP} (default: model.weights of the configuration; without one, {BUNDLED!r})",
    )
    contour.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees a GPU")
    contour.add_argument("--roi-name", default="CTV", help="name of the ROI written")


def _default_weights(args: argparse.Namespace) -> Path:
    """--weights, else model.weights of the configuration, else (no configuration file) the bundled ones."""
    if args.weights is not None:
        return args.weights
    if args.config is None and not config_path().exists():
        return BUNDLED_WEIGHTS
    return node_config(args).model.weights


def cmd_contour(args: argparse.Namespace) -> int:
    from node.outputs import ContourReport, OutputPaths, write_outputs
    from node.pipeline.inference import Segmenter
    from node.rtstruct.builder import Algorithm

    volume = _load_ct(args.ct_dir)
    segmenter = Segmenter.from_weights(_default_weights(args), args.device)
    prediction = segmenter.predict(volume)
    card = segmenter.card
    report = ContourReport(card.label, str(segmenter.device), prediction.timings)
    if not prediction.mask.any():
        print(f"rtnode: {report.nothing_found(args.ct_dir)}", file=sys.stderr)
        return EXIT_NOTHING_FOUND
    paths = OutputPaths(rtstruct=args.out, mask=args.mask_out, seg=args.seg_out)
    write_outputs(
        volume, prediction.mask, paths, Algorithm(card.name, card.version), args.roi_name, confidence=prediction.confidence
    )
    print(report.written(args.out, args.roi_name, volume, prediction.mask))
    return 0
