import sys

from colaprob.cli import main

sys.exit(main())
