"""``python -m aqrcmt.convert`` runs ``aqrcmt convert`` (see :mod:`aqrcmt.tools.convert_checkpoint`)."""
import sys

from aqrcmt.tools.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
