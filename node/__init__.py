"""rtnode: a DICOM node that receives CT series and returns auto-contoured RT Structure Sets."""

__version__ = "0.1.0"
