"""What of dcm2niix's BIDS sidecar may leave the job: acquisition facts, never who or where.

``dwi.json`` is a derived file: it travels to researchers and pipelines that must not learn who
was scanned. dcm2niix runs with its anonymisation on (``-ba y``), but that still keeps the
institution's name, address and department, the station name and the device's serial number;
and its list of fields changes between versions. So the sidecar is filtered through an
**allow-list**: only the fields below are kept, and anything dcm2niix adds later stays out until
someone decides it belongs here.

Never kept: patient name, ID, birth date, sex, age, size and weight; institution, department,
address and station; device serial number; referring, performing and operating physicians;
acquisition dates and times (``AcquisitionDateTime``, ``AcquisitionTime``, ``StudyDate`` ...);
the hospital's Study ID. The Study and Series Instance UIDs and the Accession Number (which
dcm2niix's anonymisation drops) are what a hospital needs to file results; ``dwi.json`` and
``report.json`` carry them in their ``input`` section, read from the DICOM headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ACQUISITION_FIELDS: frozenset[str] = frozenset({
    # scanner and software (make and model, not the individual device)
    "Modality", "Manufacturer", "ManufacturersModelName", "SoftwareVersions", "MagneticFieldStrength",
    "ImagingFrequency", "ReceiveCoilName", "ReceiveCoilActiveElements", "CoilString", "MatrixCoilMode",
    "ConversionSoftware", "ConversionSoftwareVersion",
    # the series and its sequence
    "SeriesDescription", "ProtocolName", "SeriesNumber", "AcquisitionNumber", "ImageType", "ImageTypeText",
    "BodyPartExamined", "PatientPosition", "MRAcquisitionType", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "SequenceName", "PulseSequenceType", "PulseSequenceDetails", "DiffusionScheme",
    "NonlinearGradientCorrection",
    # timing and contrast
    "EchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "SliceTiming", "NumberOfAverages",
    "SpoilingState", "MTState", "SAR",
    # geometry
    "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatientDICOM", "ImageOrientationText",
    "InPlanePhaseEncodingDirectionDICOM", "AcquisitionMatrixPE", "ReconMatrixPE", "BaseResolution",
    "PhaseResolution", "PercentPhaseFOV", "PercentSampling", "PhaseEncodingSteps", "PhaseEncodingStepsNoPartialFourier",
    "FrequencyEncodingSteps", "PartialFourier", "PartialFourierDirection",
    # distortion correction (topup, eddy)
    "PhaseEncodingDirection", "PhaseEncodingAxis", "SliceEncodingDirection", "EffectiveEchoSpacing",
    "DerivedVendorReportedEchoSpacing", "EstimatedEffectiveEchoSpacing", "TotalReadoutTime",
    "EstimatedTotalReadoutTime", "PixelBandwidth", "BandwidthPerPixelPhaseEncode", "DwellTime", "WaterFatShift",
    "EchoTrainLength", "ParallelReductionFactorInPlane", "ParallelReductionFactorOutOfPlane",
    "ParallelAcquisitionTechnique", "MultibandAccelerationFactor", "RefLinesPE",
    # vendor intensity scaling
    "PhilipsRescaleSlope", "PhilipsRescaleIntercept", "PhilipsScaleSlope", "UsePhilipsFloatNotDisplayScaling",
    # what a hospital files results against (dcm2niix's anonymisation drops them; kept if present)
    "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber",
})  # fmt: skip
"""BIDS sidecar fields copied into ``dwi.json``; every other field is dropped."""


def acquisition_fields(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a dcm2niix BIDS ``sidecar`` that are in :data:`ACQUISITION_FIELDS`, in
    their original order; everything else (patient, institution, device, dates) is dropped."""
    return {key: value for key, value in sidecar.items() if key in ACQUISITION_FIELDS}
