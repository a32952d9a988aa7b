"""The demo's contact sheet (PNG) and report (one self-contained HTML file), both from the manifest.

The report links its images relatively (``contact_sheet.png``, ``winners/…``, ``images/…``), so the
output folder opens as it is, moved or zipped. Every value shown is read from the manifest: the
report says nothing the manifest does not.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from comfy_orchestrator.pipelines.contact_sheet import SheetCell, render_sheet

__all__ = ["CONTACT_SHEET", "REAL_BACKENDS_HELP", "REPORT", "column_label", "write_contact_sheet", "write_report"]

CONTACT_SHEET = "contact_sheet.png"
REPORT = "report.html"
THUMB = 128

REAL_BACKENDS_HELP = """\
To compare real models, point the demo at ComfyUI servers that hold them, name the checkpoints, and
score with a real CLIP (its threshold is its own: fit one with `comfy-orch calibrate FOLDER`):

  comfy-orch demo --backend http://gpu-a:8188 --backend http://gpu-b:8188 \\
      --template sd15_txt2img --model v1-5-pruned-emaonly.safetensors --model dreamshaper_8.safetensors \\
      --upscaler RealESRGAN_x4plus.pth --prompt "a red fox in the snow" --prompt "a lighthouse at night" \\
      --clip vit-l-14-openai --clip-weights /models/clip/ViT-L-14.pt --threshold 0.75

--template is any text-to-image template in graphs/ with a prompt slot and a checkpoint (or unet)
slot; --model takes file names as the servers' loaders list them; the winners are upscaled with the
model_upscale template. --clip-weights is a local weights file or open_clip folder; leave it out where
the machine can download the weights. Nothing else changes: the same pool, gate and report."""


def column_label(prompt: str, seed: int, seeds: Sequence[int]) -> str:
    """A grid column: the prompt, and the base seed when there are several."""
    return prompt if len(seeds) <= 1 else f"{prompt}\nseed {seed}"


def cell_at(manifest: Mapping[str, Any], model: str, prompt: str, seed: int) -> Mapping[str, Any] | None:
    """The manifest's cell of ``model`` × ``prompt`` × ``seed``, if it has one."""
    return next((c for c in manifest["cells"]
                 if c["model"] == model and c["prompt"] == prompt and c["seed"] == seed), None)


