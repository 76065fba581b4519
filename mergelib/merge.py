"""``python -m mergelib.merge PRETRAINED FINETUNED... --out DIR --method NAME [--HPARAM VALUE ...]``.

The command line of :func:`mergelib.streaming.merge_files`. Importing this module as
``mergelib.merge`` would replace the package attribute ``mergelib.merge`` (the function); the module
is therefore callable and forwards calls to :func:`mergelib.merging.merge`.
"""
import sys
import types

from .merging import merge as _merge
from .streaming import main


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
