"""Calibration: gates set from the user's own labelled images, not from a magic number.

Two kinds of labels:

* good/bad labels -> :func:`fit_threshold` picks the threshold on the combined score that agrees best
  with them (balanced accuracy, so a folder of mostly good images cannot win by passing everything);
  with several parts, :func:`fit_weights` first fits how they combine (logistic regression).
* pairwise preferences ("A is better than B") -> :func:`fit_weights_pairwise` fits the part weights
  (a Bradley–Terry model) and reports how many pairs they order as the user did.

A folder on disk (:func:`load_labelled_folder`, :func:`load_pairs`) is laid out as ``good/`` and
``bad/`` subfolders, or a ``labels.csv`` (``file,label[,prompt]``), or a ``pairs.csv``
(``winner,loser[,prompt]``); prompts come from that column, a ``prompts.json`` mapping file names
to prompts, or one prompt for all. A threshold belongs to the model that scored it: every fit
records the model's name.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from quality.scores import ScoreWeights

__all__ = [
    "IMAGE_SUFFIXES",
    "LabelledImage",
    "PairwiseFit",
    "PreferencePair",
    "ThresholdFit",
    "WeightsFit",
    "fit_threshold",
    "fit_weights",
    "fit_weights_pairwise",
    "load_labelled_folder",
    "load_pairs",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_GOOD = {"good", "1", "true", "yes", "pass", "keep"}
_BAD = {"bad", "0", "false", "no", "fail", "reject"}
#: Parts whose weights calibration may fit, and the sign each enters the combined score with.
_SIGNS = {"alignment": 1.0, "negative": -1.0, "aesthetic": 1.0}


@dataclass(frozen=True, slots=True)
class ThresholdFit:
    """The gate ``value >= threshold`` that agrees best with good/bad labels."""

    threshold: float
    agreement: float  # share of images the gate labels as the user did
    balanced_agreement: float  # mean of the agreement on good and on bad images
    auc: float  # chance a random good image outscores a random bad one (ties count half)
    n_good: int
    n_bad: int
    false_pass: int  # bad images the gate would pass
    false_reject: int  # good images the gate would reject
    model: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"threshold": self.threshold, "agreement": self.agreement,
                "balanced_agreement": self.balanced_agreement, "auc": self.auc, "n_good": self.n_good,
                "n_bad": self.n_bad, "false_pass": self.false_pass, "false_reject": self.false_reject,
                "model": self.model}


@dataclass(frozen=True, slots=True)
class WeightsFit:
    """Part weights fitted to good/bad labels, with the threshold on the re-weighted score."""

    weights: ScoreWeights
    threshold: ThresholdFit
    before: ThresholdFit  # the same labels gated with the weights the scores were made with

    def to_dict(self) -> dict[str, object]:
        return {"weights": self.weights.as_dict(), "threshold": self.threshold.to_dict(),
                "before": self.before.to_dict()}


@dataclass(frozen=True, slots=True)
class PairwiseFit:
    """Part weights fitted to preferences, and how many pairs each ordering gets right."""

    weights: ScoreWeights
    agreement: float  # pairs the fitted weights order as the user did (ties count half)
    agreement_before: float  # the same with the weights the scores were made with
    n_pairs: int
    parts: tuple[str, ...] = field(default=())
    model: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"weights": self.weights.as_dict(), "agreement": self.agreement,
                "agreement_before": self.agreement_before, "n_pairs": self.n_pairs,
                "parts": list(self.parts), "model": self.model}


def _auc(good: npt.NDArray[np.float64], bad: npt.NDArray[np.float64]) -> float:
    if not len(good) or not len(bad):
        return float("nan")
    diff = good[:, None] - bad[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def fit_threshold(scores: Sequence[float], labels: Sequence[bool], *, model: str = "") -> ThresholdFit:
    """The threshold with the best balanced agreement; among equals, the widest gap's midpoint."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be two sequences of the same length")
    if not y.any() or y.all():
        raise ValueError("calibration needs at least one good and one bad image")
    values = np.unique(s)
    candidates = np.concatenate(([values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]))
    gaps = np.concatenate(([0.0], np.diff(values), [0.0]))
    best: tuple[float, float, float] | None = None
    for t, gap in zip(candidates, gaps, strict=True):
        passed = s >= t
        bal = (passed[y].mean() + (~passed[~y]).mean()) / 2
        key = (float(bal), float(gap), -abs(float(t)))
        if best is None or key > best:
            best = key
            threshold = float(t)
    passed = s >= threshold
    return ThresholdFit(
        threshold=threshold,
        agreement=float((passed == y).mean()),
        balanced_agreement=float((passed[y].mean() + (~passed[~y]).mean()) / 2),
        auc=_auc(s[y], s[~y]),
        n_good=int(y.sum()),
        n_bad=int((~y).sum()),
        false_pass=int((passed & ~y).sum()),
        false_reject=int((~passed & y).sum()),
        model=model,
    )


