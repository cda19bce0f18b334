"""Helpers shared by the tests, imported as ``from tests.utils.<module> import ...``:

* ``models``: the tiny model configs, synthetic inputs, a tiny model that answers like a trained
  one;
* ``workflow``: paths, the tiny generated DigitScenes, the tiny train_net.py config overrides;
* ``reliability``: tiny COCO datasets written on the fly, the tiny trainer config, log capture;
* ``multiprocess``: train_net.py runs in subprocesses, fault injection (``python -m``);
* ``atss``: anchors, random boxes and the paper's ATSS assignment, per ground truth.
"""
