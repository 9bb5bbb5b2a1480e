from budgetnet.cli import main

raise SystemExit(main())
