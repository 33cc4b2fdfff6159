import sys

from gradyard.cli import main

sys.exit(main())
