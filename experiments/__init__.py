"""The experiments behind dpc_fx's demo, examples and tools: data, models, training loops.

A package of the repository, not of the installed library (``pip install dpc-fx`` does not
ship it): run from the repository root, where ``make demo``, ``python -m experiments.demo``
and the scripts in ``tools/`` and ``examples/`` find it.

* :mod:`experiments.data`: data sets in memory (MNIST-1D, digits, CIFAR, a text corpus);
* :mod:`experiments.models`: the models trained on them;
* :mod:`experiments.train`: training and evaluation loops, and ``compare``;
* :mod:`experiments.demo`: ``make demo``, a compiled ResNet-18 and fp32 vs DPC on MNIST-1D.
"""
