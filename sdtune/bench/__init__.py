"""``make bench``: how fast sdtune trains, how much memory it needs, and how it compares.

* ``suite``: one run (matmul peak, per model a FLOP count and interleaved rounds of cases, the table);
* ``cases``: cases as config overrides, which models, how many steps;
* ``runner``: one case, either sdtune (LoRATrainingModule + lightning.Trainer + a timing callback)
  or ``reference``, the plain PyTorch loop a user would otherwise write;
* ``measure``: step clocks, peak memory, matmul peak; ``flops``: FLOPs on the meta device;
* ``arch``: full-size SD1.5 / SDXL / Kolors architectures from ``configs/*.json``, random weights;
* ``table``: rows, CSV, Markdown, target checks.
"""
