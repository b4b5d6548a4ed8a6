import sys

from gsrq.cli import main

sys.exit(main())
