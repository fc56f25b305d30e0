"""Uplift and opt-out models learned from the engine's own log, and how to judge them.

Training rows come from ``models.attribution``: one per (decision, answering offer) with a
closed attribution window. Features are the ranker's (the decision's logged context, its
trigger, the offer one-hot), so a model serves through the same feature builder.

* ``fit_t_learner``: two boosters, one on the rows where the offer was delivered (P(convert |
  offer, x)) and one on the rows where no offer reached the customer (control group,
  randomized no-action arm, NO_ACTION chosen: P(convert | no action, x)); uplift is their
  difference. Plus an opt-out booster on the delivered rows (P(opt-out | contact, x)).
  With ``calibrate``, the uplift is recalibrated per offer (``calibration_lines``): the
  difference of two noisy models is noisier than either, and deciding on it picks the rows
  whose uplift it overstates most (the winner's curse); a line fitted on out-of-fold
  predictions against doubly robust pseudo-outcomes of the randomized arms pulls it back to
  what the log supports (``docs/benchmarks.md``, "Which uplift learner decides best").
* ``fit_s_learner``: one booster with the treatment as a feature; uplift is its answer with
  the feature at 1 minus at 0. Kept as the comparison that chose the T-learner (see
  docs/benchmarks.md, "Uplift models").

Judged on a randomized holdout: among decisions whose policy would send offer o, the control
group is a random share that got nothing, so (treated, control) rows of the same would-be
offer form an experiment. ``qini`` sorts them by predicted uplift and measures how much more
conversion the top of the list gains over random targeting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost as xgb

from engine.decision.catalog import NO_ACTION
from engine.decision.features import FeatureSpec
from models.training import features_of
from models.training import fit as fit_booster

#: rows where no offer reached the customer: what P(convert | no action) learns from
UNTREATED_ARMS = ("control", "no_action_arm", "no_action")


@dataclass(frozen=True)
class UpliftRows:
    """Training rows: features of (decision, offer) pairs and their outcomes."""

    features: np.ndarray
    treated: np.ndarray
    converted: np.ndarray
    opted_out: np.ndarray
    arm: np.ndarray
    ts: np.ndarray
    action: np.ndarray  # the decision's action (the would-be offer for the control group)
    offer: np.ndarray
    customer_key: np.ndarray
    probability: np.ndarray  # the logged probability of the decision's action

    def take(self, rows: np.ndarray) -> UpliftRows:
        return UpliftRows(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def uplift_rows(decisions: pa.Table, pairs: pa.Table, spec: FeatureSpec) -> UpliftRows:
    """The known pairs of ``pairs`` (``models.attribution.attribute``) of the arms that say
    something about an offer's effect: delivered, or no offer at all."""
    arm = np.asarray(pairs.column("arm").to_numpy(zero_copy_only=False), dtype=object)
    known = np.asarray(pairs.column("known").to_numpy(zero_copy_only=False), dtype=bool)
    keep = np.flatnonzero(known & np.isin(arm, ("offer", *UNTREATED_ARMS)))
    pairs = pairs.take(pa.array(keep))
    rows = decisions.take(pa.array(pairs.column("row").to_numpy()))
    offer = np.asarray(pairs.column("offer_id").to_numpy(zero_copy_only=False), dtype=object)
    return UpliftRows(
        features=features_of(rows, spec, offer),
        treated=np.asarray(pairs.column("treated").to_numpy(zero_copy_only=False), bool),
        converted=np.asarray(pairs.column("converted").to_numpy(zero_copy_only=False), bool),
        opted_out=np.asarray(pairs.column("opted_out").to_numpy(zero_copy_only=False), bool),
        arm=arm[keep],
        ts=rows.column("ts").cast(pa.int64()).to_numpy(),
        action=np.asarray(rows.column("action").to_numpy(zero_copy_only=False), dtype=object),
        offer=offer,
        customer_key=np.asarray(pairs.column("customer_key").to_numpy(), dtype=np.uint64),
        probability=np.asarray(pairs.column("probability").to_numpy(), dtype=np.float64),
    )


def _intercepts(document: dict[str, Any]) -> list[float]:
    """A booster's intercepts (probabilities), written "[0.5]", "0.5" or "[0.5,0.2]"."""
    text = str(document["learner"]["learner_model_param"]["base_score"]).strip("[]")
    return [float(t) for t in text.split(",")]


