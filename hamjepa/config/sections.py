"""The config tree: frozen dataclasses, one per section, the single source of defaults.

Every default below is the paper's CIFAR-100 protocol (docs/method.md, numbers in brackets there) unless a
comment says otherwise. Validation happens at construction: a bad value raises ConfigError with one sentence
that names the dotted field, quotes the value and says what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from hamjepa.config.tree import build, check, fail, flatten_dict, set_dotted
from hamjepa.methods import Method, spec

MAX_SEED = 2**32 - 1  # numpy's and Optuna's seeds are 32-bit; a run derives its seeds from these
# Upper bounds that keep one run finite: a value past them is a typo (an extra digit), not an experiment, and would
# start a run that never ends or never fits, so it is refused before any work.
# Leapfrog steps: each is one gradient evaluation of the potential per prediction; the paper uses 2, and 64 (32x its
# cost, a horizon of 64 * dt) is already far past where the curriculum studies the horizon.
MAX_LEAPFROG_STEPS = 64
# Epochs: the longest self-supervised schedules published run 1,000 epochs; ten times that is no schedule anyone
# trains, and at the paper's protocol would take years on one GPU.
MAX_EPOCHS = 10_000
# Training images: no dataset this project loads has more than 100 million (ImageNet-21k has 14 million); the real
# cap, the dataset's own size, is checked once the data is found (train/launch.preflight).
MAX_SUBSET = 100_000_000
# Global batch: twice the largest self-supervised batch published (32,768); past that one step's activations fit
# no accelerator, and the batch must still fit the training split (checked at preflight).
MAX_BATCH = 65_536
# Workers of one run: the global batch is split among them with at least 2 images each, so MAX_BATCH / 2; no
# cluster this project targets has more accelerators.
MAX_WORKERS = MAX_BATCH // 2
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENT_PLACEMENTS = ("auto", "device", "loader")  # data.augment_on
# Channel count of the datasets whose format we know, and what choosing one (--dataset) implies.
DATASET_CHANNELS = {"fashion_mnist": 1, "cifar10": 3, "cifar100": 3}
DATASET_OVERRIDES = {
    "fashion_mnist": {"data.image_size": 28, "encoder.in_channels": 1},
    "cifar10": {"data.image_size": 32, "encoder.in_channels": 3},
    "cifar100": {"data.image_size": 32, "encoder.in_channels": 3},
}


class _Section:
    """Mixin: a config section knows its dotted name, so errors can name the full field path."""

    section: ClassVar[str] = ""

    def _path(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def _require(self, name: str, ok: bool, valid: str) -> None:
        check(ok, self._path(name), getattr(self, name), valid)

    def _non_negative(self, *names: str) -> None:
        for name in names:
            self._require(name, getattr(self, name) >= 0, "must be >= 0")

    def _positive(self, *names: str) -> None:
        for name in names:
            self._require(name, getattr(self, name) > 0, "must be > 0")

    def _one_of(self, name: str, choices: tuple[str, ...]) -> None:
        self._require(name, getattr(self, name) in choices, f"must be one of {', '.join(choices)}")


@dataclass(frozen=True)
class EncoderConfig(_Section):
    """ResNet-18 token encoder (docs/method.md §1)."""

    section: ClassVar[str] = "encoder"
    stem: str = "cifar"  # "cifar": 3x3 conv stride 1, no max-pool (32 px); "imagenet": 7x7/2 + max-pool
    readout: str = "layer3"  # which stage's feature map becomes the token grid
    width: float = 1.0  # channel multiplier on (64, 128, 256, 512); 0.25 makes CPU runs ~13x faster
    in_channels: int = 3  # 1 for Fashion-MNIST
    token_hw: int = 0  # average-pool the read-out to token_hw x token_hw; 0 keeps its native size
    token_dim: int = 32  # channels per token after the 1x1 conv; q and p get half each
    split: bool = True  # phase-space split (q, p); SIGReg ignores it for training

    def __post_init__(self) -> None:
        self._one_of("stem", ("cifar", "imagenet"))
        self._one_of("readout", ("layer2", "layer3", "layer4"))
        self._positive("width", "token_dim")
        self._require("in_channels", self.in_channels in (1, 3), "must be 1 (grey) or 3 (RGB)")
        self._require("width", self.width <= 16, "must be <= 16 (a multiplier on 64..512 channels)")
        self._non_negative("token_hw")
        if self.split:
            self._require("token_dim", self.token_dim % 2 == 0,
                          "must be even when encoder.split is true (q and p take half the channels each)")


@dataclass(frozen=True)
class PredictorConfig(_Section):
    """Learned separable Hamiltonian integrated by leapfrog (docs/method.md §2)."""

    section: ClassVar[str] = "predictor"
    hidden_dim: int = 256  # width of the potential MLP phi
    depth: int = 2  # hidden layers of phi
    base_coeff: float = 0.1  # alpha in V(q) = alpha/2 |q|^2 + s phi(q)
    residual_scale: float = 0.02  # s, reached after the warm-up
    residual_scale_warmup_epochs: int = 10  # s(epoch) = s * min(1, epoch / warmup), epochs from 1
    steps: int = 2  # leapfrog steps K
    dt: float = 0.05  # leapfrog step size, in time units per step (the prediction horizon is K * dt)
    curriculum_epochs: int = 0  # horizon curriculum: K rises linearly 1 -> steps over these epochs; 0 = off
    gradient: str = "closed_form"  # grad V: "closed_form" (one backward) or "autograd" (double backward)

    def __post_init__(self) -> None:
        self._require("hidden_dim", self.hidden_dim >= 1, "must be an integer >= 1")
        self._require("depth", self.depth >= 1, "must be an integer >= 1")
        self._require("steps", 1 <= self.steps <= MAX_LEAPFROG_STEPS,
                      f"must be an integer in [1, {MAX_LEAPFROG_STEPS}] (each step is a gradient evaluation)")
        self._require("dt", self.dt > 0, "must be > 0 (direction is chosen per call, not by the sign of dt)")
        self._non_negative("base_coeff", "residual_scale", "residual_scale_warmup_epochs", "curriculum_epochs")
        self._one_of("gradient", ("closed_form", "autograd"))


@dataclass(frozen=True)
class HamJEPALossConfig(_Section):
    """HamJEPA objective: weights, floors and energy budget (docs/method.md §3); the `mlp` ablation uses it too.

    Its section is `hamjepa_loss`: the objective's weights, not the method nor the package.
    """

    section: ClassVar[str] = "hamjepa_loss"
    match: str = "q"  # "q": MSE on q + p_weight * MSE on p;  "qp": MSE on the whole state
    p_weight: float = 0.2  # weight of the p term of the prediction loss (match "q")
    q_target: float = 1.0  # energy budget: target of E|q|^2/d
    p_target: float = 1.0  # energy budget: target of E|p|^2/d
    std_floor: float = 0.2  # gamma of the variance floor: the least std of each coordinate of q and of p
    logdet_floor: float = -1.5  # tau: the floor of logdet(C)/k, C the projected covariance (k dims)
    pr_floor_q: float = 0.12  # r0 for q: the floor of the participation ratio PR(C)/k
    pr_floor_p: float = 0.16  # r0 for p
    eigmax_ceiling_q: float = 0.35  # e_max for q: the ceiling of the top eigenvalue's share of trace(C)
    eigmax_ceiling_p: float = 0.30  # e_max for p
    spectral_dim: int = 128  # k = min(spectral_dim, d, 2B - 1): B images give 2B pooled states
    spectral_redraw_every: int = 16  # training steps between fresh random projections
    spectral_eps: float = 1e-4  # epsilon added to the projected covariance's diagonal
    # Weights of the five terms: L = w_pred L_pred + w_budget L_budget + w_var L_var + w_spectral L_spectral
    # + w_mean L_mean.
    w_pred: float = 1.0
    w_budget: float = 0.2
    w_var: float = 0.5
    w_spectral: float = 0.5
    w_mean: float = 0.05

    def __post_init__(self) -> None:
        self._one_of("match", ("q", "qp"))
        self._non_negative("p_weight", "q_target", "p_target", "std_floor", "w_pred", "w_budget", "w_var",
                           "w_spectral", "w_mean")
        self._positive("spectral_eps")
        for name in ("pr_floor_q", "pr_floor_p"):
            self._require(name, 0 <= getattr(self, name) <= 1, "must be in [0, 1] (a participation ratio per dim)")
        for name in ("eigmax_ceiling_q", "eigmax_ceiling_p"):
            self._require(name, 0 < getattr(self, name) <= 1, "must be in (0, 1] (a share of the trace)")
        self._require("spectral_dim", self.spectral_dim >= 1, "must be an integer >= 1")
        self._require("spectral_redraw_every", self.spectral_redraw_every >= 1, "must be an integer >= 1")


@dataclass(frozen=True)
class SIGRegConfig(_Section):
    """LeJEPA's SIGReg baseline (docs/method.md §4)."""

    section: ClassVar[str] = "sigreg"
    num_directions: int = 64  # random unit directions per step, each a 1-D Epps-Pulley test
    t_max: float = 3.0  # the Epps-Pulley knots span t in [0, t_max] (t: the characteristic function's argument)
    n_points: int = 9  # knots on [0, t_max], trapezoid rule
    weight: float = 0.02  # lambda

    def __post_init__(self) -> None:
        self._require("num_directions", self.num_directions >= 1, "must be an integer >= 1")
        self._positive("t_max")
        self._require("n_points", self.n_points >= 2, "must be an integer >= 2")
        self._non_negative("weight")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Dataset, subsets and splits (docs/method.md §10 "Splits"; docs/design.md "Defaults")."""

    section: ClassVar[str] = "data"
    dataset: str = "cifar100"
    root: str = ""  # "" = search --data-root, $HAMJEPA_DATA, Debian's dataset packages, then download
    download: bool = True  # let torchvision download when the files are missing and the network allows
    image_size: int = 32  # side of the stored and augmented images, in pixels
    subset: int = 0  # number of training images (stratified, seeded); 0 = all
    # Images held out from the training set (stratified, before the subset is drawn) to select on: 5,000 keep the
    # objective's binomial standard error <= 0.71 points (at 50% accuracy; 0.57 at 80%). 0 = none (fixed runs).
    val_size: int = 5000
    # Evaluate at most this many test images (stratified, seeded); 0 = the whole test split, as every study and the
    # paper do. It makes CI's smoke runs cheaper; accuracies on part of the test split compare with nothing else.
    test_limit: int = 0
    num_workers: int = 2  # DataLoader worker processes per training worker (loader placement, image folders)
    seed: int = 0  # subset and split seed (independent of the training seed, so splits stay fixed)
    # Where the two-view augmentation runs: "device" = in the training loop on the training device (in-memory
    # datasets held there as uint8), "loader" = in DataLoader worker processes, "auto" = device on a GPU and,
    # on a CPU, the placement measured faster there (data.feeds.CPU_AUTO_PLACEMENT, with the figures).
    augment_on: str = "auto"

    def __post_init__(self) -> None:
        self._one_of("dataset", DATASETS)
        self._one_of("augment_on", AUGMENT_PLACEMENTS)
        self._require("image_size", self.image_size >= 8, "must be an integer >= 8 (pixels)")
        self._non_negative("num_workers", "test_limit")
        self._require("subset", 0 <= self.subset <= MAX_SUBSET,
                      f"must be an integer in [0, {MAX_SUBSET}] (images; 0 = all)")
        self._non_negative("val_size")
        self._require("seed", 0 <= self.seed <= MAX_SEED, f"must be an integer in [0, {MAX_SEED}]")


@dataclass(frozen=True)
class AugmentConfig(_Section):
    """Two-view augmentation (docs/method.md §6)."""

    section: ClassVar[str] = "augment"
    # RandomResizedCrop's scale: a crop covers a fraction of the image's area drawn uniformly from [min, max].
    crop_scale_min: float = 0.3
    crop_scale_max: float = 1.0
    flip_p: float = 0.5  # probability of a horizontal flip
    # Colour jitter strengths, with ColorJitter's meaning: a factor drawn uniformly from [max(0, 1 - s), 1 + s]
    # scales brightness, contrast and saturation; the hue shifts by a draw from [-hue, hue] turns of the colour wheel.
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2  # ignored for one-channel images (no colour to saturate)
    hue: float = 0.1  # ignored for one-channel images
    jitter_p: float = 0.8  # probability that a view is colour-jittered at all
    grayscale_p: float = 0.2  # a no-op on one-channel images
    blur_kernel: int = 3  # side of the Gaussian kernel, in pixels of the output view (odd); 23 at 224 px
    blur_sigma_min: float = 0.1  # the blur's sigma is drawn uniformly from [min, max], in pixels of the output view
    blur_sigma_max: float = 2.0
    blur_p: float = 0.5
    solarize_threshold: float = 128.0  # pixels at or above it are inverted; on the 0-255 scale
    solarize_p: float = 0.2

    def __post_init__(self) -> None:
        self._require("crop_scale_min", 0 < self.crop_scale_min <= self.crop_scale_max,
                      "must be in (0, augment.crop_scale_max]")
        self._require("crop_scale_max", self.crop_scale_max <= 1, "must be <= 1")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            self._require(name, 0 <= getattr(self, name) <= 1, "must be a probability in [0, 1]")
        self._non_negative("brightness", "contrast", "saturation")
        self._require("hue", 0 <= self.hue <= 0.5, "must be in [0, 0.5]")
        self._require("blur_kernel", self.blur_kernel >= 1 and self.blur_kernel % 2 == 1,
                      "must be an odd integer >= 1")
        self._require("blur_sigma_min", 0 < self.blur_sigma_min <= self.blur_sigma_max,
                      "must be in (0, augment.blur_sigma_max]")
        self._require("solarize_threshold", 0 <= self.solarize_threshold <= 255, "must be in [0, 255]")


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Frozen-encoder evaluation (docs/method.md §7)."""

    section: ClassVar[str] = "eval"
    knn_k: int = 20  # neighbours that vote in kNN@k (the objective is val kNN@k)
    knn_train_limit: int = 5000  # per-epoch validation kNN uses at most this many training images
    # The objective after every epoch (what ASHA and the search read); False: at initialisation and after the last
    # epoch only, for runs nothing selects on (the compare phase sets it), which saves most of their evaluation.
    objective_every_epoch: bool = True
    # Every final readout at initialisation (epoch 0, under `init/`); False: the objective only. Search trials set
    # it: they all start from the base seed's encoder, so the full readouts would be the same numbers per trial
    # (the compare runs and the initialisation reference measure initialisation).
    initial_readouts: bool = True
    probe_epochs: int = 50  # epochs of the linear probe over the training split's features
    probe_lr: float = 1e-3  # AdamW's learning rate of the probe at its first step, cosine-decayed to 0 per step
    probe_weight_decay: float = 1e-6  # AdamW's decoupled weight decay of the probe
    probe_batch_size: int = 256  # images (feature vectors) per probe step
    spectrum_samples: int = 5000  # training images (a seeded subsample) whose features give the covariance spectrum
    spectrum_top: int = 256  # the largest eigenvalues kept for effective rank and participation ratio
    batch_size: int = 512  # images per feature-extraction batch

    def __post_init__(self) -> None:
        for name in ("knn_k", "knn_train_limit", "probe_epochs", "probe_batch_size", "spectrum_samples",
                     "spectrum_top", "batch_size"):
            self._require(name, getattr(self, name) >= 1, "must be an integer >= 1")
        self._positive("probe_lr")
        self._non_negative("probe_weight_decay")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """AdamW with linear warm-up and cosine decay, per iteration (docs/method.md §5)."""

    section: ClassVar[str] = "optim"
    # Peak learning rate, reached at the end of the warm-up, for the global batch optim.batch_size (not rescaled
    # when the batch or the worker count changes).
    lr: float = 5e-4
    weight_decay: float = 5e-4  # AdamW's decoupled decay on every parameter: each step scales weights by 1 - lr_t * wd
    batch_size: int = 512  # global batch in images (all workers together), drop last
    epochs: int = 30  # epochs of the training split (after data.subset and the validation hold-out)
    warmup_epochs: int = 10  # linear warm-up to lr, in epochs of the training split (stepped per iteration)
    warmup_start_ratio: float = 0.01  # warm-up starts at 0.01 * lr
    final_lr_ratio: float = 1e-3  # cosine ends at 1e-3 * lr
    # Max grad norm; 0 = off; null = the method's protocol (methods.METHODS: 1.0 for HamJEPA and MLP-HJEPA,
    # off for SIGReg, whose gradient norms run at 4-7 early on). A resolved config shows the applied value.
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        self._positive("lr")
        self._non_negative("weight_decay", "warmup_epochs")
        for name in ("warmup_start_ratio", "final_lr_ratio"):
            self._require(name, 0 <= getattr(self, name) <= 1, "must be in [0, 1] (a fraction of optim.lr)")
        self._require("grad_clip", self.grad_clip is None or 0 <= self.grad_clip < math.inf,
                      "must be a finite max grad norm >= 0 (0 = off), or null for the method's protocol")
        self._require("batch_size", 2 <= self.batch_size <= MAX_BATCH,
                      f"must be an integer in [2, {MAX_BATCH}] (images; at least 2 for batch statistics)")
        self._require("epochs", 1 <= self.epochs <= MAX_EPOCHS, f"must be an integer in [1, {MAX_EPOCHS}]")


