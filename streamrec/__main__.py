"""``python -m streamrec`` runs the command line."""
import sys

from streamrec.cli import main

sys.exit(main())
