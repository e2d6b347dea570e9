import sys

from homellm.cli import main

sys.exit(main())
