"""The pack outside ComfyUI's own loader: shared by the tests, scripts/, benchmarks/ and the workers they start.

- :mod:`.pack`: loads the pack under its one import name, ``comfyui_dreamtuner``, as ComfyUI
  loads a custom node folder (so the core is ``comfyui_dreamtuner.dreamtuner_core`` everywhere).
- :mod:`.tiny_models`: seeded small models built with ComfyUI's own classes.
- :mod:`.pretrain_worker`: one rank of a multi-process pretraining test.
- :mod:`.tier2_assets`: random-weight model files in the real formats (a command line).

Importable with the repository folder on ``sys.path`` (appended after ComfyUI's own modules:
``nodes`` is a ComfyUI module name too). Never loaded by ComfyUI: the pack is its ``__init__.py``.
"""
