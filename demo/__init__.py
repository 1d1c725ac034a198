"""Self-contained "demo" setting: procedural data, a measuring classifier and its torch-fidelity hook.

The released ImageNet MAR checkpoints are several GB and cannot be downloaded everywhere, so the
project also trains a small MAR on procedurally generated shapes (rendered at any size; the demo MAR
works at 32x32, the classifier at 64x64). This package provides the pieces that need no download:

* :mod:`demo.dataset` - deterministic class-conditional shapes dataset (flat regions and fine detail).
* :mod:`demo.classifier` - a small CNN trained on that data, used only as a measuring stick.
* :mod:`demo.fidelity` - the classifier registered as a torch-fidelity feature extractor
  (``lazymar-demo-classifier``), "demo FID" and class-accuracy helpers.
* :mod:`demo.tokenizer` - the demo's KL autoencoder (32x32 images to 4x16x16 latents).
* :mod:`demo.latents` - the training split encoded once by the tokenizer, cached on disk.
* :mod:`demo.registry` - where the demo checkpoints live, how they load, the demo's sampling defaults.
* :mod:`demo.train_step` - the model sizes and the static-shape (bucketed, compiled) training step.
* :mod:`demo.evaluate` / :mod:`demo.plot` - the quality table of every preset and its plot.

Submodules are imported lazily by the caller; importing :mod:`demo` itself is cheap.
"""
