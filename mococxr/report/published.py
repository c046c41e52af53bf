"""The numbers MoCo-CXR published (Sowrirajan et al., MIDL 2021), as plain data for the paper layouts.

Every value is ``(point, lo, hi)``: an AUC or an AUC difference with its 95% bootstrap percentile
interval, as printed. Keys use this project's names: backbones ``resnet18`` / ``densenet121``, inits
``moco`` / ``imagenet``, protocols ``linear`` / ``e2e``, label fractions as floats (0.001 = 0.1%).

- :data:`TABLE1` and :data:`APPENDIX_TABLE3`: the improvement tables (CheXpert pleural effusion,
  Shenzhen tuberculosis), keyed ``(backbone, moco protocol, baseline protocol, fraction)``.
- :data:`APPENDIX_TABLE1` and :data:`APPENDIX_TABLE2`: absolute AUCs of the same experiments, keyed
  ``(backbone, init, protocol, fraction)``.
- :data:`COMPETITION` (appendix Tables 4 and 5, ResNet18 only): keyed ``(task, protocol, fraction)``,
  each a mapping ``baseline`` / ``moco`` / ``improvement``; tasks are CheXpert column names.
- :data:`TABLE2`: ResNet18, linear, 100% of Shenzhen, keyed by the MoCo pretraining learning rate.

The fine-tune protocol facts the captions compare against are here too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

# The paper's protocol facts live with the config (train/ and flows/ read them too); the report layouts
# read them from here, beside the published numbers.
from mococxr.config.protocol import CHEXPERT_FRACTIONS, SHENZHEN_FRACTIONS
from mococxr.config.protocol import PAPER_BATCH_SIZE as PAPER_BATCH_SIZE
from mococxr.config.protocol import PAPER_EPOCHS as PAPER_EPOCHS
from mococxr.config.protocol import PAPER_LR as PAPER_LR
from mococxr.config.protocol import PAPER_REPLICATES as PAPER_REPLICATES
from mococxr.report.tables import COMPARISONS


class Published(NamedTuple):
    point: float
    lo: float
    hi: float


COMPARISON_ROWS = COMPARISONS  # Table 1's row order per backbone: e2e-e2e, linear-linear, linear-e2e


def _table(fractions: Sequence[float], rows: Mapping[tuple, Sequence[tuple[float, float, float]]]) -> dict:
    """``{(*row key, fraction): Published}`` from one printed row of values per key."""
    out = {}
    for key, values in rows.items():  # strict: a row with a missing or extra value fails at import
        out.update({(*key, f): Published(*v) for f, v in zip(fractions, values, strict=True)})
    return out


# The published cells, laid out as the paper prints them (kept out of the formatter).
# fmt: off
TABLE1 = _table(CHEXPERT_FRACTIONS, {
    ("resnet18", "e2e", "e2e"): [(0.037, 0.015, 0.062), (0.027, 0.006, 0.047), (0.017, 0.003, 0.031),
                                 (0.000, -0.009, 0.009)],
    ("resnet18", "linear", "linear"): [(0.096, 0.061, 0.130), (0.070, 0.029, 0.112), (0.049, 0.005, 0.094),
                                       (0.034, -0.009, 0.080)],
    ("resnet18", "linear", "e2e"): [(0.001, -0.024, 0.025), (-0.022, -0.051, 0.009), (-0.050, -0.083, -0.018),
                                    (-0.094, -0.127, -0.062)],
    ("densenet121", "e2e", "e2e"): [(0.048, 0.023, 0.074), (0.019, 0.001, 0.037), (0.012, 0.000, 0.023),
                                    (0.003, -0.006, 0.013)],
    ("densenet121", "linear", "linear"): [(0.107, 0.075, 0.142), (0.078, 0.035, 0.121), (0.067, 0.023, 0.111),
                                          (0.055, 0.008, 0.102)],
    ("densenet121", "linear", "e2e"): [(0.029, 0.002, 0.055), (-0.024, -0.050, -0.003),
                                       (-0.070, -0.109, -0.036), (-0.107, -0.141, -0.073)],
})

APPENDIX_TABLE1 = _table(CHEXPERT_FRACTIONS, {
    ("resnet18", "moco", "linear"): [(0.776, 0.735, 0.811), (0.838, 0.797, 0.873), (0.848, 0.807, 0.883),
                                     (0.850, 0.808, 0.884)],
    ("resnet18", "imagenet", "linear"): [(0.683, 0.644, 0.719), (0.766, 0.716, 0.805), (0.799, 0.750, 0.840),
                                         (0.815, 0.768, 0.853)],
    ("densenet121", "moco", "linear"): [(0.775, 0.737, 0.806), (0.833, 0.790, 0.871), (0.839, 0.800, 0.877),
                                        (0.845, 0.803, 0.881)],
    ("densenet121", "imagenet", "linear"): [(0.669, 0.631, 0.705), (0.755, 0.706, 0.804),
                                            (0.769, 0.716, 0.818), (0.789, 0.739, 0.836)],
    ("resnet18", "moco", "e2e"): [(0.813, 0.779, 0.842), (0.885, 0.856, 0.909), (0.915, 0.885, 0.937),
                                  (0.942, 0.921, 0.962)],
    ("resnet18", "imagenet", "e2e"): [(0.775, 0.737, 0.807), (0.858, 0.828, 0.886), (0.898, 0.872, 0.921),
                                      (0.942, 0.920, 0.961)],
    ("densenet121", "moco", "e2e"): [(0.795, 0.758, 0.828), (0.877, 0.849, 0.901), (0.920, 0.896, 0.941),
                                     (0.953, 0.935, 0.969)],
    ("densenet121", "imagenet", "e2e"): [(0.747, 0.712, 0.779), (0.857, 0.821, 0.886), (0.908, 0.884, 0.929),
                                         (0.949, 0.928, 0.967)],
})

APPENDIX_TABLE2 = _table(SHENZHEN_FRACTIONS, {
    ("resnet18", "moco", "linear"): [(0.902, 0.848, 0.945), (0.928, 0.874, 0.966), (0.944, 0.907, 0.972)],
    ("resnet18", "imagenet", "linear"): [(0.852, 0.791, 0.901), (0.903, 0.845, 0.952), (0.927, 0.873, 0.971)],
    ("densenet121", "moco", "linear"): [(0.899, 0.850, 0.939), (0.927, 0.881, 0.963), (0.943, 0.904, 0.975)],
    ("densenet121", "imagenet", "linear"): [(0.872, 0.817, 0.920), (0.909, 0.852, 0.951),
                                            (0.931, 0.886, 0.968)],
    ("resnet18", "moco", "e2e"): [(0.911, 0.867, 0.943), (0.953, 0.919, 0.978), (0.974, 0.945, 0.993)],
    ("resnet18", "imagenet", "e2e"): [(0.911, 0.863, 0.952), (0.948, 0.912, 0.978), (0.970, 0.943, 0.990)],
    ("densenet121", "moco", "e2e"): [(0.909, 0.866, 0.947), (0.950, 0.911, 0.980), (0.984, 0.960, 0.999)],
    ("densenet121", "imagenet", "e2e"): [(0.898, 0.848, 0.935), (0.944, 0.904, 0.980), (0.971, 0.946, 0.991)],
})

APPENDIX_TABLE3 = _table(SHENZHEN_FRACTIONS, {
    ("resnet18", "e2e", "e2e"): [(0.001, -0.022, 0.027), (0.005, -0.012, 0.027), (0.003, -0.014, 0.020)],
    ("resnet18", "linear", "linear"): [(0.054, 0.024, 0.086), (0.026, -0.001, 0.056), (0.018, -0.011, 0.053)],
    ("resnet18", "linear", "e2e"): [(-0.007, -0.029, 0.015), (-0.020, -0.040, -0.003),
                                    (-0.026, -0.052, -0.005)],
    ("densenet121", "e2e", "e2e"): [(0.011, -0.006, 0.028), (0.006, -0.010, 0.023), (0.013, -0.003, 0.033)],
    ("densenet121", "linear", "linear"): [(0.024, -0.001, 0.050), (0.016, -0.011, 0.043),
                                          (0.013, -0.014, 0.041)],
    ("densenet121", "linear", "e2e"): [(-0.001, -0.023, 0.019), (-0.016, -0.035, 0.001),
                                       (-0.027, -0.053, -0.003)],
})

# Appendix Tables 4 (linear) and 5 (e2e): per task and fraction, (baseline, moco, improvement).
_COMPETITION_ROWS = {
    ("Atelectasis", "linear"): [
        ((0.602, 0.571, 0.635), (0.630, 0.592, 0.668), (0.030, -0.005, 0.064)),
        ((0.612, 0.574, 0.650), (0.671, 0.623, 0.714), (0.060, 0.022, 0.098)),
        ((0.703, 0.654, 0.748), (0.751, 0.708, 0.796), (0.048, 0.011, 0.086)),
        ((0.732, 0.685, 0.778), (0.758, 0.712, 0.802), (0.025, -0.015, 0.065))],
    ("Cardiomegaly", "linear"): [
        ((0.485, 0.454, 0.516), (0.640, 0.605, 0.671), (0.156, 0.122, 0.193)),
        ((0.634, 0.587, 0.674), (0.735, 0.690, 0.779), (0.100, 0.058, 0.139)),
        ((0.685, 0.638, 0.733), (0.745, 0.698, 0.788), (0.060, 0.019, 0.101)),
        ((0.700, 0.652, 0.747), (0.737, 0.694, 0.780), (0.038, -0.004, 0.082))],
    ("Consolidation", "linear"): [
        ((0.633, 0.566, 0.694), (0.644, 0.554, 0.734), (0.008, -0.085, 0.093)),
        ((0.615, 0.548, 0.678), (0.699, 0.617, 0.771), (0.083, -0.007, 0.166)),
        ((0.752, 0.674, 0.821), (0.794, 0.699, 0.876), (0.041, -0.059, 0.127)),
        ((0.749, 0.665, 0.830), (0.771, 0.665, 0.859), (0.019, -0.093, 0.119))],
    ("Edema", "linear"): [
        ((0.725, 0.682, 0.766), (0.781, 0.743, 0.814), (0.055, 0.016, 0.092)),
        ((0.810, 0.764, 0.849), (0.847, 0.809, 0.883), (0.038, 0.005, 0.071)),
        ((0.844, 0.801, 0.884), (0.870, 0.833, 0.900), (0.024, -0.009, 0.059)),
        ((0.846, 0.805, 0.886), (0.867, 0.830, 0.898), (0.020, -0.015, 0.052))],
    ("Pleural Effusion", "linear"): [
        ((0.683, 0.644, 0.719), (0.776, 0.735, 0.811), (0.096, 0.061, 0.130)),
        ((0.766, 0.716, 0.805), (0.838, 0.797, 0.873), (0.070, 0.029, 0.112)),
        ((0.799, 0.750, 0.840), (0.848, 0.807, 0.883), (0.049, 0.005, 0.094)),
        ((0.815, 0.768, 0.853), (0.850, 0.808, 0.884), (0.034, -0.009, 0.080))],
    ("Atelectasis", "e2e"): [
        ((0.611, 0.582, 0.641), (0.673, 0.637, 0.706), (0.061, 0.034, 0.089)),
        ((0.685, 0.651, 0.719), (0.730, 0.693, 0.762), (0.043, 0.015, 0.069)),
        ((0.732, 0.694, 0.770), (0.787, 0.750, 0.823), (0.054, 0.030, 0.076)),
        ((0.842, 0.807, 0.878), (0.821, 0.781, 0.860), (-0.021, -0.037, -0.004))],
    ("Cardiomegaly", "e2e"): [
        ((0.593, 0.561, 0.624), (0.663, 0.628, 0.695), (0.069, 0.041, 0.097)),
        ((0.728, 0.690, 0.765), (0.811, 0.777, 0.840), (0.083, 0.059, 0.108)),
        ((0.808, 0.769, 0.844), (0.820, 0.779, 0.856), (0.011, -0.010, 0.029)),
        ((0.857, 0.822, 0.890), (0.858, 0.824, 0.892), (0.001, -0.014, 0.016))],
    ("Consolidation", "e2e"): [
        ((0.618, 0.554, 0.680), (0.646, 0.574, 0.713), (0.028, -0.015, 0.072)),
        ((0.673, 0.614, 0.727), (0.733, 0.663, 0.792), (0.061, 0.006, 0.120)),
        ((0.809, 0.763, 0.853), (0.852, 0.790, 0.903), (0.042, 0.009, 0.070)),
        ((0.888, 0.847, 0.927), (0.904, 0.858, 0.939), (0.016, -0.011, 0.046))],
    ("Edema", "e2e"): [
        ((0.771, 0.737, 0.804), (0.786, 0.752, 0.820), (0.015, -0.014, 0.042)),
        ((0.846, 0.810, 0.880), (0.850, 0.815, 0.882), (0.004, -0.017, 0.024)),
        ((0.865, 0.829, 0.898), (0.877, 0.840, 0.908), (0.011, -0.008, 0.030)),
        ((0.907, 0.876, 0.935), (0.894, 0.860, 0.923), (-0.013, -0.027, 0.001))],
    # Pleural effusion, end-to-end: the same models as appendix Table 1's ResNet18 rows. Appendix Table 5
    # prints the 1% baseline interval as (0.856, 0.886) and the 100% MoCo interval as (0.921, 0.921),
    # extraction slips: appendix Table 1 gives (0.828, 0.886) and (0.921, 0.962), used here.
    ("Pleural Effusion", "e2e"): [
        ((0.775, 0.737, 0.807), (0.813, 0.779, 0.842), (0.037, 0.015, 0.062)),
        ((0.858, 0.828, 0.886), (0.885, 0.856, 0.909), (0.027, 0.006, 0.047)),
        ((0.898, 0.872, 0.921), (0.915, 0.885, 0.937), (0.017, 0.003, 0.031)),
        ((0.942, 0.920, 0.961), (0.942, 0.921, 0.962), (0.000, -0.009, 0.009))],
}
# fmt: on


# The two published cells above that differ from what appendix Table 5 prints, for the captions' footnote.
class Correction(NamedTuple):
    item: str  # the table that prints the cell
    task: str
    protocol: str
    fraction: float
    column: str  # baseline | moco | improvement
    printed: Published  # as the table prints it
    used: Published  # what this project compares with
    source: str  # where the used number comes from


CORRECTIONS = (
    Correction(
        "Appendix Table 5",
        "Pleural Effusion",
        "e2e",
        0.01,
        "baseline",
        Published(0.858, 0.856, 0.886),
        Published(0.858, 0.828, 0.886),
        "Appendix Table 1",
    ),
    Correction(
        "Appendix Table 5",
        "Pleural Effusion",
        "e2e",
        1.0,
        "moco",
        Published(0.942, 0.921, 0.921),
        Published(0.942, 0.921, 0.962),
        "Appendix Table 1",
    ),
)
COMPETITION = {
    (*key, f): {"baseline": Published(*b), "moco": Published(*m), "improvement": Published(*d)}
    for key, rows in _COMPETITION_ROWS.items()
    for f, (b, m, d) in zip(CHEXPERT_FRACTIONS, rows, strict=True)
}

# fmt: off
TABLE2 = {1e-2: Published(0.786, 0.699, 0.861), 1e-3: Published(0.908, 0.853, 0.955),
          1e-4: Published(0.944, 0.907, 0.972), 1e-5: Published(0.939, 0.891, 0.975)}
# fmt: on
TABLE2_CELL = ("resnet18", "linear", 1.0)  # Table 2's models: ResNet18, linear, 100% of Shenzhen


# --------------------------------------------------------------------------- look-up


def fraction_key(fraction: float) -> float:
    """A label fraction as the tables key it (tags hold ``str(float)``; this absorbs float noise)."""
    return round(float(fraction), 6)


def task_key(task: str) -> str:
    """``Pleural Effusion``, ``pleural_effusion`` and ``pleural-effusion`` all name one finding."""
    return re.sub(r"[^a-z0-9]", "", task.lower())


def lookup(table: Mapping[tuple, Published], *key) -> Published | None:
    """``table[key]`` with the last element a label fraction; None where the paper has no number."""
    *head, fraction = key
    for k, v in table.items():
        if tuple(k[:-1]) == tuple(head) and fraction_key(k[-1]) == fraction_key(fraction):
            return v
    return None


def competition(task: str, protocol: str, fraction: float) -> Mapping[str, Published] | None:
    """Appendix Table 4 (``linear``) or 5 (``e2e``) for one task and fraction; None if the paper has none."""
    for (t, p, f), values in COMPETITION.items():
        if task_key(t) == task_key(task) and p == protocol and fraction_key(f) == fraction_key(fraction):
            return values
    return None


def table2(lr: float) -> Published | None:
    """Table 2's AUC at pretraining learning rate ``lr``; None for a rate the paper did not try."""
    for rate, value in TABLE2.items():
        if lr > 0 and abs(math.log10(lr) - math.log10(rate)) < 1e-6:
            return value
    return None
