import sys

from stagetune.cli import main

sys.exit(main())
