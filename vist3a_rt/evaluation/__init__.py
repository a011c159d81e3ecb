"""Evaluation of a trained model on the procedural world's held-out compositions (``vist3a-rt eval``).

    from vist3a_rt.evaluation import EvalSettings, run_eval, write_report

    report = run_eval(EvalSettings(model="path/to/model"))
    write_report(report, "out/eval")   # report.md + report.json

Modules: ``model`` (what is loaded), ``clips`` (held-out clips at the model's sizes),
``world_eval`` (sections 1-2), ``robustness`` (3), ``attribute_check`` (the colour/shape
checker), ``faithfulness`` (4-6), ``report`` (assembly, writing), ``markdown`` (report.md).
Names below are imported on first use.
"""

import importlib

_PUBLIC = {"EvalSettings": ".report", "run_eval": ".report", "write_report": ".report",
           "check_output_folder": ".report", "DEFAULT_CLIPS": ".report", "DEFAULT_PROMPTS": ".report",
           "AttributeChecker": ".attribute_check", "CheckerSettings": ".attribute_check",
           "parse_world_prompt": ".attribute_check", "validate_checker": ".attribute_check",
           "render_markdown": ".markdown"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vist3a_rt.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
