from bnlab.lab.cli import main

raise SystemExit(main())