def _logistic(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], *, intercept: bool,
              l2: float = 1e-2, iterations: int = 100) -> npt.NDArray[np.float64]:
    """Newton's method for L2-regularised logistic regression; returns the coefficients (bias last)."""
    if intercept:
        x = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    if intercept:
        reg[-1] = 1e-8
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / len(y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def _parts_matrix(parts: Sequence[Mapping[str, float]], names: Sequence[str]) -> npt.NDArray[np.float64]:
    return np.array([[float(p.get(n, 0.0)) for n in names] for p in parts], dtype=np.float64)


def _weights_from_coef(names: Sequence[str], coef: npt.NDArray[np.float64], like: ScoreWeights) -> ScoreWeights:
    signed = {n: float(c) * _SIGNS[n] for n, c in zip(names, coef, strict=True)}
    # Keep the combined score on CLIPScore's scale: alignment weighs 1 when it helps at all.
    scale = signed.get("alignment", 0.0)
    if scale <= 0:
        scale = sum(abs(v) for v in signed.values()) or 1.0
    values = like.as_dict()
    values.update({n: v / scale for n, v in signed.items()})
    return ScoreWeights.from_mapping(values)


def _present_parts(parts: Sequence[Mapping[str, float]]) -> list[str]:
    return [n for n in _SIGNS if any(n in p for p in parts)]


def fit_weights(
    parts: Sequence[Mapping[str, float]], labels: Sequence[bool], *,
    current: ScoreWeights | None = None, model: str = "",
) -> WeightsFit:
    """Fit part weights to good/bad labels (logistic regression), then the threshold on the result."""
    current = current or ScoreWeights()
    names = _present_parts(parts)
    if not names:
        raise ValueError("no model parts to weigh (did every image fail the technical checks?)")
    x = _parts_matrix(parts, names)
    y = np.asarray(labels, dtype=np.float64)
    coef = _logistic(x, y, intercept=True)[:-1]
    weights = _weights_from_coef(names, coef, current)
    new_scores = [weights.combine({n: p[n] for n in names if n in p})[0] for p in parts]
    old_scores = [current.combine({n: p[n] for n in names if n in p})[0] for p in parts]
    return WeightsFit(weights, fit_threshold(new_scores, labels, model=model),
                      fit_threshold(old_scores, labels, model=model))


def _pair_agreement(diff: npt.NDArray[np.float64]) -> float:
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / len(diff)) if len(diff) else float("nan")


def fit_weights_pairwise(
    winners: Sequence[Mapping[str, float]], losers: Sequence[Mapping[str, float]], *,
    current: ScoreWeights | None = None, model: str = "",
) -> PairwiseFit:
    """Fit part weights so the preferred image of each pair scores higher (Bradley–Terry)."""
    if len(winners) != len(losers) or not winners:
        raise ValueError("pairwise calibration needs as many winners as losers, at least one pair")
    current = current or ScoreWeights()
    names = _present_parts([*winners, *losers])
    if not names:
        raise ValueError("no model parts to weigh (did every image fail the technical checks?)")
    diff = _parts_matrix(winners, names) - _parts_matrix(losers, names)
    # Each pair both ways round, so the fit has two classes and no intercept is needed.
    x = np.vstack([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    coef = _logistic(x, y, intercept=False)
    weights = _weights_from_coef(names, coef, current)

    def margins(w: ScoreWeights) -> npt.NDArray[np.float64]:
        signed = w.combine(dict.fromkeys(names, 0.0))[1]
        out: npt.NDArray[np.float64] = diff @ np.array([signed[n] for n in names])
        return out

    return PairwiseFit(weights, _pair_agreement(margins(weights)), _pair_agreement(margins(current)),
                       len(diff), tuple(names), model)


# -- folders on disk --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelledImage:
    path: Path
    good: bool
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class PreferencePair:
    winner: Path
    loser: Path
    prompt: str | None = None


def _parse_label(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in _GOOD:
        return True
    if value in _BAD:
        return False
    raise ValueError(f"{where}: label {text!r} is neither good ({sorted(_GOOD)}) nor bad ({sorted(_BAD)})")


def _prompts_json(folder: Path) -> dict[str, str]:
    path = folder / "prompts.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping file names to prompts")
    return {str(k): str(v) for k, v in data.items()}


def _prompt_for(folder: Path, path: Path, column: str | None, prompts: Mapping[str, str]) -> str | None:
    if column:
        return column
    rel = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path.name
    return prompts.get(rel) or prompts.get(path.name)


def load_labelled_folder(folder: str | Path) -> list[LabelledImage]:
    """Good/bad images from ``labels.csv`` or from ``good/`` and ``bad/`` subfolders."""
    folder = Path(folder)
    prompts = _prompts_json(folder)
    labels_csv = folder / "labels.csv"
    out: list[LabelledImage] = []
    if labels_csv.is_file():
        with labels_csv.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                path = (folder / row["file"]).resolve()
                good = _parse_label(row["label"], f"{labels_csv}:{n}")
                out.append(LabelledImage(path, good, _prompt_for(folder, path, row.get("prompt"), prompts)))
        return out
    for sub, good in (("good", True), ("bad", False)):
        for path in sorted((folder / sub).glob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                out.append(LabelledImage(path, good, _prompt_for(folder, path, None, prompts)))
    if not out:
        raise ValueError(f"{folder}: no labels.csv, and no images under good/ and bad/")
    return out


def load_pairs(folder: str | Path) -> list[PreferencePair]:
    """Preferences from ``pairs.csv`` (``winner,loser[,prompt]``, paths relative to the folder)."""
    folder = Path(folder)
    prompts = _prompts_json(folder)
    path = folder / "pairs.csv"
    with path.open(newline="", encoding="utf-8") as f:
        pairs = []
        for row in csv.DictReader(f):
            winner, loser = (folder / row["winner"]).resolve(), (folder / row["loser"]).resolve()
            pairs.append(PreferencePair(winner, loser, _prompt_for(folder, winner, row.get("prompt"), prompts)))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs
