"""``python -m anynorm``: the self-check across installed backends (see
:mod:`anynorm._selfcheck`; ``python -m anynorm --help`` for the options)."""

import sys

from ._selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
