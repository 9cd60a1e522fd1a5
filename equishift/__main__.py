from equishift.cli import main

raise SystemExit(main())
