from llmworker.cli import main

raise SystemExit(main())
