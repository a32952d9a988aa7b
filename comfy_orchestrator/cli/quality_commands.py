"""``comfy-orch score`` and ``comfy-orch calibrate`` (the quality evaluator's commands)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from comfy_orchestrator.cli import main

_PARTS = ("alignment", "negative", "aesthetic")


def _parse_weights(values: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        name, sep, number = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected PART=WEIGHT, e.g. alignment=1.0")
        try:
            out[name.strip()] = float(number)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {number!r} is not a number") from None
    return out


def _evaluator(model: str, registry: Sequence[Path], device: str | None, precision: str | None,
               aesthetic_head: Path | None, weights: dict[str, float]) -> Any:
    from quality import ClipEvaluator, QualityError, Registry

    try:
        return ClipEvaluator(model, registry=Registry.load(*registry), device=device,
                             precision=precision,  # type: ignore[arg-type]
                             aesthetic_head=aesthetic_head, weights=weights or None)
    except (QualityError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def _model_options(f: Any) -> Any:
    f = click.option("--aesthetic-head", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="A LAION improved-aesthetic-predictor file (.pth) for this model's embeddings.")(f)
    f = click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]),
                     help="Default: fp16 on CUDA, fp32 on CPU.")(f)
    f = click.option("--device", help="cpu, cuda, cuda:1… (default: CUDA when present).")(f)
    f = click.option("--registry", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     multiple=True, help="An extra registry JSON (repeatable); its names override.")(f)
    f = click.option("--model", "-m", default=None,
                     help="Registry name (default: the production default, vit-l-14-openai).")(f)
    return f


def _run(coro: Any) -> Any:
    from quality import QualityError

    try:
        return asyncio.run(coro)
    except QualityError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompt", "-p", required=True, help="The prompt the images were generated from.")
@click.option("--negative", "-n", default=None, help="A negative prompt, scored as a penalty.")
@_model_options
@click.option("--weight", "-w", multiple=True, metavar="PART=W",
              help="Weight of a part in the combined score (alignment, negative, aesthetic).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file written by `calibrate --out`: its model, weights and threshold apply.")
@click.option("--threshold", type=float, default=None, help="Mark each image pass/fail at this value.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def score(images: tuple[Path, ...], prompt: str, negative: str | None, model: str | None,
          registry: tuple[Path, ...], device: str | None, precision: str | None,
          aesthetic_head: Path | None, weight: tuple[str, ...], calibration: Path | None,
          threshold: float | None, as_json: bool) -> None:
    """Score IMAGES against the prompt they were generated from."""
    from quality import DEFAULT_MODEL

    weights = _parse_weights(weight)
    if calibration is not None:
        cal = json.loads(calibration.read_text(encoding="utf-8"))
        if model is not None and cal.get("model") and model != cal["model"]:
            raise click.ClickException(
                f"{calibration} was fitted on model {cal['model']!r}, not {model!r}: "
                "thresholds belong to a model")
        model = model or cal.get("model")
        weights = {**cal.get("weights", {}), **weights}
        if threshold is None and cal.get("threshold") is not None:
            threshold = float(cal["threshold"])
    evaluator = _evaluator(model or DEFAULT_MODEL, registry, device, precision, aesthetic_head, weights)

    async def go() -> list[Any]:
        async with evaluator:
            return list(await evaluator.score([p.read_bytes() for p in images], prompt, negative=negative))

    scores = _run(go())
    if as_json:
        rows = []
        for path, s in zip(images, scores, strict=True):
            row = {"image": str(path), **s.to_dict()}
            if threshold is not None:
                row["passed"] = s.value >= threshold
            rows.append(row)
        click.echo(json.dumps({"model": evaluator.model_name, "threshold": threshold, "scores": rows},
                              indent=2))
        return
    _print_scores(images, scores, evaluator.model_name, threshold)


def _print_scores(images: Sequence[Path], scores: Sequence[Any], model: str, threshold: float | None) -> None:
    console = Console()
    present = [p for p in _PARTS if any(p in s.parts for s in scores)]
    table = Table(title=f"quality · {model}", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right", style="bold")
    for part in present:
        table.add_column(part, justify="right")
    table.add_column("checks")
    if threshold is not None:
        table.add_column(f"≥ {threshold:g}")
    for path, s in zip(images, scores, strict=True):
        cells = [path.name, f"{s.value:.3f}"]
        cells += [f"{s.parts[p]:.3f}" if p in s.parts else "–" for p in present]
        cells.append("ok" if s.ok else "[red]" + ", ".join(str(f) for f in s.technical.failures) + "[/red]")
        if threshold is not None:
            cells.append("[green]pass[/green]" if s.value >= threshold else "[red]fail[/red]")
        table.add_row(*cells)
    console.print(table)
    first = scores[0] if scores else None
    if first is not None and first.prompt.truncated:
        console.print(f"[yellow]prompt cut at {first.prompt.context_length} tokens "
                      f"(it has {first.prompt.n_tokens}); the rest was not scored[/yellow]")
    scored = next((s for s in scores if s.weights), None)
    if scored is not None:
        console.print("score = " + " ".join(f"{w:+g}×{name}" for name, w in scored.weights.items()))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", "-p", default=None,
              help="The prompt of every image (else a prompt column or prompts.json in FOLDER).")
@click.option("--negative", "-n", default=None, help="A negative prompt, scored as a penalty.")
@_model_options
@click.option("--pairs", "use_pairs", is_flag=True,
              help="Fit weights to FOLDER/pairs.csv (winner,loser) instead of good/bad labels.")
@click.option("--fit-weights", is_flag=True, help="With labels: fit the part weights too.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the fit (model, threshold, weights) as JSON, for `score --calibration`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def calibrate(folder: Path, prompt: str | None, negative: str | None, model: str | None,
              registry: tuple[Path, ...], device: str | None, precision: str | None,
              aesthetic_head: Path | None, use_pairs: bool, fit_weights: bool, out: Path | None,
              as_json: bool) -> None:
    """Fit the gate to your own labelled images in FOLDER and report how well it agrees.

    FOLDER holds good/ and bad/ subfolders, or labels.csv (file,label[,prompt]); with --pairs,
    pairs.csv (winner,loser[,prompt]).
    """
    from quality import DEFAULT_MODEL
    from quality.calibration import (
        fit_threshold,
        fit_weights_pairwise,
        load_labelled_folder,
        load_pairs,
    )
    from quality.calibration import fit_weights as fit_label_weights

    evaluator = _evaluator(model or DEFAULT_MODEL, registry, device, precision, aesthetic_head, {})
    try:
        items: list[Any] = load_pairs(folder) if use_pairs else load_labelled_folder(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise click.ClickException(f"{folder}: {exc}") from exc

    def prompt_of(item: Any) -> str:
        text = item.prompt or prompt
        if not text:
            raise click.ClickException(f"no prompt for {item}: pass --prompt or add a prompt column")
        return str(text)

    async def score_paths(paths: Sequence[Path], prompts: Sequence[str]) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        results: list[Any] = [None] * len(paths)

        async def one(p: str, idx: list[int]) -> None:
            scores = await evaluator.score([paths[i].read_bytes() for i in idx], p, negative=negative)
            for i, s in zip(idx, scores, strict=True):
                results[i] = s

        async with evaluator:
            await asyncio.gather(*(one(p, idx) for p, idx in groups.items()))
        return results

    result: dict[str, Any] = {"model": evaluator.model_name, "folder": str(folder), "negative": negative}
    if use_pairs:
        prompts = [prompt_of(p) for p in items]
        scores = _run(score_paths([p.winner for p in items] + [p.loser for p in items], prompts + prompts))
        n = len(items)
        pair_fit = fit_weights_pairwise([s.parts for s in scores[:n]], [s.parts for s in scores[n:]],
                                        current=evaluator.weights, model=evaluator.model_name)
        result.update(kind="pairwise", weights=pair_fit.weights.as_dict(), threshold=None,
                      agreement=pair_fit.agreement, fit=pair_fit.to_dict())
    else:
        scores = _run(score_paths([i.path for i in items], [prompt_of(i) for i in items]))
        labels = [i.good for i in items]
        if fit_weights:
            wfit = fit_label_weights([s.parts for s in scores], labels, current=evaluator.weights,
                                     model=evaluator.model_name)
            result.update(kind="labels+weights", weights=wfit.weights.as_dict(),
                          threshold=wfit.threshold.threshold, agreement=wfit.threshold.agreement,
                          fit=wfit.to_dict())
        else:
            tfit = fit_threshold([s.value for s in scores], labels, model=evaluator.model_name)
            result.update(kind="labels", weights=evaluator.weights.as_dict(), threshold=tfit.threshold,
                          agreement=tfit.agreement, fit=tfit.to_dict())
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_calibration(result, out)


def _print_calibration(result: dict[str, Any], out: Path | None) -> None:
    console = Console()
    table = Table(title=f"calibration · {result['model']} · {result['kind']}", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    fit = result["fit"]
    if result["threshold"] is not None:
        table.add_row("threshold", f"{result['threshold']:.4f}")
    table.add_row("agreement", f"{result['agreement']:.1%}")
    if result["kind"] == "labels":
        table.add_row("balanced agreement", f"{fit['balanced_agreement']:.1%}")
        table.add_row("AUC", f"{fit['auc']:.3f}")
        table.add_row("good / bad", f"{fit['n_good']} / {fit['n_bad']}")
        table.add_row("bad passed / good rejected", f"{fit['false_pass']} / {fit['false_reject']}")
    elif result["kind"] == "pairwise":
        table.add_row("agreement before", f"{fit['agreement_before']:.1%}")
        table.add_row("pairs", str(fit["n_pairs"]))
    else:
        table.add_row("agreement before", f"{fit['before']['agreement']:.1%}")
    for name, w in result["weights"].items():
        table.add_row(f"weight · {name}", f"{w:+.3f}")
    console.print(table)
    if out is not None:
        console.print(f"written to {out} (use it with `comfy-orch score --calibration {out}`)")
