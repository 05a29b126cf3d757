import sys

from tpnet.cli import main

sys.exit(main())
