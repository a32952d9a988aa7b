"""``comfy-orch demo``: a quality-gated multi-model comparison on real ComfyUI, with a report.

    DemoSettings     what to compare, where, and how strictly (local tiny models by default)
    Demo             the run: ``await Demo(settings).run(on_event=…, on_stage=…)``
    DemoResult       where the report, contact sheet, manifest and upscaled winners went
    write_report     the HTML report from a manifest (``write_contact_sheet`` for the PNG grid)

With no backends it starts a local CPU ComfyUI holding three tiny random-weight UNets (their pictures
are noise) and scores with the project's tiny shapes CLIP; with backends it compares real models.
"""

from comfy_orchestrator.demo.flow import Demo, DemoError, DemoResult, LoopCell, StageCallback
from comfy_orchestrator.demo.manifest import MANIFEST_FORMAT, TINY_WARNING, build_manifest
from comfy_orchestrator.demo.report import REAL_BACKENDS_HELP, write_contact_sheet, write_report
from comfy_orchestrator.demo.settings import DEFAULT_PROMPTS, DemoSettings

__all__ = [
    "DEFAULT_PROMPTS",
    "MANIFEST_FORMAT",
    "REAL_BACKENDS_HELP",
    "TINY_WARNING",
    "Demo",
    "DemoError",
    "DemoResult",
    "DemoSettings",
    "LoopCell",
    "StageCallback",
    "build_manifest",
    "write_contact_sheet",
    "write_report",
]
