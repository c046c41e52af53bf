"""MoCo-CXR's fine-tune protocol as the paper states it (Sowrirajan et al., MIDL 2021): plain values.

One home for the paper's protocol facts that several floors read: the fine-tune epoch rule
(``train/budget.py``), the published tables and their captions (``report/``) and the plan's cost
(``flows/cost.py``). Choices the paper leaves open are config values, not constants here.
"""

from __future__ import annotations

# MoCo-CXR's CheXpert schedule: label fraction -> epochs. Other fractions interpolate linearly in
# log10(fraction) between these points and clamp outside them (0.05 % -> 220, 5 % -> 57, 50 % -> 25).
FRACTION_EPOCHS = ((0.001, 220), (0.01, 95), (0.1, 41), (1.0, 18))
# The same schedule as a mapping, as the report captions compare a run's epochs with it; the paper
# gives no epochs for Shenzhen.
PAPER_EPOCHS = dict(FRACTION_EPOCHS)

# Labelled CheXpert training images of the paper's setting: CheXpert v1.0's train.csv has 191,027 frontal
# images; holding out 10 % of the patients for validation leaves about 90 % of them, ~172,000. Rule size
# puts FRACTION_EPOCHS at n = fraction x CHEXPERT_LABELLED (172, 1,720, 17,200, 172,000 images).
CHEXPERT_LABELLED = 172_000

# The label fractions the paper's tables report.
CHEXPERT_FRACTIONS = (0.001, 0.01, 0.1, 1.0)
SHENZHEN_FRACTIONS = (0.0625, 0.25, 1.0)

PAPER_LR = 3e-5  # fine-tune learning rate (Adam)
PAPER_BATCH_SIZE = 16
PAPER_REPLICATES = 500  # paired bootstrap replicates behind every published interval

__all__ = [
    "CHEXPERT_FRACTIONS",
    "CHEXPERT_LABELLED",
    "FRACTION_EPOCHS",
    "PAPER_BATCH_SIZE",
    "PAPER_EPOCHS",
    "PAPER_LR",
    "PAPER_REPLICATES",
    "SHENZHEN_FRACTIONS",
]
