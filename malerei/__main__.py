import sys

from malerei.cli import main

sys.exit(main())
