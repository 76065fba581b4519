"""Command line only: ``python -m mergelib.merge PRETRAINED FINETUNED... --out DIR --method NAME [--HPARAM VALUE ...]``.

The code is :func:`mergelib.streaming.main` (from Python, call :func:`mergelib.merge_files`).

This module cannot be imported, on purpose. ``import mergelib.merge`` would bind the submodule to the
package attribute ``mergelib.merge`` and so replace the function :func:`mergelib.merge`: the import
system sets that attribute after the module has run, and nothing in the module can undo it. An import
that raises leaves the attribute alone. ``python -m`` does not import the module under its own name
(runpy executes its code as ``__main__``), so the command line is unaffected.
"""
if __name__ != "__main__":
    raise ImportError("mergelib.merge is the command line (python -m mergelib.merge ...) and is not importable: "
                      "importing it would replace the function mergelib.merge. From Python use "
                      "mergelib.merge_files(...) or mergelib.streaming.main(argv).")

import sys

from mergelib.streaming import main

sys.exit(main())