def grid_columns(manifest: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The grid's columns, in order: (prompt, seed)."""
    return [(prompt, seed) for prompt in manifest["prompts"] for seed in manifest["seeds"]]


def is_winner(manifest: Mapping[str, Any], cell: Mapping[str, Any]) -> bool:
    """Whether ``cell``'s image is one of the winners the demo upscaled."""
    return cell.get("image") is not None and any(w["image"] == cell["image"] for w in manifest["winners"])


def write_contact_sheet(manifest: Mapping[str, Any], out: Path, *, thumb: int = THUMB) -> dict[str, Any]:
    """Render models × (prompts × seeds) with the score under each image; returns where and how big.
    Images smaller than ``thumb`` are enlarged by a whole factor, pixels kept sharp (``render_sheet``)."""
    columns = grid_columns(manifest)
    grid = []
    for model in manifest["models"]:
        row = []
        for prompt, seed in columns:
            cell = cell_at(manifest, model, prompt, seed)
            if cell is None or cell["score"] is None:
                row.append(SheetCell(None, "failed" if cell is not None else "missing"))
                continue
            verdict = "pass" if cell["passed"] else "below"
            tries = len(cell["attempts"])
            caption = f"{cell['score']:.3f} {verdict}" + (" WINNER" if is_winner(manifest, cell) else "")
            row.append(SheetCell(out / cell["image"], f"{caption}\n{tries} attempt{'s' * (tries != 1)}"))
        grid.append(row)
    title = f"CLIP {manifest['clip']['model']}, threshold {manifest['threshold']:g}"
    labels = [Path(model).stem for model in manifest["models"]]
    sheet = render_sheet(labels, [column_label(p, s, manifest["seeds"]) for p, s in columns], grid,
                         thumb=thumb, title=title)
    sheet.save(out / CONTACT_SHEET)
    return {"path": CONTACT_SHEET, "width": sheet.width, "height": sheet.height, "thumb": thumb,
            "rows": len(manifest["models"]), "columns": len(columns)}


# -- the HTML report ------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{background:#e3f6e3}.below{background:#fbe9e7}.winner{font-weight:bold}
.warning{background:#fff7d6;border:1px solid #e0c200;padding:.8em 1em;border-radius:4px}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto}img.sheet{max-width:100%;border:1px solid #ccc}
.winners img{height:256px;width:auto;image-rendering:pixelated;border:1px solid #ccc;margin-right:.6em;
  vertical-align:top}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_report(manifest: Mapping[str, Any], out: Path) -> Path:
    """Write ``out/report.html`` from the manifest; returns its path."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>comfy-orch demo: {_e(manifest['created_at'])}</title><style>{_STYLE}</style></head><body>",
        "<h1>comfy-orch demo: a quality-gated model comparison</h1>",
        f"<p>{len(manifest['models'])} model(s) × {len(manifest['prompts'])} prompt(s) × "
        f"{len(manifest['seeds'])} seed(s), each cell regenerated (new seed, then more steps) while its "
        f"<b>{_e(manifest['clip']['model'])}</b> score is below <b>{manifest['threshold']:g}</b>, at most "
        f"{manifest['max_attempts']} attempts; the best image per prompt was upscaled. "
        f"Made {_e(manifest['created_at'])}.</p>",
    ]
    if manifest.get("warning"):
        parts.append(f"<p class='warning'><b>Noise pictures.</b> {_e(manifest['warning'])}</p>")
    parts += _grid(manifest)
    parts += _winners_section(manifest)
    parts += _history(manifest)
    parts += _timings(manifest)
    parts += [
        "<h2>Real GPU backends and real CLIP weights</h2>", f"<pre>{_e(REAL_BACKENDS_HELP)}</pre>",
        f"<p>Everything above is in <a href='{_e(manifest['outputs']['manifest'])}'>manifest.json</a>.</p>",
        "</body></html>",
    ]
    path = out / REPORT
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _grid(manifest: Mapping[str, Any]) -> list[str]:
    sheet = manifest["outputs"].get("contact_sheet") or {"path": CONTACT_SHEET}
    columns = grid_columns(manifest)
    head = "".join(f"<th>{_e(column_label(p, s, manifest['seeds']))}</th>" for p, s in columns)
    rows = []
    for model in manifest["models"]:
        tds = []
        for prompt, seed in columns:
            cell = cell_at(manifest, model, prompt, seed)
            if cell is None:
                tds.append("<td>missing</td>")
                continue
            verdict = "pass" if cell["passed"] else "below"
            winner = " winner" if is_winner(manifest, cell) else ""
            tds.append(f"<td class='num score {verdict}{winner}' data-model='{_e(model)}' data-prompt='{_e(prompt)}' "
                       f"data-seed='{seed}' data-attempts='{len(cell['attempts'])}'>{_num(cell['score'])}</td>")
        rows.append(f"<tr><th>{_e(model)}</th>{''.join(tds)}</tr>")
    return [
        "<h2>The grid</h2>",
        f"<p><img class='sheet' src='{_e(sheet['path'])}' alt='contact sheet: models × prompts with scores'></p>",
        f"<table class='scores'><tr><th>model \\ prompt</th>{head}</tr>{''.join(rows)}</table>",
        "<p>Green: reached the threshold; red: the best of its attempts stayed below it. Bold: the winner "
        "of its prompt.</p>",
    ]


def _winners_section(manifest: Mapping[str, Any]) -> list[str]:
    items = []
    for w in manifest["winners"]:
        big = (f"<img src='{_e(w['upscaled'])}' alt='upscaled'> ×{w['scale']:g} with {_e(w['upscaler'])}, "
               f"{w['upscaled_size'][0]}×{w['upscaled_size'][1]}" if w.get("upscaled") else "not upscaled")
        items.append(f"<li><p><b>{_e(w['prompt'])}</b>: {_e(w['model'])}, seed {_e(w['seed'])}, score "
                     f"{_num(w['score'])}</p><p><img src='{_e(w['image'])}' alt='winner'> {big}</p></li>")
    body = "".join(items) or "<li>no image reached the selection</li>"
    return ["<h2>Winners, upscaled</h2>", f"<ul class='winners'>{body}</ul>"]


def _history(manifest: Mapping[str, Any]) -> list[str]:
    parts = ["<h2>Attempt history</h2>"]
    head = ("<tr><th>#</th><th>seed</th><th>steps</th><th>why</th><th>status</th><th>score</th><th>backend</th>"
            "<th>queued s</th><th>execution s</th><th>total s</th><th>image</th></tr>")
    for cell in manifest["cells"]:
        rows = []
        for a in cell["attempts"]:
            verdict = "pass" if a["passed"] else "below"
            image = f"<a href='{_e(a['image'])}'>png</a>" if a["image"] else _e(a["error"])
            rows.append(f"<tr class='attempt {verdict}'><td>{a['number']}</td><td>{a['seed']}</td>"
                        f"<td>{a['steps']}</td><td>{_e(a['reason'])}</td><td>{_e(a['status'])}</td>"
                        f"<td class='num'>{_num(a['score'])}</td><td>{_e(a['backend'])}</td>"
                        f"<td class='num'>{_num(a['queued_s'], 2)}</td><td class='num'>{_num(a['execution_s'], 2)}"
                        f"</td><td class='num'>{_num(a['elapsed_s'], 2)}</td><td>{image}</td></tr>")
        summary = (f"{_e(cell['model'])} · {_e(cell['prompt'])} · seed {cell['seed']}: best {_num(cell['score'])} "
                   f"after {len(cell['attempts'])} attempt(s), {'passed' if cell['passed'] else 'below threshold'}")
        parts.append(f"<details class='history'><summary>{summary}</summary><table>{head}{''.join(rows)}"
                     "</table></details>")
    return parts


def _timings(manifest: Mapping[str, Any]) -> list[str]:
    stage_names = {"models_s": "writing tiny models", "comfyui_start_s": "starting ComfyUI",
                   "clip_load_s": "loading CLIP", "pipeline_s": "comparison + upscale", "total_s": "total"}
    rows = "".join(f"<tr><td>{_e(stage_names.get(k, k))}</td><td class='num'>{_num(v, 2)}</td></tr>"
                   for k, v in manifest["timings"].items())
    steps = "".join(f"<tr><td>{_e(name)}</td><td>{_e(s['status'])}</td><td class='num'>{_num(s['elapsed_s'], 2)}"
                    f"</td><td>{_e(s['reason'])}</td></tr>" for name, s in manifest["steps"].items())
    backends = "".join(f"<tr><td>{_e(b['name'])}</td><td>{_e(b['url'])}</td><td>{_e(b.get('comfyui'))}</td>"
                       f"<td>{_e(', '.join(b.get('devices', [])) or b.get('error'))}</td></tr>"
                       for b in manifest["backends"])
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in manifest["versions"].items())
    stats = manifest["stats"]
    return [
        "<h2>Timings</h2>",
        f"<table class='timings'><tr><th>stage</th><th>seconds</th></tr>{rows}</table>",
        f"<table class='steps'><tr><th>step</th><th>status</th><th>seconds</th><th>outcome</th></tr>{steps}</table>",
        f"<p>Jobs: {stats['completed']} completed, {stats['cached']} cached, {stats['failed']} failed, "
        f"{stats['retries']} retried.</p>",
        "<h2>Backends and versions</h2>",
        f"<table><tr><th>name</th><th>url</th><th>ComfyUI</th><th>devices</th></tr>{backends}</table>",
        f"<p>{versions}; CLIP {_e(manifest['clip']['model'])} ({_e(manifest['clip']['weights'])}).</p>",
    ]
