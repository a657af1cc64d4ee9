"""Triton kernels, one file per family. Installed as ``diffaccel.kernels``.

Plain launch functions over tensors; nothing here imports the ``diffaccel`` package.
"""

if __name__ == "kernels":
    # Imported by its bare name: the checkout's root is on sys.path (python -m / -c run from it), and this
    # folder shadows Hugging Face's `kernels` package, which transformers imports (diffusers' model imports
    # then fail). Where that package is installed, hand the name over to it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # (the import statement returns what sys.modules holds)
        _spec.loader.exec_module(_module)
