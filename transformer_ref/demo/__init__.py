"""``lora-ref demo``: the LoRA paper's Tables 5, 6, 7 and Figure 3 in miniature, on a small GPT-2 or LLaMA.

Pretrain a small GPT-2- (or LLaMA-) architecture model on a generated cipher task, fine-tune it on a changed
cipher with full fine-tuning and with LoRA at several ranks and target sets, measure, and write
``report.md``, ``results.json`` and figures. docs/reproduction.md describes the experiment.

The demo is split by job:

* :mod:`~transformer_ref.demo.common` -- :class:`DemoConfig`, the presets :data:`DEFAULT` and
  :data:`QUICK`, and what every step shares (the setup, the pretraining, the random streams);
* :mod:`~transformer_ref.demo.experiment` -- :func:`compute` (every number, nothing written), which
  puts the steps together: :mod:`~transformer_ref.demo.runs` (the fine-tuning runs: the paper's,
  DoRA, QLoRA; the merge check), :mod:`~transformer_ref.demo.analysis` (spectra, phi,
  amplification), :mod:`~transformer_ref.demo.quantised` (the 4-bit base's error on the task),
  :mod:`~transformer_ref.demo.two_tasks` (two adapters: a mixed batch, combinations);
* :mod:`~transformer_ref.demo.report` -- :func:`report_markdown`, :func:`summary_text`, and the
  caveats the numbers imply (``*_caveat``), each a function of the result;
* :mod:`~transformer_ref.demo.figures` -- the PNG figures (matplotlib, optional);
* :mod:`~transformer_ref.demo.run` -- :func:`run_demo` (output folder, BLAS threads, files) and
  :func:`write_report`;
* :mod:`~transformer_ref.demo.reproduction` -- docs/reproduction.md's generated part, from the
  committed results of three runs (``python -m transformer_ref.demo.reproduction``);
* :mod:`~transformer_ref.demo.combination` -- the ``lora-ref combine`` audit (docs/combination.md).

>>> from transformer_ref.demo import QUICK, run_demo
>>> result = run_demo(QUICK, "lora-ref-demo")        # doctest: +SKIP
"""

from .common import DEFAULT, FAMILIES, PRESETS, QUICK, DemoConfig
from .experiment import compute
from .report import report_markdown, summary_text
from .run import json_ready, prepare_output, run_demo, write_report

__all__ = ["DEFAULT", "FAMILIES", "PRESETS", "QUICK", "DemoConfig", "compute", "json_ready", "prepare_output",
           "report_markdown", "run_demo", "summary_text", "write_report"]
