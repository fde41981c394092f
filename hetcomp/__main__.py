from hetcomp.cli import main

raise SystemExit(main())
