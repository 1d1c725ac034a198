"""Benchmark command lines: they measure, they change no image (outside eval.py's code digest).

* ``python -m benchmarks.sampling`` - latency and FLOPs of plain MAR and each preset, on one model in one run.
* ``python -m benchmarks.throughput`` - images/s of a grid of models, batches, presets and precisions on a GPU.
* ``python -m benchmarks.profile_sampler`` - where one generation spends its time, component by component.
* ``python -m benchmarks.step_timing`` - seconds per training step of each execution mode (demo model).
"""
