from batchnorm.cli import main

raise SystemExit(main())
