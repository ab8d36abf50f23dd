"""python -m pneumoscan.cli"""

import sys

from pneumoscan.cli.app import main

sys.exit(main())