@dataclass(frozen=True)
class ComputeConfig(_Section):
    """How the training device computes (not what it learns): each switch is off unless measured to help there
    (docs/results.md "Not measured yet: the GPU check": `python -m hamjepa.bench gpu` measures both)."""

    section: ClassVar[str] = "compute"
    channels_last: bool = False  # NHWC memory format for the model and its input views
    compile_encoder: bool = False  # torch.compile the encoder's forward (nn.Module.compile: state_dict keys stay)
    compile_predictor: bool = False  # torch.compile the predictor's rollout and the objective (same keys too)
    # Steps between the host's reads of the on-device divergence flag (the only host sync of the step loop; the
    # epoch's last step always reads it); 0 = 1% of the run's steps, so a diverged run stops within about 1% of
    # them. Which runs count as diverged, and in which epoch, does not depend on it.
    divergence_check_every: int = 0

    def __post_init__(self) -> None:
        self._non_negative("divergence_check_every")


@dataclass(frozen=True)
class Config(_Section):
    """The whole resolved configuration of one training run."""

    method: str = Method.HAMJEPA.value
    seed: int = 0
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    hamjepa_loss: HamJEPALossConfig = field(default_factory=HamJEPALossConfig)
    sigreg: SIGRegConfig = field(default_factory=SIGRegConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        self._one_of("method", tuple(Method))
        if spec(self.method).needs_split:
            self._require("method", self.encoder.split,
                          "needs encoder.split = true (the predictor acts on the (q, p) split)")
        self._require("seed", 0 <= self.seed <= MAX_SEED, f"must be an integer in [0, {MAX_SEED}]")
        expected = DATASET_CHANNELS.get(self.data.dataset)
        if expected is not None and self.encoder.in_channels != expected:
            fail("encoder.in_channels", self.encoder.in_channels,
                  f"data.dataset '{self.data.dataset}' has {expected} channel(s)")
        check(self.augment.blur_kernel // 2 < self.data.image_size, "augment.blur_kernel", self.augment.blur_kernel,
               f"must be below 2 * data.image_size = {2 * self.data.image_size} (reflect padding)")
        check(self.eval.knn_k <= self.eval.knn_train_limit, "eval.knn_k", self.eval.knn_k,
               f"must be <= eval.knn_train_limit = {self.eval.knn_train_limit} (the neighbours it searches)")

    @property
    def grad_clip(self) -> float:
        """The max grad norm a run of this config applies (0 = off): optim.grad_clip, else the method's."""
        return spec(self.method).grad_clip if self.optim.grad_clip is None else self.optim.grad_clip

    def resolved(self) -> Config:
        """This config with every method-dependent default (null) replaced by the value a run applies."""
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, grad_clip=self.grad_clip))

    # -- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The tree as set (a null keeps meaning "the method's protocol" through later overrides)."""
        return dataclasses.asdict(self)

    def flatten(self) -> dict[str, Any]:
        """Dotted keys -> applied values, e.g. {'predictor.steps': 2, ...}; the MLflow params of a run."""
        return flatten_dict(self.resolved().to_dict())

    def override(self, overrides: Mapping[str, Any]) -> Config:
        """A new Config with dotted-key overrides applied; string values are parsed as YAML scalars."""
        tree = self.to_dict()
        for key, value in overrides.items():
            set_dotted(tree, key, value)
        return Config.from_dict(tree)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> Config:
        """A Config from a (full or partial) nested mapping, e.g. a stored `to_dict()`; unknown keys are errors."""
        return build(tree, cls)

    def to_yaml(self) -> str:
        """The resolved tree (what a run applies) as YAML."""
        return yaml.safe_dump(self.resolved().to_dict(), sort_keys=False)


