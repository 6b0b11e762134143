"""dicomnode: a DICOM AI node for lumbar spine MRI."""

__version__ = "0.1.0"
