from diffjax.cli import main

raise SystemExit(main())
