"""``lora-ref demo``: the LoRA paper's Tables 5, 6, 7 and Figure 3 in miniature, on a small GPT-2 or LLaMA.

Pretrain a small GPT-2- (or LLaMA-) architecture model on a generated cipher task, fine-tune it on a changed
cipher with full fine-tuning and with LoRA at several ranks and target sets, measure, and write
``report.md``, ``results.json`` and figures. docs/reproduction.md describes the experiment.

The demo is split by job:

* :mod:`~transformer_ref.demo.experiment` -- :class:`DemoConfig`, the presets :data:`DEFAULT`
  and :data:`QUICK`, the runs, and :func:`compute` (every number, nothing written);
* :mod:`~transformer_ref.demo.report` -- :func:`report_markdown`, :func:`summary_text`, and the
  caveats the numbers imply (``*_caveat``), each a function of the result;
* :mod:`~transformer_ref.demo.figures` -- the PNG figures (matplotlib, optional);
* :mod:`~transformer_ref.demo.run` -- :func:`run_demo` (output folder, BLAS threads, files) and
  :func:`write_report`;
* :mod:`~transformer_ref.demo.reproduction` -- docs/reproduction.md's generated part, from the
  committed results of three runs (``python -m transformer_ref.demo.reproduction``).

>>> from transformer_ref.demo import QUICK, run_demo
>>> result = run_demo(QUICK, "lora-ref-demo")        # doctest: +SKIP
"""

from .experiment import DEFAULT, FAMILIES, PRESETS, QUICK, DemoConfig, compute
from .report import report_markdown, summary_text
from .run import json_ready, prepare_output, run_demo, write_report

__all__ = ["DEFAULT", "FAMILIES", "PRESETS", "QUICK", "DemoConfig", "compute", "json_ready", "prepare_output",
           "report_markdown", "run_demo", "summary_text", "write_report"]
