"""The paper's reported results (docs/method.md §8): test kNN@20 / linear-probe top-1 (%), to print beside ours."""

from __future__ import annotations

from dataclasses import dataclass

from hamjepa.methods import Method

HAMJEPA, SIGREG, MLP = Method.HAMJEPA, Method.SIGREG, Method.MLP

# The table's columns: (method, readout). SIGReg's column is its full vector unless a row says otherwise.
COLUMNS = ((SIGREG, "qp"), (HAMJEPA, "q"), (HAMJEPA, "p"), (HAMJEPA, "qp"))
COLUMN_TITLES = ("SIGReg", "HamJEPA q", "HamJEPA p", "HamJEPA qp")
DATASET_TITLES = {"cifar100": "CIFAR-100", "imagefolder": "ImageNet-100", "cifar10": "CIFAR-10",
                  "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's table: the predictor family it reports, its setting, and (kNN@20, probe) cells."""

    family: Method  # HAMJEPA (the SIGReg and HamJEPA columns) or MLP (MLP-HJEPA in the HamJEPA columns)
    dataset: str
    epochs: int
    seeds: int | None  # None where the paper does not say
    cells: dict[str, tuple[float, float]]  # readout -> (kNN@20, linear probe); SIGREG -> SIGReg's
    sigreg_readout: str = "qp"  # ImageNet-100's SIGReg numbers are of the q half

    @property
    def title(self) -> str:
        seeds = f", {self.seeds} seeds" if self.seeds else ""
        prefix = "MLP-HJEPA, " if self.family == MLP else ""
        return f"{prefix}{DATASET_TITLES[self.dataset]}, {self.epochs} ep{seeds}"


PAPER_ROWS = (
    PaperRow(HAMJEPA, "cifar100", 30, 3, {SIGREG: (26.56, 30.43), "q": (31.45, 33.95), "p": (29.71, 33.07),
                                             "qp": (30.88, 34.18)}),
    PaperRow(HAMJEPA, "cifar100", 80, None, {SIGREG: (27.98, 33.95), "q": (34.43, 44.59), "p": (32.96, 44.44),
                                                "qp": (33.66, 44.52)}),
    PaperRow(MLP, "cifar100", 80, None, {"q": (28.10, 42.26), "p": (28.30, 41.90), "qp": (28.15, 42.77)}),
    PaperRow(HAMJEPA, "imagefolder", 45, None, {SIGREG: (20.10, 24.40), "q": (24.92, 31.92),
                                                   "p": (24.72, 32.08), "qp": (24.64, 32.04)}, sigreg_readout="q"),
)


def reference_row(family: str, dataset: str, epochs: int) -> tuple[PaperRow | None, str]:
    """The paper's row to print beside ours, and a caveat ("" when it is the same setting).

    Same dataset and epochs if the paper has it; else the same family on the nearest epochs of the same
    dataset; else (another dataset, e.g. the quick profile) CIFAR-100 at the nearest epochs, as a yardstick.
    """
    rows = [r for r in PAPER_ROWS if r.family == family]
    candidates = [r for r in rows if r.dataset == dataset] or [r for r in rows if r.dataset == "cifar100"]
    if not candidates:
        return None, ""
    row = min(candidates, key=lambda r: abs(r.epochs - epochs))
    if row.dataset != dataset:
        return row, "another dataset: a yardstick only"
    return row, "" if row.epochs == epochs else f"the paper's nearest schedule to our {epochs} ep"
