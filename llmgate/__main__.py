"""python -m llmgate"""

from llmgate.cli import main

raise SystemExit(main())
