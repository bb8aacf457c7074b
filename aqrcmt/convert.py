"""``python -m aqrcmt.convert`` runs ``aqrcmt convert`` (see :mod:`aqrcmt.checkpoint.convert`)."""
import sys

from aqrcmt.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
