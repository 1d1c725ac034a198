"""Self-contained "demo" setting: procedural data, a measuring classifier and its torch-fidelity hook.

The released ImageNet MAR checkpoints are several GB and cannot be downloaded everywhere, so the
project also trains a small MAR on procedurally generated 64x64 shapes. This package provides the
pieces that need no download:

* :mod:`demo.dataset` - deterministic class-conditional shapes dataset (flat regions and fine detail).
* :mod:`demo.classifier` - a small CNN trained on that data, used only as a measuring stick.
* :mod:`demo.fidelity` - the classifier registered as a torch-fidelity feature extractor
  (``lazymar-demo-classifier``), "demo FID" and class-accuracy helpers.

Submodules are imported lazily by the caller; importing :mod:`demo` itself is cheap.
"""
