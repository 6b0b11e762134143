"""Every coded concept our result objects use, in one place.

SNOMED CT (SCT), LOINC (LN), DICOM (DCM) and UCUM where a code exists and is confirmed (in
pydicom's DICOM concept dictionary, or the DICOM anatomic master list as used by dcmqi); everything
else comes from one private coding scheme, `99DNODE`, declared in every object that uses it and
listed in `docs/codes.md`. A code is never invented in a public scheme.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99DNODE"
PRIVATE_SCHEME_NAME = "dicomnode lumbar spine findings"
PRIVATE_SCHEME_UID = "2.25.233127917104390853392393713935542093316"


def private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# ---------------------------------------------------------------- anatomy (SEG segments, finding sites)
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
VERTEBRAE = {
    "T12": Code("23215003", "SCT", "T12 vertebra"),
    "L1": Code("66794005", "SCT", "L1 vertebra"),
    "L2": Code("14293000", "SCT", "L2 vertebra"),
    "L3": Code("36470004", "SCT", "L3 vertebra"),
    "L4": Code("11994002", "SCT", "L4 vertebra"),
    "L5": Code("49668003", "SCT", "L5 vertebra"),
    "S1": Code("54735007", "SCT", "Sacrum"),  # S1 is the top of the sacrum; the segment label says S1
}
DISCS = {  # SNOMED names a disc by the vertebra above it
    "L1/L2": Code("80064006", "SCT", "Intervertebral disc structure of first lumbar vertebra"),
    "L2/L3": Code("67459009", "SCT", "Intervertebral disc structure of second lumbar vertebra"),
    "L3/L4": Code("62551000", "SCT", "Intervertebral disc structure of third lumbar vertebra"),
    "L4/L5": Code("84020006", "SCT", "Intervertebral disc structure of fourth lumbar vertebra"),
    "L5/S1": Code("75782005", "SCT", "Intervertebral disc structure of fifth lumbar vertebra"),
}
DISC_LEVELS = {  # finding sites of per-level findings (CID 1000 "Spinal levels")
    "L1/L2": Code("243920003", "SCT", "Level of L1/L2 intervertebral disc"),
    "L2/L3": Code("243921004", "SCT", "Level of L2/L3 intervertebral disc"),
    "L3/L4": Code("243922006", "SCT", "Level of L3/L4 intervertebral disc"),
    "L4/L5": Code("243923001", "SCT", "Level of L4/L5 intervertebral disc"),
    "L5/S1": Code("243927000", "SCT", "Level of L5/S1 intervertebral disc"),
}
SPINAL_CANAL = Code("61853006", "SCT", "Spinal canal")
LUMBAR_SPINE = Code("122496007", "SCT", "Lumbar spine")
BONE_MARROW = Code("14016003", "SCT", "Bone Marrow")

# SEG structures: key -> (type code, label, display colour as RGB)
STRUCTURES: dict[str, tuple[Code, str, tuple[int, int, int]]] = {
    **{v: (c, f"{v} vertebral body", (230, 200, 120 + 20 * i)) for i, (v, c) in enumerate(VERTEBRAE.items()) if v != "T12"},
    **{d: (c, f"{d} intervertebral disc", (70, 130 + 20 * i, 230)) for i, (d, c) in enumerate(DISCS.items())},
    "canal": (SPINAL_CANAL, "Spinal canal", (90, 220, 110)),
}


def site_of(level: str) -> Code:
    """Finding site of a level: a disc level ("L4/L5") or a vertebra ("L3")."""
    if level in DISC_LEVELS:
        return DISC_LEVELS[level]
    if level in VERTEBRAE:
        return VERTEBRAE[level]
    if level == "lumbar spine":
        return LUMBAR_SPINE
    raise KeyError(f"unknown spinal level {level!r}; expected one of {', '.join([*DISC_LEVELS, *VERTEBRAE])}")


# ---------------------------------------------------------------- findings and grades
STENOSIS = Code("415582006", "SCT", "Stenosis")
EDEMA = Code("79654002", "SCT", "Edema")
FINDINGS: dict[str, Code] = {
    "spinal_canal_stenosis": STENOSIS,
    "left_neural_foraminal_narrowing": private("NFN-L", "Left neural foraminal narrowing"),
    "right_neural_foraminal_narrowing": private("NFN-R", "Right neural foraminal narrowing"),
    "left_subarticular_stenosis": private("SAS-L", "Left subarticular stenosis"),
    "right_subarticular_stenosis": private("SAS-R", "Right subarticular stenosis"),
    "disc_herniation": private("HERN", "Intervertebral disc herniation"),
    "disc_degeneration": private("DDD", "Intervertebral disc degeneration"),
    "modic_change": private("MODIC", "Modic vertebral endplate bone marrow change"),
    "marrow_lesion": private("MLES", "Focal vertebral bone marrow lesion"),
    "spondylolisthesis": private("SPL", "Spondylolisthesis"),
    "lumbar_lordosis": private("LORD", "Lumbar lordosis"),
    "study_class": private("SCLS", "Lumbar spine study class"),  # seed 001's four classes, site: lumbar spine
}
GRADES: dict[str, Code] = {
    "normal": Code("17621005", "SCT", "Normal"),
    "normal_mild": private("G-NM", "Normal or mild"),
    "mild": Code("255604002", "SCT", "Mild"),
    "moderate": Code("6736007", "SCT", "Moderate"),
    "severe": Code("24484000", "SCT", "Severe"),
    "none": Code("272519000", "SCT", "Absent"),
    "present": Code("52101004", "SCT", "Present"),
    "bulge": private("H-BULGE", "Disc bulge"),
    "protrusion": private("H-PROT", "Disc protrusion"),
    "extrusion": private("H-EXTR", "Disc extrusion"),
    "modic_0": private("M0", "No Modic change"),
    "modic_1": private("M1", "Modic type 1"),
    "modic_2": private("M2", "Modic type 2"),
    "modic_3": private("M3", "Modic type 3"),
    "hypolordosis": private("L-HYPO", "Hypolordosis"),
    "normal_lordosis": private("L-NORM", "Normal lordosis"),
    "hyperlordosis": private("L-HYPER", "Hyperlordosis"),
    "healthy": private("C-HLTH", "Healthy lumbar spine"),
    "herniated_disc": private("C-HERN", "Herniated disc"),
    "spinal_stenosis": private("C-STEN", "Spinal stenosis"),
    "spondylosis": private("C-SPOND", "Spondylosis"),
}
GRADE = private("GRADE", "Grade")  # concept name of the qualitative evaluation that carries a grade
PROBABILITY = Code("122157", "DCM", "Probability")
ANGLES = {
    "L1-S1": private("LLA-L1S1", "Lumbar lordosis angle L1-S1"),
    "L1-L5": private("LLA-L1L5", "Lumbar lordosis angle L1-L5"),
}
ENDPLATE_LINE = private("EPL", "Vertebral endplate line")
# CID 42 Numeric Value Qualifier: an angle attempted and not measured has no value, only this
MEASUREMENT_FAILURE = Code("114006", "DCM", "Measurement failure")
# An angle is the median of its values on the central slices (CID 3627 Measurement Type), and the
# interquartile range of those values is its statistical property (TID 311): how far to trust it
MEDIAN = Code("373099004", "SCT", "Median")
INTERQUARTILE_RANGE = Code("130614", "DCM", "Interquartile Range of population")
# An angle whose spread over the slices calls for a look at its lines: a qualitative evaluation of the
# lordosis group, the angle's own code as its name and this as its value, so a viewer shows "... L1-L5: Uncertain"
UNCERTAIN = Code("64957009", "SCT", "Uncertain")

# ---------------------------------------------------------------- units, report, algorithms, maps
DEGREE = Code("deg", "UCUM", "Degree")
NO_UNITS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
GRADCAM = Code("130403", "DCM", "Gradient-weighted class activation")
