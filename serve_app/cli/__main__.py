import sys

from serve_app.cli.main import main

sys.exit(main())
