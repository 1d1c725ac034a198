"""eval.py's parts: what a run is and writes (:mod:`evaluation.run`), its metrics
(:mod:`evaluation.metrics`) and its report (:mod:`evaluation.report`)."""