def _mergeable(document: dict[str, Any]) -> bool:
    learner = document["learner"]
    param = learner["learner_model_param"]
    return (
        learner["objective"]["name"] == "binary:logistic"
        and learner["gradient_booster"]["name"] == "gbtree"
        and int(param.get("num_target", 1)) == 1
        and int(param.get("num_class", 0)) == 0
        and len(_intercepts(document)) == 1
    )


def merge_boosters(boosters: list[xgb.Booster], probe_seed: int = 0) -> xgb.Booster | None:
    """One booster whose k-th output is ``boosters[k]``'s probability: XGBoost's multi-target
    layout (``num_target``, one intercept per target, each tree tagged with its target in
    ``tree_info``), so an uplift model's three boosters are scored in one ``inplace_predict``
    (one pass over the rows, one call's overhead) instead of three. None when they cannot be
    merged (another objective or booster type, other features) or when the merged booster
    does not answer a probe of random rows as the three do (a model format this code does not
    know): the caller then scores them one by one."""
    if len(boosters) < 2:
        return None
    documents = [json.loads(b.save_raw("json")) for b in boosters]
    if not all(_mergeable(d) for d in documents):
        return None
    params = [d["learner"]["learner_model_param"] for d in documents]
    names = [d["learner"].get("feature_names") for d in documents]
    if any(p["num_feature"] != params[0]["num_feature"] for p in params) or any(
        n != names[0] for n in names
    ):
        return None
    base = [_intercepts(d)[0] for d in documents]
    width = int(params[0]["num_feature"])
    forests = [d["learner"]["gradient_booster"]["model"]["trees"] for d in documents]
    merged = documents[0]  # the first booster's document becomes the joint one's
    model = merged["learner"]["gradient_booster"]["model"]
    trees: list[dict[str, Any]] = []
    info: list[int] = []
    bounds = [0]
    for round_ in range(max(len(f) for f in forests)):  # round by round, as XGBoost lays out
        for target, forest in enumerate(forests):
            if round_ < len(forest):
                trees.append({**forest[round_], "id": len(trees)})
                info.append(target)
        bounds.append(len(trees))
    model["trees"], model["tree_info"], model["iteration_indptr"] = trees, info, bounds
    model["gbtree_model_param"]["num_trees"] = str(len(trees))
    param = merged["learner"]["learner_model_param"]
    param["num_target"] = str(len(boosters))
    param["base_score"] = "[" + ",".join(repr(b) for b in base) + "]"
    joint = xgb.Booster()
    joint.load_model(bytearray(json.dumps(merged).encode()))
    rng = np.random.default_rng(probe_seed)
    probe = rng.normal(0.0, 3.0, (64, width)).astype(np.float32)
    probe[:, : width // 2] = np.round(probe[:, : width // 2])  # one-hot-like columns too
    probe[rng.random(probe.shape) < 0.1] = np.nan  # and missing values
    apart = np.stack([np.asarray(b.inplace_predict(probe)) for b in boosters], axis=1)
    together = np.asarray(joint.inplace_predict(probe)).reshape(apart.shape)
    if not np.allclose(apart, together, rtol=0, atol=1e-6):
        return None
    return joint


class Arms:
    """A model's boosters scored together: [P(convert | offer)] for a response model, and
    [P(convert | offer), P(convert | no action), P(opt-out | contact)] for an uplift model,
    whose three boosters are merged into one when they can be (``merge_boosters``)."""

    def __init__(self, boosters: list[xgb.Booster]) -> None:
        self.boosters = boosters
        self.joint = merge_boosters(boosters)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        if self.joint is None:
            return [np.asarray(b.inplace_predict(x)) for b in self.boosters]
        both = np.asarray(self.joint.inplace_predict(x)).reshape(x.shape[0], len(self.boosters))
        return [both[:, k] for k in range(len(self.boosters))]


#: a calibration line per offer id: calibrated uplift = intercept + slope x predicted uplift
Lines = dict[str, tuple[float, float]]
#: rows of the randomized arms an offer needs before its uplift is recalibrated
MIN_CALIBRATION_ROWS = 200
CALIBRATION_FOLDS = 2


def calibrate(
    p1: np.ndarray, p0: np.ndarray, x: np.ndarray, names: tuple[str, ...], lines: Lines
) -> np.ndarray:
    """P(convert | offer) moved so the uplift over ``p0`` follows each offer's line (rows of
    offers without one, or of features without the offer's column, stay as they are)."""
    if not lines:
        return p1
    out = np.array(p1, dtype=np.float64, copy=True)
    index = {n: i for i, n in enumerate(names)}
    for offer, (intercept, slope) in lines.items():
        column = index.get(f"offer={offer}")
        if column is None:
            continue
        rows = x[:, column] == 1
        out[rows] = p0[rows] + intercept + slope * (out[rows] - p0[rows])
    return np.clip(out, 0.0, 1.0)


@dataclass
class TLearner:
    """P(convert | offer, x), P(convert | no action, x), P(opt-out | contact, x); ``lines``
    recalibrate the uplift (``calibrate``) of feature rows laid out as ``names``."""

    treated: xgb.Booster
    baseline: xgb.Booster
    opt_out: xgb.Booster
    names: tuple[str, ...] = ()
    lines: Lines = field(default_factory=dict)
    #: with calibration, the fold models: ``folds[k]`` was trained without the customers of
    #: fold k (``fold_of``), so it predicts them out of fold
    folds: list[TLearner] = field(default_factory=list)

    def raw(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(  # type: ignore[return-value]
            np.asarray(b.inplace_predict(x), dtype=np.float64)
            for b in (self.treated, self.baseline, self.opt_out)
        )

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p1, p0, out = self.raw(x)
        return calibrate(p1, p0, x, self.names, self.lines), p0, out

    def uplift(self, x: np.ndarray) -> np.ndarray:
        p1, p0, _ = self.predict(x)
        return p1 - p0

    def out_of_fold(
        self, x: np.ndarray, customer_keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uncalibrated probabilities of rows of the training customers, each from the fold
        model that did not see its customer (requires ``folds``)."""
        if not self.folds:
            raise ValueError("no fold models: fit with calibrate=True")
        fold = fold_of(customer_keys)
        out = tuple(np.zeros(fold.size) for _ in range(3))
        for k, part in enumerate(self.folds):
            inside = fold == k
            if inside.any():
                for column, p in zip(out, part.raw(x[inside]), strict=True):
                    column[inside] = p
        return out  # type: ignore[return-value]


def fold_of(customer_keys: np.ndarray) -> np.ndarray:
    """Each customer's calibration fold."""
    keys = np.asarray(customer_keys, dtype=np.uint64)
    return (keys % np.uint64(CALIBRATION_FOLDS)).astype(np.int64)


def _fit_three(
    data: UpliftRows, names: tuple[str, ...], rounds: int, seed: int, params: dict[str, Any] | None
) -> TLearner:
    t = data.treated
    fit = [(data.converted, t), (data.converted, ~t), (data.opted_out, t)]
    treated, baseline, opt_out = (
        fit_booster(data.features[rows], y[rows].astype(np.float32), names, rounds, params, seed)
        for y, rows in fit
    )
    return TLearner(treated, baseline, opt_out, names=tuple(names))


def calibration_lines(
    data: UpliftRows, uplift: np.ndarray, p1: np.ndarray, p0: np.ndarray
) -> Lines:
    """Per offer, the least-squares line from predicted uplift to the doubly robust
    pseudo-outcome of the randomized arms:

        gamma = uplift + [delivered] (y - p1) / p - [NO_ACTION] (y - p0) / p

    with ``p`` the logged probability of the decision's action. Its mean given the features
    is the true uplift (for any predictions, when the logged probabilities are right), so the
    line says how much of the predicted uplift is real. Rows of the control group (random by
    customer, not by decision) and of decisions that sent another offer stay out; an offer
    with fewer than ``MIN_CALIBRATION_ROWS`` rows gets no line."""
    held = ~data.treated & (data.action == NO_ACTION) & (data.arm != "control")
    usable = data.treated | held
    w = 1.0 / np.maximum(data.probability, 1e-6)
    residual = data.converted - np.where(data.treated, p1, p0)
    gamma = uplift + np.where(data.treated, 1.0, -1.0) * w * residual
    lines: Lines = {}
    for offer in sorted(set(data.offer[usable].tolist())):
        rows = usable & (data.offer == offer)
        if rows.sum() < MIN_CALIBRATION_ROWS or np.ptp(uplift[rows]) == 0:
            continue
        slope, intercept = np.polyfit(uplift[rows], gamma[rows], 1)
        lines[str(offer)] = (float(intercept), float(slope))
    return lines


def fit_t_learner(
    data: UpliftRows,
    names: tuple[str, ...],
    rounds: int = 150,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    calibrate: bool = False,
) -> TLearner:
    """The three boosters; ``params`` override ``models.training.DEFAULT_PARAMS``. With
    ``calibrate``, ``CALIBRATION_FOLDS`` more T-learners, each trained without one fold of
    customers, predict that fold, and ``calibration_lines`` of those out-of-fold predictions
    recalibrate the model trained on all rows (lines fitted on models trained on less data:
    if anything, they pull its uplift back further than it needs). The fold models stay on
    the model (``folds``, not registered) for ``models.incremental.screen_offers``."""
    model = _fit_three(data, names, rounds, seed, params)
    if not calibrate:
        return model
    fold = fold_of(data.customer_key)
    if np.unique(fold).size < CALIBRATION_FOLDS:
        return model
    folds = [
        _fit_three(data.take(np.flatnonzero(fold != k)), names, rounds, seed, params)
        for k in range(CALIBRATION_FOLDS)
    ]
    model.folds = folds
    p1, p0, _ = model.out_of_fold(data.features, data.customer_key)
    model.lines = calibration_lines(data, p1 - p0, p1, p0)
    return model


@dataclass
class SLearner:
    """One booster with the treatment as its last feature."""

    booster: xgb.Booster

    def uplift(self, x: np.ndarray) -> np.ndarray:
        on = np.column_stack([x, np.ones(len(x), np.float32)])
        off = np.column_stack([x, np.zeros(len(x), np.float32)])
        return np.asarray(self.booster.inplace_predict(on) - self.booster.inplace_predict(off))


def fit_s_learner(
    data: UpliftRows, names: tuple[str, ...], rounds: int = 150, seed: int = 0
) -> SLearner:
    x = np.column_stack([data.features, data.treated.astype(np.float32)])
    labels = data.converted.astype(np.float32)
    return SLearner(fit_booster(x, labels, (*names, "treated"), rounds, seed=seed))


def randomized(data: UpliftRows) -> np.ndarray:
    """Rows of the experiment the control group makes: for each decision that would send an
    offer, its row for that offer, treated unless the customer is in the control group."""
    would = data.action == data.offer
    return np.flatnonzero(would & ((data.arm == "offer") | (data.arm == "control")))


def qini(score: np.ndarray, treated: np.ndarray, converted: np.ndarray) -> dict[str, float]:
    """The Qini coefficient and the area under the uplift curve of targeting by ``score``.

    Rows sorted by score, highest first; at each depth k the Qini curve is the conversions of
    the treated among the top k minus those of the control among them scaled to the treated's
    number: ``Q(k) = Y_t(k) - Y_c(k) N_t(k) / N_c(k)``. ``qini`` is the mean distance between
    the curve and the straight line of random targeting, per row (0: no better than random);
    ``auuc`` the mean of Q(k)/k (the uplift per targeted row, averaged over depths); both grow
    with a better ranking. ``uplift`` is the overall difference in conversion rates."""
    order = np.argsort(-np.asarray(score), kind="stable")
    t = np.asarray(treated, dtype=bool)[order]
    y = np.asarray(converted, dtype=float)[order]
    n_t, n_c = np.cumsum(t), np.cumsum(~t)
    y_t, y_c = np.cumsum(y * t), np.cumsum(y * ~t)
    curve = y_t - np.where(n_c > 0, y_c * n_t / np.maximum(n_c, 1), 0.0)
    n = curve.size
    if n == 0 or n_t[-1] == 0 or n_c[-1] == 0:
        return {"qini": float("nan"), "auuc": float("nan"), "uplift": float("nan"), "rows": n}
    k = np.arange(1, n + 1)
    random = curve[-1] * k / n
    return {
        "qini": float((curve - random).mean() / n),
        "auuc": float((curve / k).mean()),
        "uplift": float(y_t[-1] / n_t[-1] - y_c[-1] / n_c[-1]),
        "rows": int(n),
    }
