from fsagent.cli import main

raise SystemExit(main())
